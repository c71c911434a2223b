"""Reader of the refer format (lichengunc/refer): RefCOCO, RefCOCO+, RefCOCOg, ReferItGame and
the embedded shapes dataset.

    <root>/<dataset>/refs(<splitBy>).p   pickled list of refs (unpickled safely)
    <root>/<dataset>/instances.json      COCO-style images, annotations (bbox, polygons or RLE)
    <root>/<IMAGE_DIRS[dataset]>/<file_name>

One sample per sentence. Boxes are COCO [x, y, w, h] in original pixels; masks (H, W) uint8;
optional category maps (H, W) uint8 of every annotation of the image (0 background, 1 + the
category's rank among instances.json's categories, 255 crowd regions to ignore).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pycocotools import mask as mask_utils

from vglaw.safe_pickle import plain_load

SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
    "refclef": {"unc": ("train", "val", "testA", "testB", "testC"), "berkeley": ("train", "val", "test")},
    "shapes": {"unc": ("train", "val", "test")},
}
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc", "shapes": "unc"}
IMAGE_DIRS = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
    "shapes": "images/shapes",
}
HOW_TO_GET = "see data/README.md for where to download it and the expected layout"
IGNORE = 255  # category-map value of crowd regions: no loss there


def category_count(root: str | Path, dataset: str) -> int:
    """Classes of `dataset`'s category maps: its instances.json categories + 1 for background."""
    path = Path(root) / dataset / "instances.json"
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: expected {path} ({HOW_TO_GET})")
    with open(path) as f:
        categories = json.load(f).get("categories")
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{path} has no 'categories' list, which the category maps need")
    return len(categories) + 1


class BadSampleError(ValueError):
    """A sample that cannot be used: bad image, box, expression or annotation reference."""


@dataclass(frozen=True)
class Sample:
    """One sentence of one ref."""

    index: int
    ref_id: int
    sent_id: int
    ann_id: int
    image_id: int
    text: str
    image_path: Path
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h in original pixels


