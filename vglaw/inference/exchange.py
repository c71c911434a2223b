"""Predictions back to the annotation tool: `Grounding`s as Label Studio pre-annotations or as a
COCO results file (`vglaw predict --pairs ... --format labelstudio|coco`).

- Label Studio: one task per image, its predictions one rectangle per box with a per-region text
  area holding the expression, and the mask's outline inside each box as polygons with the same
  expression (the layout `vglaw data import --format labelstudio` reads back: one object per
  box), in percent of the original image; the labelling config is `LABEL_CONFIG`. An
  expression that names nothing adds no region.
- COCO results: one entry per box, {"image_id", "category_id": 1, "bbox": [x, y, w, h],
  "score", "segmentation": the mask inside the box as COCO RLE}, plus "file_name" and "text",
  which COCO's evaluator ignores; image ids are 1, 2, ... in the order the images first appear.
A mask-only model's object is boxed by its mask's bounds.
"""
from __future__ import annotations

import math

import numpy as np
from pycocotools import mask as mask_utils

from vglaw.data.importing import mask_polygons
from vglaw.inference.results import Grounding

FORMATS = ("jsonl", "labelstudio", "coco")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="object"/></RectangleLabels>
  <PolygonLabels name="outline" toName="image"><Label value="object"/></PolygonLabels>
  <TextArea name="expression" toName="image" perRegion="true" editable="true"/>
</View>"""  # the Label Studio project these pre-annotations fit


def boxes_of(r: Grounding) -> list[tuple[list[float], float | None]]:
    """(xyxy box, score) of every object the result names: one, a set, or none; a mask-only
    model's object is boxed by its mask's bounds."""
    if r.generalised:
        return [] if r.no_target else list(zip(r.boxes or [], r.box_scores or []))
    if r.box is not None:
        return [(r.box, r.score)]
    if r.mask is not None and r.mask.any():
        ys, xs = np.nonzero(r.mask)
        return [([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)], r.score)]
    return []


def mask_in_box(mask: np.ndarray, box: list[float]) -> tuple[np.ndarray, int, int]:
    """The part of `mask` inside `box` (whole pixels), and the part's left and top offsets."""
    x1, y1, x2, y2 = box
    left, top = max(0, math.ceil(x1)), max(0, math.ceil(y1))
    return mask[top:max(top, math.floor(y2)), left:max(left, math.floor(x2))], left, top


def labelstudio_results(r: Grounding, first_id: int = 0) -> list[dict]:
    """One result's Label Studio regions: per box a rectangle with its text area, and the
    outlines of the mask inside that box as polygons with the same expression (the importer
    reads a polygon inside a box of the same expression as that box's outline). Region ids
    count from `first_id`."""
    h, w = r.size
    shared = {"to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0}
    text = lambda rid: {"id": rid, "type": "textarea", "from_name": "expression", **shared,  # noqa: E731
                        "value": {"text": [r.text]}}
    out, n = [], first_id
    for box, score in boxes_of(r):
        x1, y1, x2, y2 = box
        rid, n = f"r{n}", n + 1
        out += [{"id": rid, "type": "rectanglelabels", "from_name": "label", **shared,
                 **({"score": score} if score is not None else {}),
                 "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                           "height": 100 * (y2 - y1) / h, "rotation": 0, "rectanglelabels": ["object"]}}, text(rid)]
        if r.mask is None:
            continue
        inside, left, top = mask_in_box(r.mask, box)
        for poly in mask_polygons(inside):
            rid, n = f"r{n}", n + 1
            points = [[100 * (poly[i] + left) / w, 100 * (poly[i + 1] + top) / h] for i in range(0, len(poly), 2)]
            out += [{"id": rid, "type": "polygonlabels", "from_name": "outline", **shared,
                     "value": {"points": points, "polygonlabels": ["object"]}}, text(rid)]
    return out


def labelstudio_tasks(regions: dict[str, list[dict]], model_version: str = "vglaw") -> list[dict]:
    """Label Studio tasks with predictions, one per image reference, from its regions."""
    tasks = []
    for image, result in regions.items():
        prediction: dict = {"model_version": model_version, "result": result}
        scores = [x["score"] for x in result if "score" in x]
        if scores:
            prediction["score"] = float(np.mean(scores))
        tasks.append({"data": {"image": image}, "predictions": [prediction]})
    return tasks


def coco_entries(r: Grounding, image_id: int, file_name: str) -> list[dict]:
    """One result's COCO results entries: one per object, with the mask inside its box as RLE
    (for a set, each box takes its own part of the union mask)."""
    out = []
    for box, score in boxes_of(r):
        x1, y1, x2, y2 = box
        entry = {"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "score": float(score) if score is not None else 1.0, "file_name": file_name, "text": r.text}
        if r.mask is not None:
            part, left, top = mask_in_box(r.mask, box)
            own = np.zeros(r.mask.shape, dtype=np.uint8)
            own[top:top + part.shape[0], left:left + part.shape[1]] = part
            coded = mask_utils.encode(np.asfortranarray(own))
            entry["segmentation"] = {"size": coded["size"], "counts": coded["counts"].decode("ascii")}
        out.append(entry)
    return out


class ExchangeWriter:
    """Collects results for one exchange format and gives the file's content at the end."""

    def __init__(self, fmt: str, model_version: str = "vglaw") -> None:
        self.fmt, self.model_version = fmt, model_version
        self.regions: dict[str, list[dict]] = {}
        self.entries: list[dict] = []
        self.image_ids: dict[str, int] = {}

    def add(self, image: str, r: Grounding) -> None:
        if self.fmt == "labelstudio":
            result = self.regions.setdefault(image, [])
            result += labelstudio_results(r, first_id=len(result))
        else:
            self.entries += coco_entries(r, self.image_ids.setdefault(image, len(self.image_ids) + 1), image)

    def content(self) -> list[dict]:
        return labelstudio_tasks(self.regions, self.model_version) if self.fmt == "labelstudio" else self.entries
