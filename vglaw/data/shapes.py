"""The embedded synthetic referring dataset ("shapes"), written in the refer format.

Images hold 3-5 coloured shapes (circle, square, triangle, star; small or big; some
overlapping) on a textured background. Each ref is one shape with up to two expressions of
different types (attribute, position, relation), each checked by `expressions.resolve` to
single out exactly that shape among all shapes of the image. Masks are the exact visible
pixels (occlusion included), stored as COCO RLE. Everything is deterministic in the seed.

Layout written under OUT:
    OUT/shapes/instances.json, OUT/shapes/refs(unc).p, OUT/images/shapes/<split>_<id>.png
and, with `generalised` (zero, one or many referred shapes, in gRefCOCO's format):
    OUT/gshapes/instances.json, OUT/gshapes/grefs(unc).json, OUT/images/gshapes/<split>_<id>.png
"""
from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from vglaw.data.expressions import (
    COLORS,
    KINDS,
    POSITIONS,
    RELATIONS,
    SIZES,
    Desc,
    Expression,
    SetExpression,
    resolve,
    set_matches,
)

RADIUS = {"small": (9, 12), "big": (16, 21)}
MIN_VISIBLE = 0.6  # fraction of a shape that must stay visible under the shapes drawn after it


def _shape_mask(kind: str, cx: float, cy: float, r: float, angle: float, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of one shape, drawn without antialiasing so it is exact."""
    w, h = size
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        n, radii = {"square": (4, [r * 1.2]), "triangle": (3, [r * 1.35]), "star": (10, [r * 1.3, r * 0.55])}[kind]
        start = angle + (math.pi / 4 if kind == "square" else -math.pi / 2)
        pts = [(cx + radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
                cy + radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]
        draw.polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Low-saturation texture: a tinted base, stripes at a random angle, blobs and noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(90, 170) + rng.normal(0, 8, 3)
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    stripes = 18 * np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
    img = base[None, None, :] + stripes[..., None]
    for _ in range(rng.integers(3, 8)):  # grey blobs: shape-like clutter with no colour
        bx, by, br = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 14)
        img[(xx - bx) ** 2 + (yy - by) ** 2 < br**2] += rng.uniform(-40, 40)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255)


def _place_objects(rng: np.random.Generator, size: tuple[int, int]) -> list[dict]:
    """Sample 3-5 shapes; reject placements that hide too much of any shape."""
    w, h = size
    objects: list[dict] = []
    target = int(rng.integers(3, 6))
    for _ in range(60):
        if len(objects) == target:
            break
        kind, color, sz = (str(rng.choice(KINDS)), str(rng.choice(list(COLORS))), str(rng.choice(SIZES)))
        r = float(rng.uniform(*RADIUS[sz]))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        full = _shape_mask(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), size)
        if any(o["kind"] == kind and o["color"] == color and o["size"] == sz for o in objects) and rng.random() < 0.5:
            continue  # exact duplicates are allowed, but rarer, so attribute references stay common
        visible_after = [o["visible"] & ~full for o in objects]
        if any(v.sum() < MIN_VISIBLE * o["full"].sum() for v, o in zip(visible_after, objects)):
            continue
        for o, v in zip(objects, visible_after):
            o["visible"] = v
        objects.append(dict(kind=kind, color=color, size=sz, cx=cx, cy=cy, full=full, visible=full.copy()))
    return objects


def _candidate_expressions(i: int, objects: list[dict], rng: random.Random) -> dict[str, list[Expression]]:
    """Every expression of each type that singles out object i."""
    o = objects[i]
    descs = [Desc(o["kind"]), Desc(o["kind"], o["color"]), Desc(o["kind"], None, o["size"]),
             Desc(o["kind"], o["color"], o["size"])]
    out: dict[str, list[Expression]] = {"attribute": [], "position": [], "relation": []}
    for d in descs:
        if resolve(Expression(d), objects) == [i]:
            out["attribute"].append(Expression(d))
    for d in descs[:2]:
        if sum(d.matches(x) for x in objects) < 2:
            continue  # a position among one object says nothing
        for p in POSITIONS:
            e = Expression(d, position=p)
            if resolve(e, objects) == [i]:
                out["position"].append(e)
    for j, a in enumerate(objects):
        if j == i:
            continue
        anchor = next((d for d in (Desc(a["kind"]), Desc(a["kind"], a["color"]))
                       if resolve(Expression(d), objects) == [j]), None)
        if anchor is None:
            continue
        for d in descs[:2]:
            for rel in RELATIONS:
                e = Expression(d, relation=rel, anchor=anchor)
                if resolve(e, objects) == [i]:
                    out["relation"].append(e)
    return out


def _choose(cands: dict[str, list[Expression]], rng: random.Random) -> list[Expression]:
    """Up to two expressions of different types, the harder types first."""
    types = [t for t in ("relation", "position", "attribute") if cands[t]]
    rng.shuffle(types)
    types.sort(key=lambda t: t == "attribute")  # attribute last: it is the easy fallback
    return [rng.choice(cands[t]) for t in types[:2]]


def _set_candidates(objects: list[dict]) -> tuple[dict[tuple[int, ...], list[SetExpression]], list[SetExpression]]:
    """Expressions naming two or more objects, by the set they name, and expressions naming none.

    Every expression is checked with `SetExpression.resolve` to name exactly its set.
    """
    multi: dict[tuple[int, ...], list[SetExpression]] = {}
    empty: list[SetExpression] = []
    for kind in (None, *KINDS):
        for color in (None, *COLORS):
            for size in (None, *SIZES):
                if kind is None and color is None and size is None:
                    continue  # "all the shapes" names everything: no grounding in it
                desc = Desc(kind, color, size)
                found = tuple(i for i, o in enumerate(objects) if set_matches(desc, o))
                if len(found) >= 2:
                    for q in ("the", "all the", "every", "both"):
                        e = SetExpression(desc, q)
                        if tuple(e.resolve(objects)) == found:
                            multi.setdefault(found, []).append(e)
                elif not found and sum(x is not None for x in (kind, color, size)) >= 2:
                    # Absent combinations of attributes the images do have: "the green triangle"
                    # beside a green star and a red triangle.
                    for e in (SetExpression(desc, "the", singular=True), SetExpression(desc, "all the")):
                        if e.resolve(objects) == []:
                            empty.append(e)
    return multi, empty


def generate(out: str | Path, seed: int = 0, splits: dict[str, int] | None = None, progress: bool = True,
             generalised: bool = False) -> dict:
    """Write the shapes dataset under `out`; returns per-split counts of images, refs and sentences.

    Args:
        generalised: also write expressions that name several objects ("the red shapes",
            "both circles", "every small star") or none (a description absent from the image),
            in the gRefCOCO format (`OUT/gshapes/grefs(unc).json`, ann_id lists, [-1] for none)
            instead of the refer format.
    """
    splits = splits or {"train": 2000, "val": 200, "test": 200}
    name = "gshapes" if generalised else "shapes"
    out = Path(out)
    image_dir = out / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / name).mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    counts = {}
    total = sum(splits.values())
    bar = tqdm(total=total, desc=name, disable=not progress, unit="img")
    for split_index, (split, n) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, split_index])
        prng = random.Random(seed * 1000 + split_index)
        grng = random.Random(seed * 1000 + split_index + 500)  # generalised choices: the base stream is unchanged
        c = counts.setdefault(split, {"images": 0, "refs": 0, "sentences": 0,
                                      **({"no_target": 0, "multi_target": 0} if generalised else {})})
        while c["images"] < n:
            size = (int(rng.integers(112, 145)), int(rng.integers(104, 145)))
            objects = _place_objects(rng, size)
            chosen = [_choose(_candidate_expressions(i, objects, prng), prng) for i in range(len(objects))]
            if not any(chosen):
                continue
            image_id = len(images) + 1
            pixels = _background(rng, size)
            for o in objects:
                shade = np.array(COLORS[o["color"]], dtype=np.float32) + rng.normal(0, 12, 3)
                pixels[o["full"]] = shade + rng.normal(0, 6, (int(o["full"].sum()), 3))
            # Shapes are painted in order, so each one's visible mask is exactly what later ones left.
            file_name = f"{split}_{image_id:06d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
            ann_ids = []
            for o in objects:
                rle = mask_utils.encode(np.asfortranarray(o["visible"].astype(np.uint8)))
                ann_ids.append(len(annotations) + 1)
                annotations.append({
                    "id": ann_ids[-1], "image_id": image_id, "category_id": KINDS.index(o["kind"]) + 1,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}, "iscrowd": 0,
                    "shape": o["kind"], "color": o["color"], "size": o["size"],
                    "center": [round(o["cx"], 3), round(o["cy"], 3)],
                })
            groups = [([i], exprs) for i, exprs in enumerate(chosen) if exprs]
            if generalised:
                multi, empty = _set_candidates(objects)
                for found in grng.sample(sorted(multi), min(len(multi), grng.choice((1, 2)))):
                    groups.append((list(found), grng.sample(multi[found], min(2, len(multi[found])))))
                if empty:
                    groups.append(([], grng.sample(empty, min(2, len(empty)))))
            for members, exprs in groups:
                ref_id = len(refs) + 1
                sentences = [{"sent_id": ref_id * 10 + k, "sent": e.text(), "raw": e.text(), "tokens": e.text().split(),
                              "type": getattr(e, "type", "set")} for k, e in enumerate(exprs)]
                ref = {"ref_id": ref_id, "image_id": image_id, "split": split, "file_name": file_name,
                       "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]}
                if generalised:
                    ref["ann_id"] = [ann_ids[i] for i in members] or [-1]
                    ref["category_id"] = [KINDS.index(objects[i]["kind"]) + 1 for i in members] or [-1]
                    ref["no_target"] = not members
                else:
                    ref["ann_id"] = ann_ids[members[0]]
                    ref["category_id"] = KINDS.index(objects[members[0]]["kind"]) + 1
                refs.append(ref)
                c["refs"] += 1
                c["sentences"] += len(sentences)
                if generalised and len(members) != 1:
                    c["no_target" if not members else "multi_target"] += len(sentences)
            c["images"] += 1
            bar.update(1)
    bar.close()
    categories = [{"id": k + 1, "name": kind, "supercategory": "shape"} for k, kind in enumerate(KINDS)]
    with open(out / name / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    if generalised:
        with open(out / name / "grefs(unc).json", "w") as f:
            json.dump(refs, f)
    else:
        with open(out / name / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    return counts
