"""Your own data in: the formats people annotate in, converted into the gRefCOCO-style pair
every command reads (`vglaw data import`).

    <out>/custom/grefs(unc).json   one ref per (image, set of referred regions); its expressions
                                   are the ref's sentences; `ann_id` [-1] for "names nothing"
    <out>/custom/instances.json    the images (file names relative to images/custom) and every
                                   referred region (box, and polygon or RLE mask; a box alone
                                   becomes its rectangle)
    <out>/images/custom            a link to the images folder: images are referenced, not copied

Readers (`vglaw.data.formats`) turn each input into `Record`s: one expression, its image and
the regions it refers to. Whatever the format, the same expression on several regions of one
image is one expression with several targets (as gRefCOCO stores it). Splits are by image: the
input's own, or seeded fractions. A bad record is one error naming its file and line or id,
or, with `skip_invalid`, a skip counted by reason.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vglaw.data.refer import MAX_IMAGE_PIXELS, rle_run_lengths
from vglaw.data.text import clean_text
from vglaw.errors import UsageError
from vglaw.io.atomic import atomic_dir

DATASET = "custom"
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test shares of the images when the input gives no split
EDGE_TOLERANCE = 0.5  # px a coordinate may pass the image's edge (rounding of percent or float boxes); clipped


class BadRecordError(UsageError):
    """A record that cannot be imported: its file and line or id, and what is wrong."""


@dataclass(frozen=True)
class Region:
    """One referred object: its box and, when the input has one, its outline.

    box: x, y, w, h in pixels of the stored image.
    segmentation: COCO polygons ([[x1, y1, x2, y2, ...], ...]) or an RLE dict; None: the box.
    """

    box: tuple[float, float, float, float]
    segmentation: Any = None

    def key(self) -> str:
        """Identity within an image: the same box and outline is the same region."""
        return json.dumps([[round(v, 2) for v in self.box], self.segmentation], sort_keys=True)

    def coco_segmentation(self) -> Any:
        if self.segmentation is not None:
            return self.segmentation
        x, y, w, h = self.box
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@dataclass
class Record:
    """One expression as the input gives it."""

    image: Path  # the image file
    text: str
    regions: list[Region]  # empty: the expression names nothing in the image
    where: str  # "file:line" or "file, task 12": how errors name it
    split: str | None = None
    spoiled: bool = False  # a region of this expression was rejected: the whole expression is left out


@dataclass
class Problems:
    """Bad records: raised (`BadRecordError`), or with `skip_invalid` counted by reason."""

    skip_invalid: bool = False
    reasons: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def reject(self, reason: str, message: str) -> None:
        if not self.skip_invalid:
            raise BadRecordError(message)
        self.note(reason, message)

    def note(self, reason: str, message: str = "") -> None:
        """Count something left out that is not an error (e.g. a task nobody annotated)."""
        self.reasons[reason] += 1
        self.first.setdefault(reason, message)


class ImageFiles:
    """Image files found by path or name and their sizes, each read once (the header only)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._sizes: dict[Path, tuple[int, int] | str] = {}
        self._by_name: dict[str, list[Path]] | None = None

    def by_name(self, name: str) -> list[Path]:
        """Every file under the root named `name` (resolved)."""
        if self.root is None:
            return []
        if self._by_name is None:
            self._by_name = {}
            for p in sorted(self.root.rglob("*")):
                if p.is_file():
                    self._by_name.setdefault(p.name, []).append(p.resolve())
        return self._by_name.get(name, [])

    def resolve(self, path: str, relative_to: Path | None = None) -> Path:
        """`path` as given, resolved (one file has one name, whatever the spelling): absolute,
        or relative to the images root (else to `relative_to`)."""
        p = Path(path).expanduser()
        if not p.is_absolute():
            base = self.root if self.root is not None else relative_to
            p = (base / p) if base is not None else p
        return p.resolve()

    def size(self, path: Path) -> tuple[int, int] | str:
        """(width, height), or what makes the file unusable: missing, not an image, or turned by
        an EXIF orientation (annotation tools show, and annotate, the turned picture, while
        datasets are read in the stored pixel frame)."""
        if path not in self._sizes:
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            try:
                with Image.open(path) as img:
                    turned = img.getexif().get(0x0112, 1) not in (None, 1)
                    self._sizes[path] = (f"{path} has an EXIF orientation (it is shown turned); save it with the "
                                         "rotation applied (e.g. `mogrify -auto-orient`) and annotate that"
                                         if turned else img.size)
            except FileNotFoundError:
                self._sizes[path] = f"image not found: {path}"
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                self._sizes[path] = f"cannot read image {path}: {err}"
        return self._sizes[path]