def load_rgb(path: str | Path, exif_transpose: bool = False) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB: grayscale, palette, RGBA and 16-bit included.

    Args:
        exif_transpose: rotate as the EXIF orientation says (for user photos at prediction
            time). Datasets leave it off: refer annotations are in the stored pixel frame.

    Raises:
        BadSampleError: missing, unreadable or truncated file (naming the path).
    """
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"cannot read image {path}: {err}") from err


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask from polygons, uncompressed RLE or compressed RLE."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


class ReferDataset:
    """Sentences of one split of a refer-format dataset.

    Args:
        root: folder holding `<dataset>/` and `images/`.
        dataset: refcoco, refcoco+, refcocog, refclef or shapes.
        split: a split of `SPLITS[dataset][split_by]`.
        split_by: unc, umd, google or berkeley; None takes the dataset's default.
        skip_invalid: drop bad samples with one counted warning instead of raising.
        transform: callable on the sample dict returned by `load` (None returns it raw).
        cache: keep decoded images and masks in memory after their first load (each loader
            worker holds its own copy: for small datasets such as shapes, ~0.3 GB).
        categories: add each sample's category map ("categories", see the module docstring),
            the target of the auxiliary segmentation loss.
    """

    def __init__(self, root: str | Path, dataset: str, split: str, split_by: str | None = None,
                 skip_invalid: bool = False, transform=None, cache: bool = False, categories: bool = False) -> None:
        if dataset not in SPLITS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(SPLITS)}")
        split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        if split_by not in SPLITS[dataset]:
            raise ValueError(f"{dataset} has no splitBy {split_by!r}; expected one of {', '.join(SPLITS[dataset])}")
        if split not in SPLITS[dataset][split_by]:
            raise ValueError(f"{dataset}({split_by}) has no split {split!r}; "
                             f"expected one of {', '.join(SPLITS[dataset][split_by])}")
        self.root, self.dataset, self.split, self.split_by = Path(root), dataset, split, split_by
        self.skip_invalid = skip_invalid
        self.transform = transform
        self.skipped = 0
        self._cache: dict | None = {} if cache else None
        refs_path = self.root / dataset / f"refs({split_by}).p"
        inst_path = self.root / dataset / "instances.json"
        self.image_dir = self.root / IMAGE_DIRS[dataset]
        for p in (refs_path, inst_path, self.image_dir):
            if not p.exists():
                hint = "run `vglaw data shapes --out ROOT`" if dataset == "shapes" else HOW_TO_GET
                raise FileNotFoundError(f"{dataset}: expected {p} ({hint})")
        refs = plain_load(refs_path)
        with open(inst_path) as f:
            inst = json.load(f)
        self.images = {im["id"]: im for im in inst["images"]}
        self.anns = {a["id"]: a for a in inst["annotations"]}
        self.with_categories = categories
        if categories:
            self.category_ids = self._category_ids(inst, inst_path)
            self._category_value = {c: k + 1 for k, c in enumerate(self.category_ids)}
            self.image_anns: dict[int, list[dict]] = {}
            for a in inst["annotations"]:
                self.image_anns.setdefault(a["image_id"], []).append(a)
        self.samples = self._index(refs, refs_path, inst_path)

    @staticmethod
    def _category_ids(inst: dict, inst_path: Path) -> list[int]:
        """Category ids in rank order (map value - 1); COCO's 80 ids run from 1 to 90 with gaps."""
        if "categories" not in inst:
            raise KeyError(f"{inst_path} has no 'categories' list, which the category maps need")
        ids = sorted(int(c["id"]) for c in inst["categories"])
        if len(ids) >= IGNORE:
            raise ValueError(f"{inst_path} has {len(ids)} categories; category maps hold at most {IGNORE - 1}")
        known = set(ids)
        for a in inst["annotations"]:
            if a.get("category_id") not in known:
                raise ValueError(f"annotation {a.get('id')} in {inst_path} has category_id {a.get('category_id')}, "
                                 f"which is not in its categories list")
        return ids

    @property
    def num_categories(self) -> int:
        """Classes of the category map, background included (the model's `seg_classes`)."""
        return len(self.category_ids) + 1

    def category_map(self, image_id: int, height: int, width: int) -> np.ndarray:
        """(H, W) uint8: every annotation of the image painted by decreasing box area, so a small
        object lying on a large one stays visible; crowd regions last, as IGNORE."""
        out = np.zeros((height, width), dtype=np.uint8)
        anns = sorted(self.image_anns.get(image_id, []),
                      key=lambda a: (bool(a.get("iscrowd")), -a["bbox"][2] * a["bbox"][3]))
        for a in anns:
            value = IGNORE if a.get("iscrowd") else self._category_value[a["category_id"]]
            out[ann_to_mask(a, height, width).astype(bool)] = value
        return out

    def _reject(self, message: str, problems: list[str]) -> None:
        if not self.skip_invalid:
            raise BadSampleError(message)
        problems.append(message)

    def _index(self, refs: list, refs_path: Path, inst_path: Path) -> list[Sample]:
        samples: list[Sample] = []
        problems: list[str] = []
        for ref in refs:
            if ref.get("split") != self.split:
                continue
            ann = self.anns.get(ref["ann_id"])
            if ann is None:
                self._reject(f"ref {ref['ref_id']} in {refs_path} names annotation {ref['ann_id']}, "
                             f"which is not in {inst_path}", problems)
                continue
            image = self.images.get(ann["image_id"])
            if image is None:
                self._reject(f"annotation {ann['id']} names image {ann['image_id']}, which is not in {inst_path}",
                             problems)
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w < 1 or h < 1:
                self._reject(f"annotation {ann['id']} (ref {ref['ref_id']}) has a degenerate box "
                             f"{[x, y, w, h]} (w or h < 1 px)", problems)
                continue
            for sent in ref["sentences"]:
                text = str(sent.get("sent", "")).strip()
                if not text:
                    self._reject(f"sentence {sent.get('sent_id')} of ref {ref['ref_id']} is empty", problems)
                    continue
                samples.append(Sample(len(samples), ref["ref_id"], sent["sent_id"], ann["id"], image["id"],
                                      " ".join(text.split()), self.image_dir / image["file_name"], (x, y, w, h)))
        if problems:
            self.skipped += len(problems)
            warnings.warn(f"{self.dataset} {self.split}: skipped {len(problems)} bad samples; first: {problems[0]}",
                          stacklevel=2)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict:
        """The raw sample: image (H, W, 3) uint8, text, box [x, y, w, h], mask (H, W) uint8, ids
        [, category map (H, W) uint8]."""
        s = self.samples[index]
        image = self._cached(("image", s.image_id), lambda: self._load_image(s))
        mask = self._cached(("mask", s.ann_id), lambda: ann_to_mask(self.anns[s.ann_id], *image.shape[:2]))
        out = {"image": image, "text": s.text, "bbox": np.array(s.bbox, dtype=np.float32), "mask": mask,
               "index": s.index, "ref_id": s.ref_id, "sent_id": s.sent_id, "image_id": s.image_id}
        if self.with_categories:
            out["categories"] = self._cached(("categories", s.image_id),
                                             lambda: self.category_map(s.image_id, *image.shape[:2]))
        return out

    def _load_image(self, s: Sample) -> np.ndarray:
        image = load_rgb(s.image_path)
        info = self.images[s.image_id]
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise BadSampleError(f"{s.image_path} is {w}x{h} but instances.json says "
                                 f"{info['width']}x{info['height']} (image {s.image_id})")
        return image

    def _cached(self, key: tuple, load) -> np.ndarray:
        """`load()`, remembered under `key` when caching; callers get a copy they may change."""
        if self._cache is None:
            return load()
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key].copy()

    def __getitem__(self, index: int) -> dict:
        try:
            sample = self.load(index)
        except BadSampleError as err:
            if not self.skip_invalid:
                raise
            self.skipped += 1
            warnings.warn(f"skipped bad sample ({self.skipped} so far in this process): {err}", stacklevel=2)
            return self[(index + 1) % len(self)]
        return self.transform(sample) if self.transform else sample

    def counts(self) -> dict[str, int]:
        return {"sentences": len(self.samples), "refs": len({s.ref_id for s in self.samples}),
                "images": len({s.image_id for s in self.samples})}
