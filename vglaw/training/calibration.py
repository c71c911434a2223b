"""Box-score calibration of a generalised model (Platt scaling, Platt 1999; Guo et al. 2017).

GREC keeps the boxes scoring at least 0.7, so the score must mean what the threshold assumes:
the probability that the box is a correct referent. The centre map's peaks are not that (the
penalty-reduced focal loss keeps them low: on the gshapes demo the median correct peak was
0.69). At each validation the module collects every centre peak of the first validation split
with its label, 1 when its box matches a referred object (generalised IoU >= 0.5 and one
target per box, GREC's match criterion, original pixels; peaks take targets best score first,
so a duplicate of a found object counts as wrong, as an extra box does in GREC) and 0
otherwise, and fits
score = sigmoid(a * centre_logit + b). The fit goes into `CentreBoxHead.score_calibration`, so
the checkpoint saved after that validation carries it; test data never takes part.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import generalized_box_iou

from vglaw.models.generalised import EXIST_THRESHOLD, decode_sets
from vglaw.models.postprocess import boxes_to_original

MATCH_THRESHOLD = 0.5  # generalised IoU at which a box matches a target (GREC's)


def peak_labels(boxes: Tensor, scores: Tensor, targets: Tensor) -> Tensor:
    """(K, 4) boxes and (K,) scores of one sample's peaks, (G, 4) targets, xyxy in the same
    pixels -> (K,) labels: 1 for a peak whose box takes a still unmatched target at generalised IoU
    >= 0.5, peaks taken best score first, each taking its best such target; 0 otherwise."""
    labels = torch.zeros(len(boxes))
    if not len(boxes) or not len(targets):
        return labels
    iou = generalized_box_iou(boxes.float(), targets.float())  # (K, G)
    free = torch.ones(len(targets), dtype=torch.bool)
    for k in torch.argsort(scores, descending=True).tolist():
        candidates = torch.where(free & (iou[k] >= MATCH_THRESHOLD), iou[k], torch.full_like(iou[k], -2.0))
        if candidates.max() >= MATCH_THRESHOLD:
            free[int(candidates.argmax())] = False
            labels[k] = 1.0
    return labels


def fit_platt(logits: Tensor, labels: Tensor, min_each: int = 10) -> tuple[float, float] | None:
    """(N,) centre logits and (N,) 0/1 labels -> (a, b) minimising the cross-entropy of
    sigmoid(a * logit + b), or None when either class has fewer than `min_each` peaks or the fit
    does not keep the order of the peaks (a <= 0)."""
    logits, labels = logits.double().flatten(), labels.double().flatten()
    positives = int(labels.sum())
    if positives < min_each or len(labels) - positives < min_each:
        return None
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([ab], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * logits + ab[1], labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    a, b = (float(v) for v in ab.detach())
    if not (a > 0 and torch.isfinite(ab.detach()).all()):
        return None
    return a, b


def calibration_samples(outputs: dict[str, Tensor], batch: dict, img_size: int) -> tuple[Tensor, Tensor]:
    """A batch's (N,) raw centre logits and (N,) labels (`peak_labels`) of every peak (up to 20
    per sample) of the samples the existence head lets through."""
    logits, labels = [], []
    for i, s in enumerate(decode_sets(outputs, min_score=0.0)):
        if s["exists"] < EXIST_THRESHOLD or not len(s["boxes"]):
            continue
        n = len(s["boxes"])
        boxes = boxes_to_original(s["boxes"], batch["scale"][i : i + 1].expand(n, 2),
                                  batch["pad"][i : i + 1].expand(n, 2), batch["orig_size"][i : i + 1].expand(n, 2),
                                  img_size)
        logits.append(s["centre_logits"].cpu())
        labels.append(peak_labels(boxes.cpu(), s["scores"].cpu(), batch["orig_boxes_set"][i].cpu()))
    if not logits:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(logits), torch.cat(labels)


class CalibrationPeaks(Metric):
    """The calibration slice's peaks, (N,) raw centre logits and (N,) labels, from every
    process: torchmetrics' "cat" reduction gathers the uneven counts under DDP."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor) -> None:  # one batch's `calibration_samples`
        self.logits.append(logits.float().to(self.device))
        self.labels.append(labels.float().to(self.device))

    def compute(self) -> tuple[Tensor, Tensor]:
        def cat(values) -> Tensor:
            if isinstance(values, Tensor):  # after a gather
                return values.cpu()
            return dim_zero_cat(values).cpu() if values else torch.zeros(0)

        return cat(self.logits), cat(self.labels)
