"""Readers of the formats `vglaw data import` takes, each input -> `Record`s
(`vglaw.data.importing`), and `import_dataset`, which reads inputs and writes the dataset. The
field-by-field description of each format is in data/README.md.

- `jsonl`: one {"image", "text", "box" | "boxes", optional "polygon" | "mask_rle", "split"} per
  line; boxes [x1, y1, x2, y2] in pixels, "boxes": [] for an expression that names nothing.
- `odvg`: Open-GroundingDino's ODVG jsonl, visual-grounding records (`grounding.regions`).
- `mdetr`: MDETR's COCO-style refexp JSON: each image entry is one (image, caption) pair and
  its annotations are the referred objects (none: the caption names nothing).
- `labelstudio`: a Label Studio JSON export: rectangles (with rotation) or polygons in percent
  of the image, each with a per-region text area holding one or more expressions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from vglaw.data.importing import (
    SPLITS,
    BadRecordError,
    ImageFiles,
    Imported,
    Problems,
    Record,
    Region,
    check_out,
    checked_image,
    expression_text,
    polygon_region,
    rle_region,
    write_dataset,
    xyxy_region,
)
from vglaw.errors import MissingFileError, UsageError

MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError)  # a field of the wrong type or shape


def guarded(problems: Problems, where: str, read: Callable[..., list[Record]], *args: Any) -> list[Record]:
    """`read(*args)`'s records, or none after rejecting the record it reads as malformed: a field
    of the wrong type anywhere in it is one line naming the record, never a traceback."""
    try:
        return read(*args)
    except BadRecordError:
        raise
    except MALFORMED as err:
        problems.reject("malformed record", f"{where}: a field has the wrong type or shape "
                                            f"({type(err).__name__}: {str(err)[:120]})")
        return []


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err


def json_lines(path: Path, problems: Problems) -> Iterator[tuple[str, dict]]:
    """(where, object) of each non-blank line; a line that is not a JSON object (or not UTF-8)
    is rejected."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.reject("not JSON", f"{where}: not a JSON object ({getattr(err, 'msg', err)}; UTF-8 expected)")
                continue
            if not isinstance(obj, dict):
                problems.reject("not JSON", f"{where}: not a JSON object but {type(obj).__name__}")
                continue
            yield where, obj


def spoiled(image: Path, texts: list[str], where: str) -> list[Record]:
    """Markers that an expression lost a region to a rejected record: the merge then drops the
    whole expression rather than keep it with fewer targets than it names."""
    return [Record(image, t, [], where, spoiled=True) for t in texts if t]


def inside(outline: Region, box: Region, tolerance: float = 1.0) -> bool:
    """The outline's bounds lie within the box (to `tolerance` pixels)."""
    (x, y, w, h), (bx, by, bw, bh) = outline.box, box.box
    return bx - tolerance <= x and by - tolerance <= y and x + w <= bx + bw + tolerance and \
        y + h <= by + bh + tolerance


# ---- jsonl ------------------------------------------------------------------------------

JSONL_FIELDS = {"image", "text", "box", "boxes", "polygon", "mask_rle", "split"}


def read_jsonl(path: Path, images: ImageFiles, problems: Problems) -> Iterator[Record]:
    for where, obj in json_lines(path, problems):
        yield from guarded(problems, where, jsonl_record, obj, where, path, images, problems)


