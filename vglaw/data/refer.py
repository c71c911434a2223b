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

from vglaw.data.text import clean_text
from vglaw.errors import MissingFileError, UsageError, UserError
from vglaw.io.safe_pickle import plain_load

SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"unc": ("train", "val", "testA", "testB")},
    "refcoco+": {"unc": ("train", "val", "testA", "testB")},
    "refcocog": {"umd": ("train", "val", "test"), "google": ("train", "val")},
    "refclef": {"unc": ("train", "val", "testA", "testB", "testC"), "berkeley": ("train", "val", "test")},
    "shapes": {"unc": ("train", "val", "test")},
    # Generalised grounding (zero, one or many referred objects), gRefCOCO's format: `vglaw.data.grefer`.
    "grefcoco": {"unc": ("train", "val", "testA", "testB")},
    "gshapes": {"unc": ("train", "val", "test")},
    # Your own data, imported by `vglaw data import` (`vglaw.data.importing`), in gRefCOCO's format.
    "custom": {"unc": ("train", "val", "test")},
}
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc", "shapes": "unc",
                    "grefcoco": "unc", "gshapes": "unc", "custom": "unc"}
GENERALISED = ("grefcoco", "gshapes")  # datasets of expressions naming 0..N objects: generalised models only
GREFS_FORMAT = (*GENERALISED, "custom")  # stored in gRefCOCO's format; custom is read for either kind of model
IMAGE_DIRS = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
    "shapes": "images/shapes",
    "grefcoco": "images/mscoco/images/train2014",
    "gshapes": "images/gshapes",
    "custom": "images/custom",  # a link to the imported images' folder
}
HOW_TO_GET = "see data/README.md for where to download it and the expected layout"
IGNORE = 255  # category-map value of crowd regions: no loss there


def category_count(root: str | Path, dataset: str) -> int:
    """Classes of `dataset`'s category maps: its instances.json categories + 1 for background."""
    path = Path(root) / dataset / "instances.json"
    if not path.is_file():
        raise MissingFileError(f"{dataset}: expected {path} ({HOW_TO_GET})")
    with open(path) as f:
        categories = json.load(f).get("categories")
    if not isinstance(categories, list) or not categories:
        raise UsageError(f"{path} has no 'categories' list, which the category maps need")
    return len(categories) + 1


class BadSampleError(UserError, ValueError):
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


MAX_IMAGE_PIXELS = 250_000_000  # images above this are refused (a 16k x 16k photo is 268 MP)


def _to_uint8(img: Image.Image, path: str | Path) -> np.ndarray:
    """A single-channel 16-bit, 32-bit integer or float image as (H, W, 3) uint8, or refused.

    16-bit images use their full range; 32-bit integers must hold 8- or 16-bit values; floats
    must lie in [0, 1] (or [0, 255]). Anything else has no unambiguous brightness.
    """
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise BadSampleError(f"cannot use image {path}: its float pixels include NaN or infinity")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        peak = 65535.0
    else:  # "F" (floats, in [0, 1] or [0, 255]) or "I" (32-bit integers, in 8- or 16-bit range)
        kind, peaks = ("float", (1.0, 255.0)) if img.mode == "F" else ("32-bit", (255.0, 65535.0))
        peak = next((p for p in peaks if lo >= 0 and hi <= p), None)
        if peak is None:
            raise BadSampleError(f"cannot use image {path}: {kind} pixels in [{lo:g}, {hi:g}], expected [0, "
                                 f"{peaks[0]:g}] or [0, {peaks[1]:g}]; save it as an 8-bit image")
    arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=2)


