"""Small refer-format datasets written by the tests themselves."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_refcoco(root: Path, splits=("train", "train", "val", "testA", "testB", "testB")) -> dict:
    """A tiny 'refcoco' (splitBy unc): one image and one ref per entry of `splits`, alternating
    polygon, compressed-RLE and uncompressed-RLE masks; two sentences per ref."""
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns, refs = [], [], []
    for k, split in enumerate(splits):
        image_id, h, w = 100 + k, 60 + 4 * k, 80 + 2 * k
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / coco_name(image_id))
        images.append({"id": image_id, "file_name": coco_name(image_id), "height": h, "width": w})
        x0, y0 = 5 + k, 7 + k
        polygon = [[x0, y0, x0 + 30, y0, x0 + 30, y0 + 20, x0 + 10, y0 + 25]]
        if k % 3 == 0:
            seg = polygon
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(polygon, h, w))
            if k % 3 == 1:
                seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:  # uncompressed RLE: run lengths as a list, as COCO stores crowd masks
                m = mask_utils.decode(rle).flatten(order="F")
                runs, cur, n = [], 0, 0
                for v in m:
                    if v != cur:
                        runs.append(n)
                        cur, n = v, 0
                    n += 1
                runs.append(n)
                seg = {"size": [h, w], "counts": runs}
        ann_id = 1000 + k
        full = mask_utils.merge(mask_utils.frPyObjects(polygon, h, w))
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": seg,
                     "bbox": [float(v) for v in mask_utils.toBbox(full)], "area": float(mask_utils.area(full)),
                     "iscrowd": 0})
        refs.append({"ref_id": k, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                     "sentences": [{"sent_id": 10 * k, "sent": "the bright thing on the left", "raw": "x",
                                    "tokens": []},
                                   {"sent_id": 10 * k + 1, "sent": "dog", "raw": "x", "tokens": []}]})
    with open(root / "refcoco" / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {"images": images, "annotations": anns, "refs": refs}


def write_grefcoco(root: Path) -> dict:
    """A tiny 'grefcoco' (splitBy unc, gRefCOCO's JSON format): two images with three objects
    each; per image a one-target, a two-target and a no-target ref."""
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "grefcoco").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns, refs = [], [], []
    for k, split in enumerate(("train", "val")):
        image_id, h, w = 200 + k, 64, 96
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / coco_name(image_id))
        images.append({"id": image_id, "file_name": coco_name(image_id), "height": h, "width": w})
        ids = []
        for j, (x0, y0) in enumerate(((4, 4), (40, 10), (60, 36))):
            poly = [[x0, y0, x0 + 20, y0, x0 + 20, y0 + 16, x0, y0 + 16]]
            rle = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
            ids.append(2000 + 10 * k + j)
            anns.append({"id": ids[-1], "image_id": image_id, "category_id": 1 + j, "segmentation": poly,
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
                         "iscrowd": 0})
        for r, (members, text) in enumerate((([ids[0]], "the first thing"), (ids[1:], "the two other things"),
                                             ([-1], "the purple elephant"))):
            ref_id = 100 * k + r
            refs.append({"ref_id": ref_id, "ann_id": members, "image_id": image_id, "split": split,
                         "category_id": [1] if members != [-1] else [-1], "no_target": members == [-1],
                         "sentences": [{"sent_id": 10 * ref_id, "sent": text, "raw": text, "tokens": text.split()}]})
    with open(root / "grefcoco" / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}, f)
    with open(root / "grefcoco" / "grefs(unc).json", "w") as f:
        json.dump(refs, f)
    return {"images": images, "annotations": anns, "refs": refs}