def jsonl_record(obj: dict, where: str, path: Path, images: ImageFiles, problems: Problems) -> list[Record]:
    unknown = sorted(set(obj) - JSONL_FIELDS)
    if unknown:
        problems.reject("unknown field", f"{where}: unknown field {', '.join(unknown)} (fields: "
                                         f"{', '.join(sorted(JSONL_FIELDS))})")
        return []
    if not isinstance(obj.get("image"), str) or ("box" in obj) == ("boxes" in obj):
        problems.reject("malformed record", f"{where}: needs \"image\" (a path) and exactly one of \"box\" or "
                                            "\"boxes\"")
        return []
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        problems.reject("unknown split", f"{where}: split {split!r} is not one of train, val, test")
        return []
    text = expression_text(obj.get("text"), where, problems)
    image = images.resolve(obj["image"], path.parent)
    size = checked_image(image, images, where, problems) if text else None
    if size is None:
        return []
    boxes = [obj["box"]] if "box" in obj else obj["boxes"]
    if not isinstance(boxes, list):
        problems.reject("malformed box", f"{where}: \"boxes\" must be a list of [x1, y1, x2, y2]")
        return []
    if "polygon" in obj and "mask_rle" in obj:
        problems.reject("malformed record", f"{where}: give \"polygon\" or \"mask_rle\", not both")
        return []
    outlines = obj.get("polygon", obj.get("mask_rle"))
    if outlines is None:
        outlines = [None] * len(boxes)
    elif "box" in obj:
        outlines = [outlines]
    elif not isinstance(outlines, list) or len(outlines) != len(boxes):
        problems.reject("malformed record", f"{where}: with \"boxes\", \"polygon\" / \"mask_rle\" must list "
                                            "one outline per box")
        return []
    regions = []
    for k, (box, outline) in enumerate(zip(boxes, outlines)):
        at = where if len(boxes) == 1 else f"{where}, box {k}"
        region = xyxy_region(box, size, at, problems)
        if region is None:
            return []
        if outline is not None:
            shaped = (polygon_region(outline, size, at, problems) if "polygon" in obj
                      else rle_region(outline, size, at, problems))
            if shaped is None:
                return []
            if not inside(shaped, region):
                problems.reject("outline outside its box", f"{at}: the outline's bounds {list(shaped.box)} (x, y, w, "
                                                           f"h) lie outside the box {box}")
                return []
            region = Region(region.box, shaped.segmentation)
        regions.append(region)
    return [Record(image, text, regions, where, split)]


# ---- ODVG -------------------------------------------------------------------------------


def read_odvg(path: Path, images: ImageFiles, problems: Problems) -> Iterator[Record]:
    """Visual-grounding records: {"filename", "height", "width", "grounding": {"caption",
    "regions": [{"bbox": [x1, y1, x2, y2], "phrase"}]}}; each region's phrase is an
    expression (regions sharing a phrase in one image become one expression with several
    targets when the records are merged)."""
    for where, obj in json_lines(path, problems):
        yield from guarded(problems, where, odvg_records, obj, where, path, images, problems)


def odvg_records(obj: dict, where: str, path: Path, images: ImageFiles, problems: Problems) -> list[Record]:
    grounding = obj.get("grounding")
    if grounding is None:
        kind = "a detection record (\"detection\")" if "detection" in obj else "no \"grounding\" field"
        problems.reject("not a grounding record", f"{where}: {kind}; vglaw imports ODVG's visual-grounding records")
        return []
    if not isinstance(obj.get("filename"), str) or not isinstance(grounding, dict) \
            or not isinstance(grounding.get("regions"), list):
        problems.reject("malformed record", f"{where}: an ODVG grounding record needs \"filename\" and "
                                            "\"grounding\": {\"regions\": [...]}")
        return []
    image = images.resolve(obj["filename"], path.parent)
    size = checked_image(image, images, where, problems, (obj.get("width"), obj.get("height")))
    if size is None:
        return []
    out = []
    for k, region in enumerate(grounding["regions"]):
        at = f"{where}, region {k}"
        if not isinstance(region, dict):
            problems.reject("malformed record", f"{at}: a region must be an object with \"bbox\" and \"phrase\"")
            continue
        text = expression_text(region.get("phrase"), at, problems)
        box = xyxy_region(region.get("bbox"), size, at, problems) if text else None
        out += [Record(image, text, [box], at)] if box is not None else spoiled(image, [text], at)
    return out


# ---- MDETR ------------------------------------------------------------------------------