def xyxy_region(coords: Any, size: tuple[int, int], where: str, problems: Problems,
                segmentation: Any = None) -> Region | None:
    """A region from an [x1, y1, x2, y2] pixel box checked against the image (`size` (w, h)):
    inside it (within `EDGE_TOLERANCE`, then clipped), finite, at least a pixel wide and high."""
    try:
        x1, y1, x2, y2 = (float(v) for v in coords)
    except (TypeError, ValueError):
        problems.reject("malformed box", f"{where}: a box must be [x1, y1, x2, y2] in pixels, got {coords!r}")
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        problems.reject("malformed box", f"{where}: box {[x1, y1, x2, y2]} holds NaN or infinity")
        return None
    w, h = size
    if min(x1, y1) < -EDGE_TOLERANCE or x2 > w + EDGE_TOLERANCE or y2 > h + EDGE_TOLERANCE:
        problems.reject("box outside the image", f"{where}: box {[x1, y1, x2, y2]} lies outside the {w}x{h} image")
        return None
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if not (x2 - x1 >= 1 and y2 - y1 >= 1):
        problems.reject("zero-area box", f"{where}: box {[x1, y1, x2, y2]} is narrower than a pixel (datasets need "
                                         "w and h >= 1 px)")
        return None
    return Region((x1, y1, x2 - x1, y2 - y1), segmentation)


def polygon_region(polygons: Any, size: tuple[int, int], where: str, problems: Problems) -> Region | None:
    """A region from COCO polygons ([[x1, y1, x2, y2, ...], ...] or one flat list) in pixels:
    each of three points or more, inside the image; the box is their bounds."""
    if isinstance(polygons, list) and polygons and all(isinstance(v, (int, float)) for v in polygons):
        polygons = [polygons]
    if not (isinstance(polygons, list) and polygons and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            for p in polygons)):
        problems.reject("malformed polygon", f"{where}: a polygon must list at least 3 points as [x1, y1, x2, y2, "
                                             f"...] in pixels, got {str(polygons)[:80]}")
        return None
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    w, h = size
    clipped = [[min(max(v, 0.0), float(w if i % 2 == 0 else h)) for i, v in enumerate(p)] for p in polygons]
    return xyxy_region((min(xs), min(ys), max(xs), max(ys)), size, where, problems, clipped)


def rle_region(rle: Any, size: tuple[int, int], where: str, problems: Problems) -> Region | None:
    """A region from a COCO RLE of the image's size; the box is the mask's bounds."""
    from pycocotools import mask as mask_utils  # only when an input holds RLE masks

    w, h = size
    if not (isinstance(rle, dict) and "counts" in rle and isinstance(rle.get("size"), list)
            and len(rle["size"]) == 2):
        problems.reject("malformed mask", f"{where}: mask_rle must be a COCO RLE {{\"size\": [h, w], \"counts\": ...}}")
        return None
    if list(rle["size"]) != [h, w]:
        problems.reject("mask size disagrees", f"{where}: the RLE mask is {rle['size'][1]}x{rle['size'][0]} but the "
                                               f"image is {w}x{h}")
        return None
    try:
        runs = rle_run_lengths(rle["counts"])
    except ValueError as err:
        problems.reject("malformed mask", f"{where}: {err}")
        return None
    if any(r < 0 for r in runs) or sum(runs) != w * h:
        problems.reject("malformed mask", f"{where}: the RLE's run lengths do not cover the {w}x{h} image")
        return None
    counts = rle["counts"]
    coded = mask_utils.frPyObjects(rle, h, w) if isinstance(counts, list) else \
        {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(coded))
    if bw <= 0 or bh <= 0:
        problems.reject("empty mask", f"{where}: the mask is empty")
        return None
    stored = {"size": [h, w], "counts": counts if isinstance(counts, (list, str)) else counts.decode("ascii")}
    return Region((x, y, bw, bh), stored)