def load_rgb(path: str | Path, exif_transpose: bool = False, max_side: int | None = None) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB: grayscale, palette, RGBA, 16-bit, 32-bit integer and
    float images included.

    Args:
        exif_transpose: rotate as the EXIF orientation says (for user photos at prediction
            time). Datasets leave it off: refer annotations are in the stored pixel frame.
        max_side: decode (JPEG: at a reduced scale) and shrink so the longer side is at most
            this; `original_size` tells the full size. None keeps every pixel.

    Raises:
        BadSampleError: missing, unreadable, truncated, too large or ambiguous file (naming it).
    """
    return load_image(path, exif_transpose, max_side)[0]


def load_image(path: str | Path, exif_transpose: bool = False,
               max_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_rgb`, plus the image's full (height, width) after the EXIF rotation."""
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL refuses larger ones (DecompressionBombError)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise BadSampleError(f"cannot use image {path}: {w}x{h} is {w * h / 1e6:.0f} MP, over the "
                                     f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit; downscale it first")
            if exif_transpose and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w  # rotated by 90 degrees for display
            if max_side and max(img.size) > max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale, still >= max_side
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return rgb_array(img, path, max_side), (h, w)
    except BadSampleError:
        raise
    except FileNotFoundError as err:
        raise BadSampleError(f"image not found: {path}") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSampleError(f"cannot read image {path}: {err}") from err


def rgb_array(img: Image.Image, source: str | Path, max_side: int | None = None) -> np.ndarray:
    """A loaded PIL image -> (H, W, 3) uint8, at most `max_side` on its longer side: 16-bit, 32-bit
    and float pixels mapped by their range (`_to_uint8`), transparency composited on white. The
    one conversion for files and for images handed over in memory."""
    if max_side and max(img.size) > max_side:
        ratio = max_side / max(img.size)
        size = (max(1, round(img.width * ratio)), max(1, round(img.height * ratio)))
        img = img.resize(size, Image.BILINEAR, reducing_gap=2.0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_uint8(img, source)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


def read_instances(path: Path) -> dict:
    """instances.json with its `images` and `annotations` lists checked.

    Raises:
        UsageError: not JSON, or a required list missing.
    """
    try:
        with open(path, encoding="utf-8") as f:
            inst = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(inst, dict):
        raise UsageError(f"{path}: expected a COCO-style object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(inst.get(key), list):
            raise UsageError(f"{path}: no '{key}' list (a COCO-style instances file needs 'images' and "
                             "'annotations')")
    for im in inst["images"]:
        if not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= set(im):
            raise UsageError(f"{path}: an image entry lacks id / file_name / height / width: {str(im)[:120]}")
    for a in inst["annotations"]:
        if not isinstance(a, dict) or "id" not in a or "image_id" not in a:
            raise UsageError(f"{path}: an annotation lacks id / image_id: {str(a)[:120]}")
    return inst


def rle_run_lengths(counts: str | list) -> list[int]:
    """The run lengths of an RLE's counts: a list of ints as it is, or COCO's compressed string
    decoded as pycocotools' `rleFrString` does (6-bit groups from chr(48), 5 bits of value, a
    continuation bit, a sign bit; from the third run on, each value is a difference to the run
    two before).

    Raises:
        ValueError: a character outside COCO's alphabet, a number cut off, or a non-integer.
    """
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("its RLE counts hold values that are not integers")
        return counts
    if not isinstance(counts, str):
        raise ValueError(f"its RLE counts are a {type(counts).__name__}, not a list or a string")
    runs: list[int] = []
    x, shift, more = 0, 0, False
    for ch in counts:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"its RLE counts hold {ch!r}, not a character of COCO's compressed RLE")
        x |= (c & 0x1F) << shift
        shift += 5
        more = bool(c & 0x20)
        if not more:
            if c & 0x10:
                x |= -1 << shift
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
            x, shift = 0, 0
    if more:
        raise ValueError("its RLE counts end in the middle of a number")
    return runs


def segmentation_problem(ann: dict, image: dict) -> str | None:
    """What is wrong with an annotation's segmentation for its image, or None.

    Polygons need at least three points (6 numbers) each; an RLE's size must be the image's and
    its run lengths must be non-negative and cover exactly that many pixels.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            return "its segmentation is an empty polygon list"
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                return f"a polygon has {n} numbers (a polygon needs at least 6, an even count)"
        return None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        if size != [int(image["height"]), int(image["width"])]:
            return (f"its RLE mask is {size[1]}x{size[0]} but image {image['id']} is "
                    f"{image['width']}x{image['height']}")
        try:
            runs = rle_run_lengths(seg["counts"])
        except ValueError as err:
            return str(err)
        if any(r < 0 for r in runs):
            return "its RLE counts hold a negative run length"
        if sum(runs) != size[0] * size[1]:
            return (f"its RLE counts cover {sum(runs)} pixels but its {size[1]}x{size[0]} size has "
                    f"{size[0] * size[1]}")
        return None
    return "no segmentation (polygons or RLE)"


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
            raise UsageError(f"unknown dataset {dataset!r}; expected one of {', '.join(SPLITS)}")
        split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        if split_by not in SPLITS[dataset]:
            raise UsageError(f"{dataset} has no splitBy {split_by!r}; expected one of {', '.join(SPLITS[dataset])}")
        if split not in SPLITS[dataset][split_by]:
            raise UsageError(f"{dataset}({split_by}) has no split {split!r}; "
                             f"expected one of {', '.join(SPLITS[dataset][split_by])}")
        self.root, self.dataset, self.split, self.split_by = Path(root), dataset, split, split_by
        self.skip_invalid = skip_invalid
        self.transform = transform
        self.skipped = 0
        self._cache: dict | None = {} if cache else None
        refs_path = self.root / dataset / self.refs_file(split_by)
        inst_path = self.root / dataset / "instances.json"
        self.image_dir = self.root / IMAGE_DIRS[dataset]
        for p in (refs_path, inst_path, self.image_dir):
            if not p.exists():
                hint = (f"run `vglaw data shapes --out {self.root}{' --generalised' if dataset == 'gshapes' else ''}`"
                        if dataset in ("shapes", "gshapes") else HOW_TO_GET)
                raise MissingFileError(f"{dataset}: expected {p} ({hint})")
        refs = self.read_refs(refs_path)
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise UsageError(f"{refs_path}: expected a list of refs (dicts), got {type(refs).__name__}")
        inst = read_instances(inst_path)
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
    def refs_file(split_by: str) -> str:
        return f"refs({split_by}).p"

    @staticmethod
    def read_refs(path: Path):
        return plain_load(path)

    @staticmethod
    def _category_ids(inst: dict, inst_path: Path) -> list[int]:
        """Category ids in rank order (map value - 1); COCO's 80 ids run from 1 to 90 with gaps."""
        if "categories" not in inst:
            raise UsageError(f"{inst_path} has no 'categories' list, which the category maps need")
        ids = sorted(int(c["id"]) for c in inst["categories"])
        if len(ids) >= IGNORE:
            raise UsageError(f"{inst_path} has {len(ids)} categories; category maps hold at most {IGNORE - 1}")
        known = set(ids)
        for a in inst["annotations"]:
            if a.get("category_id") not in known:
                raise UsageError(f"annotation {a.get('id')} in {inst_path} has category_id {a.get('category_id')}, "
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
        if not isinstance(refs, list):
            raise UsageError(f"{refs_path}: holds a {type(refs).__name__}, not a list of refs")
        for k, ref in enumerate(refs):
            if not isinstance(ref, dict):
                self._reject(f"entry {k} of {refs_path} is a {type(ref).__name__}, not a ref", problems)
                continue
            if ref.get("split") != self.split:
                continue
            try:
                samples.extend(self._ref_samples(ref, refs_path, inst_path, problems, first_index=len(samples)))
            except BadSampleError as err:
                self._reject(str(err), problems)
            except (TypeError, ValueError, KeyError, AttributeError) as err:
                # a field of the wrong type (an id that is a list, a number that is a string,
                # sentences that are None): one line naming the ref, whatever field it is
                self._reject(f"ref {ref.get('ref_id')!r} in {refs_path} (or its annotation in {inst_path}) is "
                             f"malformed: {type(err).__name__}: {err}", problems)
        self._report_skipped(problems)
        return samples

    def _ref_samples(self, ref: dict, refs_path: Path, inst_path: Path, problems: list[str],
                     first_index: int) -> list[Sample]:
        """One ref's samples, or `BadSampleError` naming what is wrong with it."""
        missing = [k for k in ("ref_id", "ann_id", "sentences") if k not in ref]
        if missing:
            raise BadSampleError(f"a ref in {refs_path} (ref_id {ref.get('ref_id')}) lacks {', '.join(missing)}")
        for key in ("ref_id", "ann_id"):
            if not isinstance(ref[key], int) or isinstance(ref[key], bool):
                raise BadSampleError(f"ref {ref['ref_id']!r} in {refs_path}: {key} is {ref[key]!r}, not an integer id")
        if not isinstance(ref["sentences"], list):
            raise BadSampleError(f"ref {ref['ref_id']} in {refs_path}: sentences is {type(ref['sentences']).__name__}, "
                                 "not a list")
        ann = self.anns.get(ref["ann_id"])
        if ann is None:
            raise BadSampleError(f"ref {ref['ref_id']} in {refs_path} names annotation {ref['ann_id']}, "
                                 f"which is not in {inst_path}")
        image = self.images.get(ann["image_id"]) if isinstance(ann["image_id"], int) else None
        if image is None:
            raise BadSampleError(f"annotation {ann['id']} names image {ann['image_id']!r}, which is not in {inst_path}")
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise BadSampleError(f"annotation {ann['id']} (ref {ref['ref_id']}) in {inst_path} has no [x, y, w, h] "
                                 "bbox") from None
        if not (w >= 1 and h >= 1):
            raise BadSampleError(f"annotation {ann['id']} (ref {ref['ref_id']}) has a degenerate box "
                                 f"{[x, y, w, h]} (w or h < 1 px)")
        problem = segmentation_problem(ann, image)
        if problem:
            raise BadSampleError(f"annotation {ann['id']} (ref {ref['ref_id']}) in {inst_path}: {problem}")
        if not isinstance(image.get("file_name"), str):
            raise BadSampleError(f"image {image['id']} in {inst_path} has no file_name")
        return [Sample(first_index + i, ref["ref_id"], sent_id, ann["id"], image["id"], text,
                       self.image_dir / image["file_name"], (x, y, w, h))
                for i, (sent_id, text) in enumerate(self._sentences(ref, refs_path, problems))]

    def _sentences(self, ref: dict, refs_path: Path, problems: list[str]):
        """(sent_id, cleaned text) of each of `ref`'s sentences; an empty one (or one of control
        and invisible characters only) is rejected (`_reject`)."""
        for sent in ref["sentences"]:
            raw = sent.get("sent", "") if isinstance(sent, dict) else ""
            text = clean_text(raw) if isinstance(raw, str) else ""
            sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
            if not text:
                self._reject(f"sentence {sent_id} of ref {ref['ref_id']} in {refs_path} is empty (or only "
                             "control or invisible characters)", problems)
                continue
            yield sent_id, text

    def _report_skipped(self, problems: list[str]) -> None:
        """Keep the skipped samples' problems, count them and warn once (`skip_invalid`)."""
        self.problems = problems
        if problems:
            self.skipped += len(problems)
            warnings.warn(f"{self.dataset} {self.split}: skipped {len(problems)} bad samples; first: {problems[0]}",
                          stacklevel=3)

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