def read_mdetr(path: Path, images: ImageFiles, problems: Problems) -> Iterator[Record]:
    """{"images": [{"id", "file_name", "height", "width", "caption"}], "annotations":
    [{"id", "image_id", "bbox": [x, y, w, h], "segmentation"?}]}: one expression per image entry."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UsageError(f"{path}: not MDETR's refexp format (a COCO-style object with \"images\" and "
                         "\"annotations\")")
    if data["images"] and not any(isinstance(im, dict) and "caption" in im for im in data["images"]):
        raise UsageError(f"{path}: its image entries carry no \"caption\": a COCO detection file, not MDETR's "
                         "refexp format")
    entries = {}
    for k, entry in enumerate(data["images"]):
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        where = f"{path}, image entry {entry_id if entry_id is not None else f'#{k}'}"
        if not isinstance(entry, dict) or not isinstance(entry_id, (int, str)) or isinstance(entry_id, bool):
            problems.reject("malformed record", f"{where}: an image entry needs an \"id\", \"file_name\" and "
                                                "\"caption\"")
        elif entry_id in entries:
            problems.reject("duplicate id", f"{where}: image entry id {entry_id!r} appears twice")
        else:
            entries[entry_id] = (where, entry)
    by_image: dict[Any, list[dict]] = {}
    seen_ann: set = set()
    for k, a in enumerate(data["annotations"]):
        ann_id = a.get("id") if isinstance(a, dict) else None
        at = f"{path}, annotation {ann_id if ann_id is not None else f'#{k}'}"
        image_id = a.get("image_id") if isinstance(a, dict) else None
        if not isinstance(ann_id, (int, str)) or isinstance(ann_id, bool) or not isinstance(image_id, (int, str)):
            problems.reject("malformed record", f"{at}: an annotation needs an \"id\" and an \"image_id\"")
        elif ann_id in seen_ann:
            problems.reject("duplicate id", f"{at}: annotation id {ann_id!r} appears twice")
        elif image_id not in entries:
            problems.reject("orphan annotation", f"{at}: image_id {image_id!r} names no image entry")
        else:
            seen_ann.add(ann_id)
            by_image.setdefault(image_id, []).append(a)
    for entry_id, (where, entry) in entries.items():
        yield from guarded(problems, where, mdetr_record, entry, by_image.get(entry_id, []), where, path,
                              images, problems)


def mdetr_record(entry: dict, anns: list[dict], where: str, path: Path, images: ImageFiles,
                 problems: Problems) -> list[Record]:
    if not isinstance(entry.get("file_name"), str):
        problems.reject("malformed record", f"{where}: needs \"file_name\" and \"caption\"")
        return []
    text = expression_text(entry.get("caption"), where, problems)
    image = images.resolve(entry["file_name"], path.parent)
    size = checked_image(image, images, where, problems, (entry.get("width"), entry.get("height"))) if text else None
    if size is None:
        return []
    regions = []
    for a in anns:
        at = f"{where}, annotation {a['id']}"
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.reject("malformed box", f"{at}: no [x, y, w, h] bbox")
            return []
        box = xyxy_region((x, y, x + w, y + h), size, at, problems)
        if box is None:
            return []
        seg = a.get("segmentation")
        shaped = polygon_region(seg, size, at, problems) if isinstance(seg, list) and seg else \
            rle_region(seg, size, at, problems) if isinstance(seg, dict) else box
        if shaped is None:
            return []
        if not inside(shaped, box):
            problems.reject("outline outside its box", f"{at}: the segmentation lies outside the bbox")
            return []
        regions.append(Region(box.box, shaped.segmentation))
    return [Record(image, text, regions, where)]


# ---- Label Studio -----------------------------------------------------------------------

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio's upload names: <8 hex digits>-<original name>
RECTANGLES = ("rectanglelabels", "rectangle")
POLYGONS = ("polygonlabels", "polygon")
BRUSHES = ("brushlabels", "brush")
TEXTS = ("textarea",)
TASK_LEVEL = ("choices", "labels", "rating", "taxonomy", "number", "datetime", "hypertextlabels")


def labelstudio_image(task: dict, images: ImageFiles, path: Path, where: str, problems: Problems) -> Path | None:
    """The task's image file: its path as given (a local-files URL's `?d=` path, or relative to
    the images folder), else found in the images folder by name, with or without Label Studio's
    upload hash prefix (/data/upload/<project>/<hash>-<name>); a name several files share is
    rejected, as is one no file has."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    ref = data.get("image") if isinstance(data.get("image"), str) else \
        next((v for v in data.values() if isinstance(v, str)), None)
    if ref is None:
        problems.reject("missing image", f"{where}: the task's data names no image")
        return None
    url = urlparse(ref)
    local = parse_qs(url.query).get("d", [None])[0]  # /data/local-files/?d=<path>
    given = unquote(local or url.path)
    if not url.scheme or local:
        exact = images.resolve(given.lstrip("/") if local else given, path.parent)
        if exact.is_file():
            return exact
    name = Path(given).name
    for candidate in dict.fromkeys((name, UPLOAD_PREFIX.sub("", name))):
        found = images.by_name(candidate)
        if len(found) > 1:
            problems.reject("ambiguous image name", f"{where}: image {ref} could be any of {len(found)} files named "
                                                    f"{candidate} under {images.root} ({found[0]}, {found[1]}, ...)")
            return None
        if found:
            return found[0]
    problems.reject("missing image", f"{where}: image {ref} not found in {images.root}")
    return None


def percent(value: dict, key: str, where: str, problems: Problems) -> float | None:
    v = value.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not -1e-6 <= v <= 100 + 1e-6:
        problems.reject("percent out of range", f"{where}: {key} = {v!r} is not a percentage in 0..100")
        return None
    return float(v)


