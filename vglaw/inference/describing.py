"""Describing regions with a speaker that checks itself: the describing head proposes K
expressions for a box, the same model grounds each one back (the listener), and the likeliest
of those that come back to the box (IoU >= 0.5) is kept (with none, the one that comes
closest); its IoU is the expression's confidence.

Used by `Grounder.describe`; nothing here reads argv or draws.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from vglaw.errors import UsageError
from vglaw.models.decoding import Candidate, beam_search, sample
from vglaw.training.describe_metrics import REFERS_IOU

STRATEGIES = ("beam", "sample")


def check_boxes(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> list[list[float]]:
    """Query boxes [x1, y1, x2, y2] in an image of `size` (h, w), as floats.

    Raises:
        UsageError: no box, a box without four finite numbers, of zero area, or reaching outside
            the image; the message names the box.
    """
    h, w = size
    if len(boxes) == 0:
        raise UsageError("give at least one box")
    out = []
    for box in boxes:
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise UsageError(f"box {box!r}: expected four numbers x1,y1,x2,y2") from None
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise UsageError(f"box {box!r}: not finite numbers")
        if x2 <= x1 or y2 <= y1:
            raise UsageError(f"box {x1:g},{y1:g},{x2:g},{y2:g} has zero area (x2 must exceed x1 and y2 exceed y1)")
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise UsageError(f"box {x1:g},{y1:g},{x2:g},{y2:g} reaches outside the {w}x{h} image")
        out.append([x1, y1, x2, y2])
    return out


def to_input_boxes(boxes: Tensor, scale: Tensor, pad: Tensor, img_size: int) -> Tensor:
    """(N, 4) xyxy original pixels -> normalised xyxy of the letterboxed S x S input (the
    inverse of `vglaw.models.postprocess.boxes_to_original`)."""
    return ((boxes * scale.repeat(2) + pad.repeat(2)) / img_size).clamp(0, 1)


@torch.no_grad()
def propose(model, images: Tensor, boxes: Tensor, bos: int, eos: int, candidates: int = 5,
            strategy: str = "beam", seed: int = 0, temperature: float = 1.0) -> list[list[Candidate]]:
    """K candidate expressions (token ids) for each (image, normalised box) pair, best first."""
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if candidates < 1:
        raise UsageError(f"candidates must be >= 1, got {candidates}")
    memory = model.describe_memory(images, boxes)
    max_len = model.config.max_words
    if strategy == "beam":
        return beam_search(model.describer, memory, bos, eos, candidates, max_len)
    return sample(model.describer, memory, bos, eos, candidates, max_len, temperature, seed)


def listener_ious(query: Tensor, grounded: list[list[float] | None]) -> list[float]:
    """IoU of each grounded box (None: not grounded, 0) with the (4,) query box."""
    return [0.0 if g is None else float(box_iou(query[None].double(), torch.tensor([g], dtype=torch.float64))[0, 0])
            for g in grounded]


def choose(ious: Sequence[float], log_probs: Sequence[float], rerank: bool = True) -> int:
    """Which candidate to keep: with `rerank`, the likeliest of those the listener grounds back
    to the query box (IoU >= `REFERS_IOU`), or, when none does, the one it grounds closest (the
    likelier on equal IoU); else the likeliest.

    Every candidate that refers matches the box, so the speaker's likelihood ranks them: ranking
    by the IoU itself prefers an ambiguous expression ("the circle" beside another circle) that
    happens to land on the target a little tighter (docs/shapes_experiments.md: on 300 shapes test
    regions, unique-reference accuracy 0.680 by IoU, 0.907 this way, at the same listener accuracy).
    """
    order = range(len(log_probs))
    if not rerank:
        return max(order, key=lambda i: log_probs[i])
    return max(order, key=lambda i: (ious[i] >= REFERS_IOU, ious[i] if ious[i] < REFERS_IOU else 0.0,
                                     log_probs[i]))
