"""A describing model evaluated on a split: one expression per region (a ref's box), scored
against the ref's sentences with the caption metrics, by its own listener, and, where the
dataset's annotations carry the shapes generator's attributes, by the generator's resolver
(unique-reference accuracy) and grammar (`vglaw.data.expressions`).

Both choices are scored from one decoding: the listener's pick ("reranked") and the likeliest
candidate ("likeliest").
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vglaw.data.expressions import parse, resolve
from vglaw.inference.grounder import Grounder, prepare_image
from vglaw.inference.results import Description
from vglaw.training.describe_metrics import ExpressionMetrics

SHAPES_FIELDS = ("shape", "color", "size", "center")  # what the shapes generator writes per annotation


@dataclass(frozen=True)
class Region:
    """One ref of a split: the region to describe and the sentences that describe it."""

    index: int
    ref_id: int
    ann_id: int
    image_id: int
    image_path: Path
    box: list[float]  # x1, y1, x2, y2 original pixels
    references: list[str]


def regions(dataset) -> list[Region]:
    """The refs of a `ReferDataset` split, in the order of their first sentence."""
    by_ref: dict[int, list] = defaultdict(list)
    for s in dataset.samples:
        by_ref[s.ref_id].append(s)
    out = []
    for k, group in enumerate(by_ref.values()):
        s = group[0]
        x, y, w, h = s.bbox
        out.append(Region(k, s.ref_id, s.ann_id, s.image_id, s.image_path, [x, y, x + w, y + h],
                          [g.text for g in group]))
    return out


def scene_objects(anns: list[dict]) -> tuple[list[dict], list[int]] | None:
    """One image's annotations as the objects `vglaw.data.expressions.resolve` reads, and their
    ids; None when the annotations lack the shapes generator's attributes."""
    anns = sorted(anns, key=lambda a: a["id"])
    if not anns or not all(all(f in a for f in SHAPES_FIELDS) for a in anns):
        return None
    objects = [{"kind": a["shape"], "color": a["color"], "size": a["size"], "cx": a["center"][0],
                "cy": a["center"][1]} for a in anns]
    return objects, [a["id"] for a in anns]


def shapes_checks(text: str, objects: list[dict], target: int) -> tuple[bool, bool]:
    """(grammatical, unique): `text` parses in the shapes grammar, and it denotes exactly the
    object `target` among `objects`."""
    try:
        expr = parse(text)
    except ValueError:
        return False, False
    return True, resolve(expr, objects) == [target]


@torch.no_grad()
def evaluate_describing(grounder: Grounder, dataset, candidates: int = 5, limit: int | None = None,
                        captions: bool = True, progress: bool = True, keep: int = 0) -> dict:
    """Describe every region of `dataset` (a `ReferDataset` split) and score both choices.

    Returns:
        {"reranked": metrics, "likeliest": metrics, "regions": n, "examples": the first `keep`
        (Region, Description) pairs}; metrics as `ExpressionMetrics.compute`, as floats.
    """
    todo = regions(dataset)[:limit] if limit else regions(dataset)
    by_image: dict[int, list[Region]] = defaultdict(list)
    for r in todo:
        by_image[r.image_id].append(r)
    anns: dict[int, list[dict]] = defaultdict(list)  # by image, read once
    for a in dataset.anns.values():
        anns[a["image_id"]].append(a)
    metrics = {"reranked": ExpressionMetrics(captions), "likeliest": ExpressionMetrics(captions)}
    examples: list[tuple[Region, Description]] = []
    bar = tqdm(total=len(todo), desc="describe", unit="region", disable=not progress)
    for image_id, group in by_image.items():
        array, size = prepare_image(group[0].image_path)
        described = grounder.describe_decoded(array, size, [r.box for r in group], candidates, rerank=True)
        scene = scene_objects(anns[image_id])
        for region, d in zip(group, described):
            likeliest = max(d.candidates, key=lambda c: c.log_prob)
            for key, (text, iou) in {"reranked": (d.text, d.listener_iou),
                                     "likeliest": (likeliest.text, likeliest.listener_iou)}.items():
                checks = {}
                if scene is not None:
                    objects, ann_ids = scene
                    grammatical, unique = shapes_checks(text, objects, ann_ids.index(region.ann_id))
                    checks = {"grammatical": torch.tensor([grammatical]), "unique": torch.tensor([unique])}
                metrics[key].update(torch.tensor([region.index]), [text], [region.references],
                                    torch.tensor([iou], dtype=torch.float64), **checks)
            if len(examples) < keep:
                examples.append((region, d))
        bar.update(len(group))
    bar.close()
    out = {key: {k: float(v) for k, v in m.compute().items()} for key, m in metrics.items()}
    return {**out, "regions": len(todo), "examples": examples}


def to_markdown(table: dict[str, dict[str, float]]) -> str:
    """The metrics of each choice as a Markdown table."""
    names = {"unique_acc": "unique-ref acc", "listener_acc": "listener acc", "grammatical": "grammatical",
             "bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D"}
    cols = [c for c in names if c in next(iter(table.values()))]
    lines = ["| choice | " + " | ".join(names[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for choice, values in table.items():
        lines.append(f"| {choice} | " + " | ".join(f"{values[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)