def rectangle_region(value: dict, size: tuple[int, int], where: str, problems: Problems) -> Region | None:
    """A Label Studio rectangle: top-left (x, y) and width, height in percent, turned by
    `rotation` degrees clockwise about its top-left corner. The box is the turned rectangle's
    bounds and its outline the turned rectangle."""
    vals = [percent(value, k, where, problems) for k in ("x", "y", "width", "height")]
    if any(v is None for v in vals):
        return None
    W, H = size
    x, y, w, h = vals[0] * W / 100, vals[1] * H / 100, vals[2] * W / 100, vals[3] * H / 100
    angle = math.radians(float(value.get("rotation") or 0.0))
    if angle == 0:
        return xyxy_region((x, y, x + w, y + h), size, where, problems)
    c, s = math.cos(angle), math.sin(angle)
    corners = [(x, y), (x + w * c, y + w * s), (x + w * c - h * s, y + w * s + h * c), (x - h * s, y + h * c)]
    return polygon_region([v for p in corners for v in p], size, where, problems)


def labelstudio_annotation(task: dict) -> dict | None:
    """The annotation to import: the one marked ground truth, else the last not cancelled."""
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    truth = [a for a in anns if a.get("ground_truth")]
    return (truth or anns or [None])[-1]


def read_labelstudio(path: Path, images: ImageFiles, problems: Problems) -> Iterator[Record]:
    tasks = read_json(path)
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise UsageError(f"{path}: not a Label Studio JSON export (a list of tasks)")
    if tasks and not any("annotations" in t or "predictions" in t for t in tasks):
        raise UsageError(f"{path}: its tasks carry no \"annotations\" (Label Studio's JSON-MIN or CSV export?); "
                         "export the project as JSON")
    seen_tasks: set = set()
    for k, task in enumerate(tasks):
        task_id = task.get("id", f"#{k}")
        where = f"{path}, task {task_id}"
        if not isinstance(task_id, (int, str)):
            problems.reject("malformed record", f"{where}: a task id must be a number or a string")
            continue
        if task_id in seen_tasks:
            problems.reject("duplicate id", f"{where}: task id {task_id} appears twice")
            continue
        seen_tasks.add(task_id)
        yield from guarded(problems, where, labelstudio_records, task, where, path, images, problems)


def labelstudio_records(task: dict, where: str, path: Path, images: ImageFiles, problems: Problems) -> list[Record]:
    ann = labelstudio_annotation(task)
    if ann is None:
        problems.note("task not annotated", f"{where}: no annotation that is not cancelled")
        return []
    results = ann.get("result") or []
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        problems.reject("malformed record", f"{where}: the annotation's \"result\" must be a list of regions")
        return []
    regions: dict[Any, dict] = {}
    texts: dict[Any, list[str]] = {}
    text_controls = sorted({str(r.get("from_name")) for r in results if r.get("type") in TEXTS})
    if len(text_controls) > 1:
        problems.reject("several text areas", f"{where}: text areas {', '.join(text_controls)} both hold text; vglaw "
                                              "reads the expressions from one per-region text area")
        return []
    for result in results:
        kind, rid = result.get("type"), result.get("id")
        at = f"{where}, region {rid}"
        if kind in TASK_LEVEL:
            continue
        if not isinstance(rid, (int, str)):
            problems.reject("malformed record", f"{at}: a region id must be a number or a string")
            return []
        if kind in TEXTS:
            value = result["value"]["text"]
            items = value if isinstance(value, list) else [value]
            texts.setdefault(rid, []).extend(line for item in items for line in str(item).splitlines())
        elif kind in RECTANGLES + POLYGONS + BRUSHES:
            if rid in regions:
                problems.reject("duplicate id", f"{at}: two regions share the id {rid!r}")
                return []
            regions[rid] = result
        else:
            problems.reject("unknown region type", f"{at}: region type {kind!r} is not one vglaw imports "
                                                   "(rectangles, polygons)")
            return []
    orphans = sorted(set(texts) - set(regions), key=str)
    if orphans:
        problems.reject("text without a region", f"{where}: text area {orphans[0]!r} belongs to no region (a "
                                                 "per-region text area shares its region's id)")
        return []
    image = labelstudio_image(task, images, path, where, problems) if regions else None
    if image is None:
        return []
    shapes: list[tuple[str, str, Region]] = []  # (kind, text, region)
    lost: list[Record] = []
    for rid, result in regions.items():
        at = f"{where}, region {rid}"
        if rid not in texts:
            problems.reject("region without a text", f"{at}: the region has no expression (no text area with its id)")
            continue
        cleaned = [t for t in (expression_text(t, at, problems) for t in texts[rid]) if t]
        region = labelstudio_region(result, image, images, at, problems)
        if region is None:
            lost += spoiled(image, cleaned, at)
            continue
        shapes += [("rect" if result["type"] in RECTANGLES else "poly", t, region) for t in cleaned]
    return [Record(image, text, [region], f"{where} ({text!r})") for text, region in outlined(shapes)] + lost