def checked_image(path: Path, images: ImageFiles, where: str, problems: Problems,
                  stated: tuple[Any, Any] | None = None, what: str = "the record") -> tuple[int, int] | None:
    """The image's (width, height), or None after rejecting a missing, unreadable or
    EXIF-turned file, or a stated size (width, height) that disagrees with the file."""
    size = images.size(path)
    if isinstance(size, str):
        reason = "EXIF-rotated image" if "EXIF" in size else "missing image"
        problems.reject(reason, f"{where}: {size}")
        return None
    if stated is not None and any(v is not None for v in stated) and tuple(stated) != size:
        problems.reject("image size disagrees", f"{where}: {what} says the image is {stated[0]}x{stated[1]} but "
                                                f"{path} is {size[0]}x{size[1]}")
        return None
    return size


def expression_text(raw: Any, where: str, problems: Problems) -> str | None:
    """The cleaned expression, or None after rejecting an empty one."""
    text = clean_text(raw) if isinstance(raw, str) else ""
    if not text:
        problems.reject("empty expression", f"{where}: the expression is empty")
        return None
    return text


def mask_polygons(mask, min_area: float = 1.0) -> list[list[float]]:
    """The outer outlines of a boolean (H, W) mask as flat [x1, y1, x2, y2, ...] polygons in
    pixel-corner coordinates (COCO's: pixel (i, j) spans [j, j+1] x [i, i+1]), for tools that
    want outlines. OpenCV traces the boundary pixels' centres; each vertex is pushed out half a
    pixel (mitred), so the polygon runs along the pixels' outer edges: a block comes back
    exactly, a round shape within a fraction of a pixel."""
    import cv2  # OpenCV comes with albumentations; only mask outlines need it

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        p = c.reshape(-1, 2).astype(np.float64) + 0.5  # boundary pixel centres, corner coordinates
        if len(p) < 3:  # a pixel or a one-pixel line: its bounding pixels' edges
            (x0, y0), (x1, y1) = p.min(0) - 0.5, p.max(0) + 0.5
            p = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        else:
            p = _grown(p, 0.5)
        p = np.clip(p, 0, [mask.shape[1], mask.shape[0]])  # a mitre at the image's edge stays on it
        x, y = p[:, 0], p[:, 1]
        if 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) >= min_area:
            out.append(p.reshape(-1).tolist())
    return out


def _grown(p: np.ndarray, d: float) -> np.ndarray:
    """The closed polygon `p` (N, 2) with each vertex moved `d` outward along its mitre
    (the mitre capped at 2d for sharp corners)."""
    x, y = p[:, 0], p[:, 1]
    sign = 1.0 if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) > 0 else -1.0
    e_in, e_out = p - np.roll(p, 1, axis=0), np.roll(p, -1, axis=0) - p  # edges into and out of each vertex

    def normal(e: np.ndarray) -> np.ndarray:  # outward unit normal of each edge
        n = sign * np.stack([e[:, 1], -e[:, 0]], axis=1)
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)

    n_in, n_out = normal(e_in), normal(e_out)
    m = n_in + n_out
    cos = np.maximum(np.sum(m * n_in, axis=1, keepdims=True), 1e-12)
    step = m / cos * d
    length = np.linalg.norm(step, axis=1, keepdims=True)
    return p + step * np.minimum(1.0, 2 * d / np.maximum(length, 1e-12))


# ---- from records to the dataset --------------------------------------------------------


@dataclass
class Imported:
    """What an import wrote: per split, images, expressions and targets per expression; and the
    skips by reason."""

    out: Path
    splits: dict[str, dict[str, Any]]
    skipped: Counter
    first_skip: dict[str, str]


