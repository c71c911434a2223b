"""LightningDataModule for refer-format datasets: paths, splits, augmentation and tokenisation.

Batches hold: "images" (B, 3, S, S), "masks" (B, S, S), "boxes" (B, 4) normalised cxcywh,
"input_ids" / "attention_mask" (B, L <= 40), the letterbox records "scale", "pad",
"orig_size" (B, 2), "index" (B,) sentence index in its split, "texts"; with `categories`,
"categories" (B, S, S) int64 category maps (see `vglaw.data.refer`); evaluation batches also
"orig_boxes" (B, 4) xyxy and "orig_masks" (a list of (h, w) uint8 masks). Generalised datasets
add "boxes_set" (a list of (N_b, 4) normalised cxcywh), "has_target" (B,) and, for evaluation,
"orig_boxes_set" (a list of (N_b, 4) xyxy); their "masks" are the union of the set.
"""
from __future__ import annotations

import math
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from vglaw.data.grefer import reader_for
from vglaw.data.refer import DEFAULT_SPLIT_BY, GENERALISED, ReferDataset, category_count
from vglaw.data.text import real_token_counts
from vglaw.data.transforms import GroundingTransform
from vglaw.errors import UsageError
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER, MAX_TOKENS, load_tokenizer

CALIBRATION = "calibration"  # the training images held out to calibrate a generalised model's box scores
CALIBRATION_SEED = 0  # which images: the same on every run, machine and process