def labelstudio_region(result: dict, image: Path, images: ImageFiles, at: str, problems: Problems) -> Region | None:
    """One rectangle or polygon region in pixels, checked against the image file."""
    stated = (result.get("original_width"), result.get("original_height"))
    size = checked_image(image, images, at, problems, stated, "the export")
    if size is None:
        return None
    kind, value = result["type"], result.get("value") or {}
    if kind in BRUSHES:
        problems.reject("brush mask", f"{at}: brush masks (Label Studio RLE) are not supported; draw a polygon or a "
                                      "rectangle")
        return None
    if result.get("image_rotation"):
        problems.reject("rotated image", f"{at}: drawn on the image turned by {result['image_rotation']} degrees in "
                                         "Label Studio; annotate it unturned")
        return None
    if kind in RECTANGLES:
        return rectangle_region(value, size, at, problems)
    points = value.get("points")
    if not isinstance(points, list) or len(points) < 3 or not all(isinstance(p, list) and len(p) == 2 for p in points):
        problems.reject("malformed polygon", f"{at}: polygon points must be [[x, y], ...] (3 or more)")
        return None
    pct = [percent({"x": p[0], "y": p[1]}, key, at, problems) for p in points for key in ("x", "y")]
    if any(v is None for v in pct):
        return None
    return polygon_region([v * (size[0] if i % 2 == 0 else size[1]) / 100 for i, v in enumerate(pct)], size, at,
                          problems)


def outlined(shapes: list[tuple[str, str, Region]]) -> list[tuple[str, Region]]:
    """(text, region) of a task's shapes, where a polygon inside an axis-aligned rectangle of the
    same expression is that rectangle's outline (one object: the rectangle's box, the polygon's
    mask; as `vglaw predict --format labelstudio` writes a box and its mask), not an object of
    its own."""
    rects = [[text, region, []] for kind, text, region in shapes if kind == "rect"]
    out: list[tuple[str, Region]] = []
    for kind, text, region in shapes:
        if kind == "rect":
            continue
        host = next((r for r in rects if r[0] == text and r[1].segmentation is None and inside(region, r[1])), None)
        if host is None:
            out.append((text, region))
        else:
            host[2].extend(region.segmentation)
    out += [(text, Region(region.box, polygons or None)) for text, region, polygons in rects]
    return out


READERS: dict[str, Callable[[Path, ImageFiles, Problems], Iterator[Record]]] = {
    "mdetr": read_mdetr, "odvg": read_odvg, "labelstudio": read_labelstudio, "jsonl": read_jsonl}


def import_dataset(fmt: str, inputs: list[str], out: str | Path, images: str | None = None, seed: int = 0,
                   skip_invalid: bool = False, overwrite: bool = False) -> Imported:
    """Read `inputs` in format `fmt` and write the dataset (`write_dataset`).

    Args:
        fmt: one of `READERS`.
        inputs: files; "SPLIT=FILE" takes every record of FILE into SPLIT.
        images: the images folder (default: the first input's folder).

    Raises:
        UsageError: an unknown format, a missing input, a bad record (unless `skip_invalid`).
    """
    if fmt not in READERS:
        raise UsageError(f"--format {fmt!r}: one of {', '.join(READERS)}")
    files: list[tuple[Path, str | None]] = []
    for item in inputs:
        split, _, name = item.partition("=") if item.split("=", 1)[0] in SPLITS else ("", "", item)
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingFileError(f"--input {name}: no such file")
        files.append((path, split or None))
    root = Path(images).expanduser() if images else files[0][0].parent
    if not root.is_dir():
        raise MissingFileError(f"--images {root}: no such folder")
    check_out(Path(out), root, overwrite)  # before any work
    problems = Problems(skip_invalid)
    finder = ImageFiles(root)
    records: list[Record] = []
    for path, split in files:
        for r in READERS[fmt](path, finder, problems):
            records.append(dataclasses.replace(r, split=split or r.split))
    return write_dataset(records, out, root, problems, seed, overwrite)