def merge_records(records: list[Record], problems: Problems) -> dict[tuple[Path, str], Record]:
    """One record per (image, expression): the regions of all its records together (the same
    region once). An expression that names nothing in one record and something in another
    contradicts itself: rejected."""
    merged: dict[tuple[Path, str], Record] = {}
    spoiled = {(r.image, r.text) for r in records if r.spoiled}
    for key in spoiled & {(r.image, r.text) for r in records if not r.spoiled}:  # other regions left out with it
        problems.note("expression with a rejected region", f"{key[0]}: {key[1]!r} (left out whole, not with fewer "
                                                           "targets)")
    for r in records:
        key = (r.image, r.text)
        if key in spoiled:
            continue
        if key not in merged:
            merged[key] = Record(r.image, r.text, list(r.regions), r.where, r.split)
            continue
        m = merged[key]
        if bool(m.regions) != bool(r.regions):
            problems.reject("contradictory expression",
                            f"{r.where}: {r.text!r} names {'nothing' if not r.regions else 'a region'} in {r.image}, "
                            f"but {m.where} says {'it names nothing' if not m.regions else 'it names a region'}")
            continue
        if r.split and m.split and r.split != m.split:
            problems.reject("image in two splits", f"{r.where}: {r.image} is in split {r.split!r} here and in "
                                                   f"{m.split!r} at {m.where}")
            continue
        known = {g.key() for g in m.regions}
        m.regions += [g for g in r.regions if g.key() not in known]
        m.split = m.split or r.split
    return merged


def assign_splits(merged: dict[tuple[Path, str], Record], seed: int, problems: Problems) -> dict[Path, str]:
    """The split of every image: the input's (a record giving an image a second split, or an
    unknown one, is rejected and dropped from `merged`), or, for images without one, a seeded
    draw by `FRACTIONS` (val and test get at least one image each when there are three images
    or more)."""
    given: dict[Path, str] = {}
    for key, r in list(merged.items()):
        if r.split is None:
            continue
        if r.split not in SPLITS:
            problems.reject("unknown split", f"{r.where}: split {r.split!r} is not one of {', '.join(SPLITS)}")
            del merged[key]
        elif given.setdefault(r.image, r.split) != r.split:
            problems.reject("image in two splits", f"{r.where}: {r.image} is in split {r.split!r} here and in "
                                                   f"{given[r.image]!r} elsewhere")
            del merged[key]
    free = sorted({r.image for r in merged.values()} - set(given))
    random.Random(seed).shuffle(free)
    n_val = max(1 if len(free) >= 3 else 0, round(FRACTIONS[1] * len(free)))
    n_test = max(1 if len(free) >= 3 else 0, round(FRACTIONS[2] * len(free)))
    drawn = {p: ("val" if i < n_val else "test" if i < n_val + n_test else "train") for i, p in enumerate(free)}
    return {**drawn, **given}


