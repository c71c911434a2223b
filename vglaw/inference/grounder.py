"""One answer path: ground expressions in images with any model source (`Grounder`).

    from vglaw import Grounder
    g = Grounder("outputs/demo/model")            # a model folder, a hub id or a training .ckpt
    for r in g.predict("photo.jpg", ["the dog on the left", "the man in red"]):
        r.box, r.mask, r.score                    # xyxy in original pixels, (h, w) bool, float

Images of any size are read once at a bounded working size (`WORKING_SIDE`); boxes and masks
come back in the original image's pixels.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vglaw.data.refer import load_image, rgb_array
from vglaw.data.text import check_expression, warn_truncated
from vglaw.data.transforms import GroundingTransform
from vglaw.errors import ModelOutputError, UsageError, UserError
from vglaw.inference.describing import check_boxes, choose, listener_ious, propose, to_input_boxes
from vglaw.inference.loading import load_model, resolve_device
from vglaw.inference.onnx import OnnxModel
from vglaw.inference.precision import autocast, check_precision, with_precision
from vglaw.inference.results import Attention, Description, Grounding, PairError, SpokenCandidate
from vglaw.models.generalised import EXIST_THRESHOLD
from vglaw.models.postprocess import to_original
from vglaw.models.text_encoder import MAX_TOKENS, load_tokenizer

WORKING_SIDE = 2048  # images are decoded and kept at most this large; the model reads S x S anyway


@dataclass
class Prepared:
    """One image-expression pair as the model reads it."""

    text: str  # cleaned
    ids: list[int]  # token ids, special tokens included, truncated to `max_tokens`
    sample: dict  # GroundingTransform output, letterbox records in original pixels
    size: tuple[int, int]  # original (h, w)


def prepare_image(image: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """Any image input -> (H, W, 3) uint8 at most `WORKING_SIDE` on its longer side, and the
    original (h, w). Paths are read with their EXIF orientation."""
    if isinstance(image, (str, Path)):
        return load_image(image, exif_transpose=True, max_side=WORKING_SIDE)
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or array.dtype != np.uint8:
            raise UsageError(f"expected an (H, W, 3) uint8 image, got {array.dtype} of shape {array.shape}")
        image = Image.fromarray(np.ascontiguousarray(array))
    # the same conversion as an image read from a file (transparency on white, high bit depths)
    return np.ascontiguousarray(rgb_array(image, "the image", WORKING_SIDE)), (image.height, image.width)


class Preprocessor:
    """What the model reads, made from an image and an expression without the model: the
    tokenizer and the letterbox (picklable, so DataLoader workers prepare pairs with it).

    Args:
        tokenizer_source: the text encoder's tokenizer (a folder or a hub id).
        img_size: the model's input side S.
        max_tokens: expressions are truncated to this many tokens (with a warning).
    """

    def __init__(self, tokenizer_source: str, img_size: int, max_tokens: int = MAX_TOKENS) -> None:
        self.tokenizer = load_tokenizer(tokenizer_source)
        self.img_size, self.max_tokens = img_size, max_tokens
        self.transform = GroundingTransform(img_size)

    def prepare(self, image: np.ndarray, size: tuple[int, int], text: str) -> Prepared:
        """Clean and tokenise the expression (once) and letterbox a working-size image; the
        records map back to the original `size`."""
        text, ids = self.tokenize(text, stacklevel=4)
        return Prepared(text, ids, self.letterbox(image, size), size)

    def tokenize(self, text: str, stacklevel: int = 3) -> tuple[str, list[int]]:
        """The cleaned expression and its token ids, `[CLS]` words `[SEP]`, truncated to
        `max_tokens` (with a warning).

        Raises:
            UsageError: an empty expression, or one of only unknown symbols.
        """
        text = check_expression(text)
        words = self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
        if all(t == self.tokenizer.unk_token_id for t in words):
            raise UsageError(f"expression {text!r} has no word the text encoder knows (only unknown symbols)")
        warn_truncated([text], [len(words)], self.max_tokens, stacklevel=stacklevel)
        # [CLS] words [SEP], as the tokenizer writes one BERT sequence (truncated at the end)
        return text, [self.tokenizer.cls_token_id, *words[: self.max_tokens - 2], self.tokenizer.sep_token_id]

    def letterbox(self, image: np.ndarray, size: tuple[int, int]) -> dict:
        """A working-size image as the model reads it ("image"), with the letterbox records
        ("scale", "pad", "orig_size") in the original `size`'s pixels."""
        sample = self.transform({"image": image, "text": ""})
        new_w, new_h = (float(v) for v in sample["scale"] * torch.tensor(image.shape[1::-1], dtype=torch.float32))
        sample["scale"] = torch.tensor([new_w / size[1], new_h / size[0]], dtype=torch.float32)
        sample["orig_size"] = torch.tensor(size)
        return sample


