"""Grounding metrics as `torchmetrics.Metric`s, exact under DDP.

Per-sentence values are gathered with their sentence index and de-duplicated before the
reduction, so the samples a distributed sampler repeats to even out ranks count once.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

MASK_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def box_iou_pairwise(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of two (B, 4) xyxy box sets."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


class GroundingMetrics(Metric):
    """REC Prec@0.5; RES mIoU, oIoU and mask Prec@{0.5, ..., 0.9}.

    `update` takes per-sentence values already measured in original-image pixels:
    the box IoU and/or the mask intersection and union pixel counts.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("index", "box_iou", "box_index", "inter", "union", "mask_index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, box_iou: Tensor | None = None, inter: Tensor | None = None,
               union: Tensor | None = None) -> None:
        if box_iou is not None:
            self.box_index.append(index.long())
            self.box_iou.append(box_iou.double())
        if inter is not None:
            self.mask_index.append(index.long())
            self.inter.append(inter.double())
            self.union.append(union.double())

    @staticmethod
    def _unique(index: list[Tensor] | Tensor, *values: list[Tensor] | Tensor) -> list[Tensor]:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x
        idx = cat(index)
        order = torch.argsort(idx, stable=True)
        idx = idx[order]
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[1:] = idx[1:] != idx[:-1]
        return [cat(v)[order][keep] for v in values]

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if len(self.box_iou) if isinstance(self.box_iou, list) else self.box_iou.numel():
            (iou,) = self._unique(self.box_index, self.box_iou)
            out["prec@0.5"] = (iou >= 0.5).double().mean()
            out["n"] = torch.tensor(float(iou.numel()))
        if len(self.inter) if isinstance(self.inter, list) else self.inter.numel():
            inter, union = self._unique(self.mask_index, self.inter, self.union)
            iou = inter / union.clamp(min=1)
            out["miou"] = iou.mean()
            out["oiou"] = inter.sum() / union.sum().clamp(min=1)
            for t in MASK_THRESHOLDS:
                out[f"mask_prec@{t}"] = (iou >= t).double().mean()
            out["n"] = torch.tensor(float(iou.numel()))
        return out


def measure_predictions(pred: dict, batch: dict) -> dict[str, Tensor]:
    """`GroundingMetrics.update` values of one batch: per-sentence box IoU and mask intersection /
    union, from `to_original`'s predictions and the batch's original-pixel targets."""
    out: dict[str, Tensor] = {}
    if "boxes" in pred:
        out["box_iou"] = box_iou_pairwise(pred["boxes"], batch["orig_boxes"].to(pred["boxes"]))
    if "masks" in pred:
        gts = [gt.to(m.device).bool() for m, gt in zip(pred["masks"], batch["orig_masks"])]
        out["inter"] = torch.stack([(m & gt).sum() for m, gt in zip(pred["masks"], gts)])
        out["union"] = torch.stack([(m | gt).sum() for m, gt in zip(pred["masks"], gts)])
    return out