def write_dataset(records: list[Record], out: str | Path, images_root: Path, problems: Problems,
                  seed: int = 0, overwrite: bool = False) -> Imported:
    """Merge, split and write the records as `<out>/custom` (module docstring).

    Raises:
        UsageError: `<out>/custom` exists and not `overwrite`, or no record is left.
    """
    out = Path(out)
    folder, link = out / DATASET, out / "images" / DATASET
    images_in_place = check_out(out, images_root, overwrite)
    merged = merge_records(records, problems)
    split_of = assign_splits(merged, seed, problems)
    merged = {k: r for k, r in merged.items() if r.image in split_of}
    if not merged:
        raise UsageError("nothing to import: every record was skipped" if problems.reasons else
                         "nothing to import: the input holds no expressions")
    images: dict[Path, dict] = {}
    anns: dict[tuple[Path, str], dict] = {}
    groups: dict[tuple[Path, tuple[int, ...]], list[Record]] = defaultdict(list)
    sizes = ImageFiles(None)
    for r in sorted(merged.values(), key=lambda r: (str(r.image), r.text)):
        if r.image not in images:
            w, h = sizes.size(r.image)
            images[r.image] = {"id": len(images) + 1, "file_name": file_name(r.image, images_root),
                               "width": w, "height": h, "split": split_of[r.image]}
        ids = []
        for g in r.regions:
            key = (r.image, g.key())
            if key not in anns:
                anns[key] = {"id": len(anns) + 1, "image_id": images[r.image]["id"], "bbox": list(g.box),
                             "area": g.box[2] * g.box[3], "segmentation": g.coco_segmentation(),
                             "category_id": 1, "iscrowd": 0}
            ids.append(anns[key]["id"])
        groups[(r.image, tuple(sorted(ids)))].append(r)
    refs, sent_id = [], 0
    for (image, ids), group in groups.items():
        sentences = []
        for r in group:
            sent_id += 1
            sentences.append({"sent_id": sent_id, "sent": r.text, "raw": r.text})
        refs.append({"ref_id": len(refs) + 1, "image_id": images[image]["id"], "split": split_of[image],
                     "ann_id": list(ids) or [-1], "category_id": [1] * len(ids) or [-1],
                     "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]})
    instances = {"images": [{k: v for k, v in im.items() if k != "split"} for im in images.values()],
                 "annotations": list(anns.values()), "categories": [{"id": 1, "name": "object"}]}
    with atomic_dir(folder) as tmp:  # the pair whole or not at all: its ids point into each other
        (tmp / "instances.json").write_text(json.dumps(instances))
        (tmp / "grefs(unc).json").write_text(json.dumps(refs))
    if not images_in_place:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(images_root.resolve(), target_is_directory=True)
    return Imported(out, split_summary(refs, images), problems.reasons, problems.first)


def check_out(out: Path, images_root: Path, overwrite: bool) -> bool:
    """Check `--out` before any work: an earlier import there only with `overwrite`, and
    OUT/images/custom either free, a link, or the images folder itself (returns True then).

    Raises:
        UsageError: naming what is in the way.
    """
    folder, link = out / DATASET, out / "images" / DATASET
    images_in_place = link.is_dir() and not link.is_symlink() and link.resolve() == images_root.resolve()
    if link.exists() and not link.is_symlink() and not images_in_place:
        raise UsageError(f"--out {out}: {link} is a folder of its own; give it as --images, or another --out")
    if (folder.exists() or link.is_symlink()) and not overwrite:
        raise UsageError(f"--out {out}: {folder if folder.exists() else link} already holds an imported dataset; add "
                         "--overwrite to replace it, or give another --out")
    return images_in_place


def file_name(path: Path, root: Path) -> str:
    """The image's name relative to the images root, or its absolute path when it lies elsewhere."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def split_summary(refs: list[dict], images: dict[Path, dict]) -> dict[str, dict[str, Any]]:
    """Per split: images, expressions, and expressions by number of targets (0, 1, 2, 3+)."""
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        rows = [r for r in refs if r["split"] == split]
        targets = Counter(min(3, 0 if r["ann_id"] == [-1] else len(r["ann_id"])) for r in rows
                          for _ in r["sentences"])
        out[split] = {"images": sum(1 for im in images.values() if im["split"] == split),
                      "expressions": sum(len(r["sentences"]) for r in rows),
                      "targets": {k: targets.get(k, 0) for k in (0, 1, 2, 3)}}
    return out


def summary_table(result: Imported) -> str:
    """The summary `vglaw data import` prints."""
    lines = [f"{'split':<6} {'images':>7} {'expressions':>12} {'0 targets':>10} {'1':>6} {'2':>6} {'3+':>6}"]
    for split, c in result.splits.items():
        t = c["targets"]
        lines.append(f"{split:<6} {c['images']:>7} {c['expressions']:>12} {t[0]:>10} {t[1]:>6} {t[2]:>6} {t[3]:>6}")
    if result.skipped:
        lines.append("skipped:")
        for reason, n in result.skipped.most_common():
            first = result.first_skip[reason]
            lines.append(f"  {n:>6}  {reason}" + (f" (first: {first})" if first else ""))
    else:
        lines.append("skipped: none")
    return "\n".join(lines)
