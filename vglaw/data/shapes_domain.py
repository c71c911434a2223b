"""A domain the shapes demo model never saw, written as Label Studio exports (`make demo-finetune`):
the shapes generator's scenes with new colours, in the pixels and in the words.

Every shape is repainted (red -> purple, green -> orange, blue -> cyan, yellow -> pink; the
generator's noise kept) and every expression says the new colour, so neither the pictures nor
the phrasing are those the demo model trained on. Each split is one Label Studio JSON export:
per referred shape a rectangle (percent of the image), its outline as a polygon inside it, and
a per-region text area with its expressions; images are named as Label Studio's uploads name
them (/data/upload/1/<hash>-<name>), so importing them exercises that lookup.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vglaw.data.expressions import COLORS
from vglaw.data.importing import mask_polygons
from vglaw.data.shapes import generate
from vglaw.io.atomic import atomic_write
from vglaw.io.safe_pickle import plain_load

NEW_COLOURS = {"red": ("purple", (150, 60, 200)), "green": ("orange", (240, 140, 30)),
               "blue": ("cyan", (40, 200, 210)), "yellow": ("pink", (240, 120, 180))}


def renamed(text: str) -> str:
    """The expression with the new colour words."""
    return re.sub(r"\b(" + "|".join(NEW_COLOURS) + r")\b", lambda m: NEW_COLOURS[m.group(1)][0], text)


def write_new_domain(out: str | Path, seed: int, splits: dict[str, int]) -> dict[str, int]:
    """Write OUT/images/*.png and OUT/labelstudio_<split>.json; returns expressions per split."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, seed, splits, progress=False)
        refs = plain_load(Path(tmp) / "shapes" / "refs(unc).p")
        inst = json.loads((Path(tmp) / "shapes" / "instances.json").read_text())
        anns = {a["id"]: a for a in inst["annotations"]}
        by_image: dict[int, list[dict]] = {}
        for a in inst["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        tasks: dict[str, list[dict]] = {split: [] for split in splits}
        for image in inst["images"]:
            pixels = np.asarray(Image.open(Path(tmp) / "images" / "shapes" / image["file_name"]), dtype=np.float32)
            masks = {}
            for a in by_image.get(image["id"], []):
                mask = mask_utils.decode({"size": a["segmentation"]["size"],
                                          "counts": a["segmentation"]["counts"].encode("ascii")}).astype(bool)
                masks[a["id"]] = mask
                shift = np.array(NEW_COLOURS[a["color"]][1], np.float32) - np.array(COLORS[a["color"]], np.float32)
                pixels[mask] += shift
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / "images" / image["file_name"])
            digest = hashlib.sha1(image["file_name"].encode()).hexdigest()[:8]
            w, h = image["width"], image["height"]
            result, split = [], None
            for ref in (r for r in refs if r["image_id"] == image["id"]):
                split = ref["split"]
                x, y, bw, bh = anns[ref["ann_id"]]["bbox"]
                shared = {"to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0}
                texts = [renamed(s["sent"]) for s in ref["sentences"]]
                rid = f"ref{ref['ref_id']}"
                result += [{"id": rid, "type": "rectanglelabels", "from_name": "label", **shared,
                            "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 100 * bw / w,
                                      "height": 100 * bh / h, "rotation": 0, "rectanglelabels": ["shape"]}},
                           {"id": rid, "type": "textarea", "from_name": "expression", **shared,
                            "value": {"text": texts}}]
                for k, poly in enumerate(mask_polygons(masks[ref["ann_id"]])):
                    points = [[100 * poly[i] / w, 100 * poly[i + 1] / h] for i in range(0, len(poly), 2)]
                    result += [{"id": f"{rid}o{k}", "type": "polygonlabels", "from_name": "outline", **shared,
                                "value": {"points": points, "polygonlabels": ["shape"]}},
                               {"id": f"{rid}o{k}", "type": "textarea", "from_name": "expression", **shared,
                                "value": {"text": texts}}]
                counts[split] = counts.get(split, 0) + len(texts)
            if split is not None:
                upload = f"/data/upload/1/{digest}-{image['file_name']}"
                tasks[split].append({"id": image["id"], "data": {"image": upload},
                                     "annotations": [{"id": image["id"], "result": result, "was_cancelled": False}]})
    for split, items in tasks.items():
        with atomic_write(out / f"labelstudio_{split}.json", "w") as f:
            json.dump(items, f)
    return counts
