"""Generalised grounding metrics (gRefCOCO: GRES and GREC), as a `torchmetrics.Metric`, exact
under DDP (per-sentence values gathered with their index, repeats counted once).

GRES (masks): gIoU, the mean per-expression IoU where an expression that names nothing scores
1 if the prediction is empty and 0 otherwise; cIoU = ΣI / ΣU (a missed no-target adds its
predicted area to ΣU); N-acc = TP / (TP + FN) over no-target expressions (TP: predicted empty);
T-acc = TN / (TN + FP) over targeted ones (FP: predicted empty); Pr@0.7/0.8/0.9 of the
per-expression IoU.
GREC (boxes): boxes scoring at least 0.7 are kept; predictions and targets are matched one to
one, greedily, highest IoU first; a sample is correct iff F1 = 2TP / (2TP + FP + FN) = 1 at
IoU >= 0.5 (a no-target sample: iff no box is kept). Precision@(F1=1, IoU>=0.5) is the share of
correct samples. Matching uses the generalised IoU, as the official script does
("grec_prec@f1"); plain IoU gives "grec_prec@f1_iou".
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_iou, generalized_box_iou

GRES_THRESHOLDS = (0.7, 0.8, 0.9)


def grec_correct(pred: Tensor, target: Tensor, threshold: float = 0.5, giou: bool = True) -> bool:
    """F1 = 1 for one sample: (P, 4) kept predictions and (G, 4) targets, xyxy, greedy one-to-one
    matching highest IoU first."""
    if len(target) == 0 or len(pred) == 0:
        return len(target) == len(pred)
    ious = (generalized_box_iou if giou else box_iou)(pred.float(), target.float()).clone()  # (P, G)
    tp = 0
    while ious.numel():
        best = ious.max()
        if best < threshold:
            break
        p, g = divmod(int(ious.argmax()), ious.shape[1])
        tp += 1
        ious[p, :] = -2
        ious[:, g] = -2
        if (ious > -2).sum() == 0:
            break
    fp, fn = len(pred) - tp, len(target) - tp
    return 2 * tp / (2 * tp + fp + fn) == 1.0


class GeneralisedMetrics(Metric):
    """GRES and GREC metrics; `update` takes per-sentence values measured in original pixels."""

    full_state_update = False
    FIELDS = ("index", "has_target", "pred_no_target", "inter", "union", "grec", "grec_iou", "boxes_empty")

    def __init__(self) -> None:
        super().__init__()
        for name in self.FIELDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, has_target: Tensor, pred_no_target: Tensor, inter: Tensor, union: Tensor,
               grec: Tensor, grec_iou: Tensor, boxes_empty: Tensor) -> None:
        """Per-sentence values: `inter` / `union` of the predicted mask as the mask head drew it
        (not emptied by the no-target decision) with the target union; `pred_no_target` the
        model's no-target decision; `grec`, `grec_iou` GREC correctness (`grec_correct`) and
        `boxes_empty` whether no box was kept."""
        values = dict(index=index.long(), has_target=has_target.bool(), pred_no_target=pred_no_target.bool(),
                      inter=inter.double(), union=union.double(), grec=grec.bool(), grec_iou=grec_iou.bool(),
                      boxes_empty=boxes_empty.bool())
        for name, v in values.items():
            getattr(self, name).append(v.reshape(-1).to(self.device))

    def compute(self) -> dict[str, Tensor]:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731
        if not (len(self.index) if isinstance(self.index, list) else self.index.numel()):
            return {}
        idx = cat(self.index)
        order = torch.argsort(idx, stable=True)
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[1:] = idx[order][1:] != idx[order][:-1]
        v = {name: cat(getattr(self, name))[order][keep] for name in self.FIELDS[1:]}
        targeted, no_target = v["has_target"], v["pred_no_target"]
        inter = torch.where(no_target, 0.0, v["inter"])  # predicted no target: I = 0, U kept
        union = torch.where(~targeted & no_target, 0.0, v["union"])  # a correct no-target adds nothing
        iou = torch.where(targeted, inter / union.clamp(min=1), no_target.double())
        out = {"giou": iou.mean(), "ciou": inter.sum() / union.sum().clamp(min=1),
               "grec_prec@f1": v["grec"].double().mean(), "grec_prec@f1_iou": v["grec_iou"].double().mean()}
        if (~targeted).any():
            out["n_acc"] = no_target[~targeted].double().mean()
            out["grec_n_acc"] = v["boxes_empty"][~targeted].double().mean()
        if targeted.any():
            out["t_acc"] = (~no_target[targeted]).double().mean()
            for t in GRES_THRESHOLDS:
                out[f"pr@{t}"] = (iou[targeted] >= t).double().mean()
        out["n"] = torch.tensor(float(iou.numel()))
        return out