class Collate:
    """Stack tensors and tokenise the expressions of a batch."""

    def __init__(self, text_encoder: str, max_tokens: int = MAX_TOKENS) -> None:
        self.text_encoder, self.max_tokens = text_encoder, max_tokens
        self._tokenizer = None  # built lazily, once per worker process

    def __call__(self, samples: list[dict]) -> dict:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.text_encoder)
        texts = [s["text"] for s in samples]
        # Truncation is reported once per split by the data module, not once per batch.
        tokens = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {
            "images": torch.stack([s["image"] for s in samples]),
            "masks": torch.stack([s["mask"] for s in samples]),
            "boxes": torch.stack([s["box"] for s in samples]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "scale": torch.stack([s["scale"] for s in samples]),
            "pad": torch.stack([s["pad"] for s in samples]),
            "orig_size": torch.stack([s["orig_size"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples]),
            "texts": texts,
        }
        if "categories" in samples[0]:
            batch["categories"] = torch.stack([s["categories"] for s in samples])
        if "boxes_set" in samples[0]:  # generalised: sets of 0..N boxes
            batch["boxes_set"] = [s["boxes_set"] for s in samples]
            batch["has_target"] = torch.tensor([s["has_target"] for s in samples])
            if "orig_boxes_set" in samples[0]:
                batch["orig_boxes_set"] = [s["orig_boxes_set"] for s in samples]
        if "orig_box" in samples[0]:
            batch["orig_boxes"] = torch.stack([s["orig_box"] for s in samples])
            batch["orig_masks"] = [s["orig_mask"] for s in samples]
        return batch


class ReferDataModule(pl.LightningDataModule):
    """Train / validation / test loaders of one refer-format dataset.

    Args:
        dataset: refcoco, refcoco+, refcocog, refclef or shapes; grefcoco or gshapes for
            generalised grounding (0..N referred objects, `vglaw.data.grefer`); custom for data
            imported by `vglaw data import`.
        data_root: folder holding `<dataset>/` and `images/` (see data/README.md).
        split_by: unc, umd, google or berkeley; None takes the dataset's default.
        train_split: split to train on.
        val_splits: splits evaluated during fit and by `validate` (the first one picks checkpoints).
        test_splits: splits evaluated by `test`.
        img_size: letterboxed input side S (must match the model).
        batch_size: samples per device and forward pass.
        global_batch_size: effective batch over all devices and accumulation steps; the CLI sets
            `trainer.accumulate_grad_batches` to reach it. None leaves accumulation alone.
        num_workers: loader processes per device.
        text_encoder: tokenizer source, the same name or folder as the model's text encoder.
        max_tokens: expressions are truncated to this many tokens, `[CLS]` included.
        flip_p: probability of the training flip, which swaps "left"/"right" as whole words
            (paper: 0.5, the paper's only augmentation).
        crop_p: probability of a random box-safe crop, resized back (never applied to
            expressions with a direction word; not the paper's). It changes how big everything
            looks, so leave it 0 where size is absolute, as "small" / "big" are in shapes.
        color_jitter_p: probability of brightness/contrast/saturation jitter (never hue, which
            expressions name; not the paper's).
        translate_p: probability of placing the image at a random offset in the letterbox
            instead of its centre (the official port's random translation; not in the paper).
        letterbox_fill: padding of the letterbox: "mean" (zero after normalisation, the paper's)
            or "black".
        skip_invalid: drop bad samples with a counted warning instead of stopping (every split:
            the evaluated splits then score the samples that remain, and say how many were dropped).
        cache_images: keep decoded images and masks in memory (per worker); for small datasets.
        categories: add category maps of every annotated object ("categories"), the target of
            the auxiliary category loss (`VGLAWModule.weight_seg`, which the CLI links to it).
        calibration_holdout: generalised datasets: the share of training images (a fixed seeded
            draw) kept out of training; while fitting, a generalised model's box scores are
            calibrated on them (`vglaw.training.calibration`), so no reported split takes part
            in its own calibration. 0 leaves the scores uncalibrated.
        generalised: read the data for a generalised model (0..N targets per expression) or a
            single-target one (custom data: an expression naming no or several objects is then a
            bad sample); the CLI links it from `model.variant`. None: as the dataset is (grefcoco
            and gshapes generalised, the others, custom included, single-target).
    """

    def __init__(
        self,
        dataset: str = "shapes",
        data_root: str = "data",
        split_by: str | None = None,
        train_split: str = "train",
        val_splits: list[str] | None = None,
        test_splits: list[str] | None = None,
        img_size: int = 448,
        batch_size: int = 32,
        global_batch_size: int | None = None,
        num_workers: int = 4,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        max_tokens: int = MAX_TOKENS,
        flip_p: float = 0.5,
        crop_p: float = 0.0,
        color_jitter_p: float = 0.0,
        translate_p: float = 0.0,
        letterbox_fill: str = "mean",
        skip_invalid: bool = False,
        cache_images: bool = False,
        categories: bool = False,
        calibration_holdout: float = 0.0,
        generalised: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset, self.data_root = dataset, data_root
        self.generalised = dataset in GENERALISED if generalised is None else generalised
        self.split_by = split_by or DEFAULT_SPLIT_BY.get(dataset)
        self.train_split = train_split
        self.val_splits = list(val_splits or ["val"])
        self.test_splits = list(test_splits or ["test"])
        if batch_size < 1:
            raise UsageError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise UsageError(f"data.num_workers must be >= 0, got {num_workers}")
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.augmentation = dict(flip_p=flip_p, crop_p=crop_p, color_jitter_p=color_jitter_p, translate_p=translate_p,
                                 fill=letterbox_fill)
        GroundingTransform(img_size, train=True, **self.augmentation)  # checks the probabilities now
        self.skip_invalid, self.cache_images, self.categories = skip_invalid, cache_images, categories
        if not 0.0 <= calibration_holdout < 1.0:
            raise UsageError(f"data.calibration_holdout must be in [0, 1), got {calibration_holdout}")
        if calibration_holdout > 0 and not self.generalised:
            raise UsageError(f"data.calibration_holdout calibrates a generalised model's box scores; {dataset} is not "
                             "read for a generalised model")
        self.calibration_holdout = calibration_holdout
        self.collate = Collate(text_encoder, max_tokens)
        self._sets: dict[str, ReferDataset] = {}

    @property
    def calibration_split(self) -> str | None:
        """The name of the held-out calibration slice (`calibration_holdout`), None without one."""
        return CALIBRATION if self.calibration_holdout > 0 and self.generalised else None

    def split(self, name: str, train: bool = False) -> ReferDataset:
        """A split's dataset; `CALIBRATION` is the held-out slice of the training split, which
        the training split then lacks."""
        key = f"{name}:{train}"
        if key not in self._sets:
            transform = GroundingTransform(self.img_size, train=train, keep_original=not train, **self.augmentation)
            reader = reader_for(self.dataset, self.generalised)
            source = self.train_split if name == CALIBRATION else name
            # Every split skips (and counts) bad samples when asked: `vglaw data check` recommends
            # skip_invalid, and a validation split that still refused them would end fit.
            dataset = reader(self.data_root, self.dataset, source, self.split_by,
                             skip_invalid=self.skip_invalid, transform=transform,
                             cache=self.cache_images, categories=self.categories)
            if source == self.train_split and self.calibration_split:
                held = self._held_out_images(dataset)
                dataset.samples = [s for s in dataset.samples if (s.image_id in held) == (name == CALIBRATION)]
            self._sets[key] = dataset
            if train or f"{name}:{not train}" not in self._sets:
                self._warn_truncated(dataset, name)
        return self._sets[key]

    def _held_out_images(self, dataset: ReferDataset) -> set[int]:
        """`calibration_holdout` of the training images, by a fixed seeded draw."""
        ids = sorted({s.image_id for s in dataset.samples})
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(CALIBRATION_SEED)).tolist()
        return {ids[i] for i in order[: math.ceil(self.calibration_holdout * len(ids))]}

    def _warn_truncated(self, dataset: ReferDataset, name: str) -> None:
        """One warning per split for the expressions longer than `max_tokens`."""
        texts = sorted({s.text for s in dataset.samples})
        if not texts:
            return
        _, lengths = real_token_counts(load_tokenizer(self.collate.text_encoder), texts)
        long = [t for t, n in zip(texts, lengths) if n + 2 > self.collate.max_tokens]
        if long:
            warnings.warn(f"{self.dataset} {name}: {len(long)} of {len(texts)} distinct expressions are longer than "
                          f"{self.collate.max_tokens} tokens and are truncated (e.g. {long[0][:80]!r})", stacklevel=2)

    @property
    def num_categories(self) -> int:
        """Classes of the category maps (background included), 0 without `categories`: the
        model's `seg_classes`, linked by the CLI."""
        if not self.categories:
            return 0
        return category_count(self.data_root, self.dataset)

    def _loader(self, name: str, train: bool) -> DataLoader:
        return DataLoader(self.split(name, train), batch_size=self.batch_size, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, collate_fn=self.collate,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        """The validation splits, preceded while fitting by the calibration slice (if any)."""
        loaders = [self._loader(s, train=False) for s in self.val_splits]
        if self.calibration_split and self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            loaders.insert(0, self._loader(CALIBRATION, train=False))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(s, train=False) for s in self.test_splits]