class Grounder(Preprocessor):
    """Ground referring expressions in images with a trained model.

    Args:
        model: a model folder, a hub id, a training `.ckpt`, an `.onnx` export or a model.
        device: where to run ("cpu", "cuda", ...).
        max_tokens: expressions are truncated to this many tokens (with a warning).
        precision: "fp32", "bf16" (autocast) or "int8" (dynamic quantisation, CPU), as
            `vglaw.inference.precision` describes; an ONNX export runs as it was exported.
    """

    def __init__(self, model: Any, device: str | torch.device = "cpu", max_tokens: int = MAX_TOKENS,
                 precision: str = "fp32") -> None:
        self.precision = check_precision(precision)
        self.model = load_model(model, device)
        # An ONNX model runs where ONNX Runtime's provider does; a PyTorch model where it was put.
        self.device = self.model.device if isinstance(self.model, OnnxModel) else resolve_device(device)
        if isinstance(self.model, OnnxModel):
            if precision != "fp32":
                raise UsageError(f"precision {precision}: an ONNX file runs as it was exported; quantise the export "
                                 "instead (vglaw export --onnx MODEL --quantize int8)")
        else:
            self.model = with_precision(self.model, precision, self.device)
        self.img_size = self.model.img_size
        super().__init__(self.model.tokenizer_source, self.img_size, max_tokens)

    @torch.no_grad()
    def run(self, items: list[Prepared], return_attention: bool = False) -> list[Grounding]:
        """One batched forward pass over prepared pairs."""
        length = max(len(p.ids) for p in items)
        tokens = {"input_ids": torch.tensor([p.ids + [self.tokenizer.pad_token_id] * (length - len(p.ids))
                                             for p in items]),
                  "attention_mask": torch.tensor([[1] * len(p.ids) + [0] * (length - len(p.ids)) for p in items])}
        images = torch.stack([p.sample["image"] for p in items]).to(self.device)
        with autocast(self.precision, self.device):
            outputs = self.model(images, tokens["input_ids"].to(self.device),
                                 tokens["attention_mask"].to(self.device), return_attention=return_attention)
        scale, pad, orig = (torch.stack([p.sample[k] for p in items]).to(self.device)
                            for k in ("scale", "pad", "orig_size"))
        bad = [k for k, v in outputs.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ModelOutputError(f"the model ({self.model.source or 'given'}) produced NaN or infinite "
                                   f"{', '.join(sorted(bad))}: its weights are unusable; no result is written")
        pred = to_original(outputs, scale, pad, orig, self.img_size)
        results = []
        for i, p in enumerate(items):
            r = Grounding(p.text, p.size)
            if "boxes" in pred:
                r.box = [round(v, 2) for v in pred["boxes"][i].tolist()]
            if "masks" in pred:
                r.mask = pred["masks"][i].cpu().numpy()
                r.score = round(float(pred["mask_scores"][i]), 4)  # mean probability over the mask
            if "box_sets" in pred:  # generalised: every box of the set, or none
                r.exists = round(float(pred["exists"][i]), 4)
                r.no_target = bool(pred["exists"][i] < EXIST_THRESHOLD)  # as `to_original` gated, unrounded
                r.boxes = [[round(v, 2) for v in b] for b in pred["box_sets"][i].tolist()]
                r.box_scores = [round(v, 4) for v in pred["box_set_scores"][i].tolist()]
            if return_attention:
                n = len(p.ids)
                r.attention = Attention(
                    tokens=self.tokenizer.convert_ids_to_tokens(p.ids),
                    lang=outputs["lang_attention"][i, :, :, :n].float().cpu().numpy(),  # (depth, G, n)
                    letterbox={k: p.sample[k].tolist() for k in ("scale", "pad")},
                    lap=outputs["lap_attention"][i].float().cpu().numpy() if "lap_attention" in outputs else None,
                    centre=(outputs["centre_logits"][i].float().sigmoid().cpu().numpy()
                            if "centre_logits" in outputs else None))
            results.append(r)
        return results

    def predict(self, image: Any, texts: str | list[str], return_attention: bool = False) -> list[Grounding]:
        """Every expression in `texts` grounded in one image (a path, a PIL image or an array),
        one `Grounding` each, in one batched forward pass."""
        return self.predict_decoded(*prepare_image(image), texts, return_attention)

    def predict_decoded(self, image: np.ndarray, size: tuple[int, int], texts: str | list[str],
                        return_attention: bool = False) -> list[Grounding]:
        """`predict` on an image `prepare_image` has decoded already (to draw on it after)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise UsageError("give at least one expression")
        return self.run([self.prepare(image, size, t) for t in texts], return_attention)

    def predict_pairs(self, pairs: Iterable[tuple[Any, str]], batch_size: int = 16,
                      keep_image: bool = False) -> Iterator[Grounding | PairError]:
        """Many (image, expression) pairs, batched; yields one result per pair in order.

        A pair whose image cannot be read or whose expression is unusable yields a `PairError`
        instead, and the others go on. With `keep_image`, each `Grounding.image` holds the
        decoded (H, W, 3) picture it was grounded in (shared, not copied, by consecutive pairs
        of one image), e.g. to draw overlays without decoding again.
        """
        batch: list[tuple[int, Prepared, np.ndarray]] = []
        cache: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        results: dict[int, Grounding | PairError] = {}
        next_out = 0

        def flush() -> None:
            if batch:
                for (k, _, array), r in zip(batch, self.run([p for _, p, _ in batch])):
                    if keep_image:
                        r.image = array
                    results[k] = r
                batch.clear()

        def ready() -> Iterator[Grounding | PairError]:
            nonlocal next_out
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1

        for order, (image, text) in enumerate(pairs):
            try:
                key = str(image) if isinstance(image, (str, Path)) else None
                if key is None or key not in cache:
                    cache.clear()  # consecutive pairs of one image share its decoding
                    decoded = prepare_image(image)
                    if key is not None:
                        cache[key] = decoded
                else:
                    decoded = cache[key]
                batch.append((order, self.prepare(*decoded, text), decoded[0]))
            except UserError as err:
                results[order] = PairError(str(err))
            if len(batch) >= batch_size:
                flush()
            yield from ready()
        flush()
        yield from ready()

    # ---- describing regions (models with a describing head) ---------------------------------

    def describe(self, image: Any, boxes: Sequence[Sequence[float]], candidates: int = 5, rerank: bool = True,
                 strategy: str = "beam", seed: int = 0, temperature: float = 1.0) -> list[Description]:
        """An expression for each box [x1, y1, x2, y2] (original pixels) of one image, checked by
        grounding it back (`vglaw.inference.describing`).

        Args:
            image: a path, a PIL image or an (H, W, 3) uint8 array.
            boxes: the regions to describe.
            candidates: K expressions proposed per box (beams, or samples).
            rerank: keep the likeliest candidate the model grounds back to the box, or the closest
                when none does (speaker-listener, `vglaw.inference.describing.choose`); else the likeliest.
            strategy: "beam" (beam search) or "sample" (seeded sampling at `temperature`).
            seed: the sampling seed (each box draws from its own generator seeded with it).

        Raises:
            UsageError: a model without a describing head, or a box outside the image or of zero area.
        """
        return self.describe_decoded(*prepare_image(image), boxes, candidates, rerank, strategy, seed, temperature)

    @torch.no_grad()
    def describe_decoded(self, image: np.ndarray, size: tuple[int, int], boxes: Sequence[Sequence[float]],
                         candidates: int = 5, rerank: bool = True, strategy: str = "beam", seed: int = 0,
                         temperature: float = 1.0, listener_batch: int = 32) -> list[Description]:
        """`describe` on an image `prepare_image` has decoded already."""
        if not self.model.describes:
            raise UsageError(f"the model ({self.model.source or 'given'}) has no describing head: train one with "
                             "a describing variant (configs/describe_shapes.yaml, `make demo-describe`)")
        boxes = check_boxes(boxes, size)
        sample = self.letterbox(image, size)
        query = torch.tensor(boxes, dtype=torch.float32)  # (N, 4) original pixels
        inputs = to_input_boxes(query, sample["scale"], sample["pad"], self.img_size).to(self.device)
        images = sample["image"][None].expand(len(boxes), -1, -1, -1).to(self.device)  # (N, 3, S, S)
        with autocast(self.precision, self.device):
            proposals = propose(self.model, images, inputs, self.tokenizer.cls_token_id,
                                self.tokenizer.sep_token_id, candidates, strategy, seed, temperature)
        texts = [[self.tokenizer.decode(list(c.ids), skip_special_tokens=True) for c in cands] for cands in proposals]
        # The listener: every candidate grounded in the same letterboxed image, in batches.
        items, where = [], []
        for b, cands in enumerate(texts):
            for k, text in enumerate(cands):
                try:
                    cleaned, ids = self.tokenize(text)
                except UserError:  # an empty or unknown-only expression refers to nothing
                    continue
                items.append(Prepared(cleaned, ids, sample, size))
                where.append((b, k))
        grounded: dict[tuple[int, int], list[float] | None] = {}
        for start in range(0, len(items), listener_batch):
            for key, r in zip(where[start : start + listener_batch], self.run(items[start : start + listener_batch])):
                grounded[key] = r.box
        results = []
        for b, cands in enumerate(proposals):
            found = [grounded.get((b, k)) for k in range(len(cands))]
            ious = listener_ious(query[b], found)
            spoken = [SpokenCandidate(texts[b][k], round(c.log_prob, 4), round(ious[k], 4), found[k])
                      for k, c in enumerate(cands)]
            best = spoken[choose(ious, [c.log_prob for c in cands], rerank)]
            results.append(Description(boxes[b], best.text, best.listener_iou, best.log_prob, best.grounded_box,
                                       spoken, rerank))
        return results
