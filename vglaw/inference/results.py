"""Answers as exchange data: the JSON every command writes for a grounded expression."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def result_json(r: dict) -> dict:
    """A result as JSON: box (xyxy, original pixels), score, mask as COCO RLE with its area; for
    generalised models also "no_target", "exists" and every box with its score."""
    item = {k: r[k] for k in ("text", "box", "score", "no_target", "exists", "boxes", "box_scores") if k in r}
    if "mask" in r:
        rle = mask_utils.encode(np.asfortranarray(r["mask"].view(np.uint8)))  # one copy, even for 100 MP
        item["mask_area"] = int(r["mask"].sum())
        item["mask_rle"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return item
