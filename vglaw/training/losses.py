"""VG-LAW's training losses: L1 + GIoU on boxes, focal + Dice on masks (the paper's), and two
terms only the from-scratch model uses: supervision of the box head's pooling attention and a
per-pixel category loss.

Boxes are normalised (cx, cy, w, h); masks are logits / {0, 1} targets at input resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from vglaw.errors import UsageError
from vglaw.models.generalised import decode_boxes


def box_losses(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """L1 summed over the four coordinates and averaged over the batch (the DETR / TransVG
    convention of the official port), and the mean GIoU loss, for (B, 4) cxcywh boxes."""
    giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"),
                                    reduction="mean")
    return {"l1": (pred - target).abs().sum(1).mean(), "giou": giou}


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice per sample, averaged; (B, 1, H, W) logits and targets."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    dice = (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)
    return (1 - dice).mean()


def mask_losses(logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Sigmoid focal loss (α = 0.25, γ = 2, mean over pixels) and Dice loss."""
    logits = logits.float()
    target = target.to(logits.dtype).view_as(logits)
    return {"focal": sigmoid_focal_loss(logits, target, reduction="mean"), "dice": dice_loss(logits, target)}


def lap_attention_loss(attention: Tensor, masks: Tensor) -> Tensor:
    """Cross-entropy from the target's share of each token to the LAP attention, averaged.

    Not in the paper: from scratch the pooling attention stays near uniform for thousands of
    steps and the MLP learns the mean box; telling it where the referred object lies (the
    mask's area fraction per token, normalised to sum to 1) gets the box head going.

    Args:
        attention: (B, h, w) softmax over the token grid.
        masks: (B, H, W) {0, 1} targets at input resolution, H and W multiples of h and w.
    """
    share = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), attention.shape[-2:]).flatten(1)  # (B, h*w)
    target = share / share.sum(1, keepdim=True).clamp(min=1e-6)
    return -(target * attention.float().flatten(1).clamp(min=1e-8).log()).sum(1).mean()


def category_loss(logits: Tensor, categories: Tensor, ignore_index: int = 255) -> Tensor:
    """Per-pixel cross-entropy of (B, K, h, w) category logits against (B, H, W) category maps,
    the maps sampled at the logits' resolution (each cell's centre pixel) when they are larger.

    Not in the paper: the grounding losses only say which object the expression means, so a
    backbone trained from scratch learns what each object is slowly; naming every object of
    the image (instances.json has them all) teaches it directly.

    Raises:
        UsageError: a category outside the K classes (the model's `seg_classes` is too small).
    """
    if categories.shape[-2:] != logits.shape[-2:]:
        categories = F.interpolate(categories[:, None].float(), size=logits.shape[-2:],
                                   mode="nearest-exact")[:, 0].long()  # (B, h, w)
    outside = (categories >= logits.shape[1]) & (categories != ignore_index)
    if outside.any():
        raise UsageError(f"category map holds class {int(categories[outside].max())} but the model classifies "
                         f"{logits.shape[1]} (seg_classes must be the dataset's categories + 1 for background)")
    return F.cross_entropy(logits.float(), categories, ignore_index=ignore_index)


def centre_targets(boxes_set: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """CenterNet targets on an (H2, W2) grid: a Gaussian per referred object (σ = its size / 6
    per axis, at least half a cell) peaking at exactly 1 in the cell holding its centre, the max
    where they overlap; built for all objects of the batch at once, with no host round trip.

    Args:
        boxes_set: per sample, (N_b, 4) normalised cxcywh boxes (N_b may be 0).

    Returns:
        heat (B, H2, W2); and for the N objects of the batch, sample (N,) and centre cell (N, 2)
        as (row, col).
    """
    H2, W2 = size
    device = boxes_set[0].device if boxes_set else torch.device("cpu")
    counts = torch.tensor([len(b) for b in boxes_set], dtype=torch.long, device=device)
    sample = torch.repeat_interleave(torch.arange(len(boxes_set), device=device), counts)  # (N,)
    boxes = torch.cat([b.float().to(device) for b in boxes_set]) if boxes_set else torch.zeros(0, 4)  # (N, 4)
    row = (boxes[:, 1] * H2).long().clamp(0, H2 - 1)
    col = (boxes[:, 0] * W2).long().clamp(0, W2 - 1)
    sx = (boxes[:, 2] * W2 / 6).clamp(min=0.5)[:, None, None]  # (N, 1, 1)
    sy = (boxes[:, 3] * H2 / 6).clamp(min=0.5)[:, None, None]
    ys = torch.arange(H2, device=device, dtype=torch.float32)[None, :, None]  # (1, H2, 1)
    xs = torch.arange(W2, device=device, dtype=torch.float32)[None, None, :]  # (1, 1, W2)
    dx, dy = xs - col[:, None, None], ys - row[:, None, None]
    gauss = torch.exp(-dx**2 / (2 * sx**2) - dy**2 / (2 * sy**2))  # (N, H2, W2), 1 at (row, col)
    heat = torch.zeros(len(boxes_set), H2 * W2, device=device)
    # the max over each sample's objects (Gaussians are >= 0, so the zeros change nothing)
    heat.scatter_reduce_(0, sample[:, None].expand(-1, H2 * W2), gauss.flatten(1), "amax")
    return heat.view(-1, H2, W2), sample, torch.stack([row, col], dim=1)


def centre_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet's penalty-reduced focal loss (α = 2, β = 4), summed and divided by the number of
    centres (at least 1); (B, H2, W2) logits and Gaussian targets."""
    logits = logits.float()
    pos = target == 1
    pos_loss = F.logsigmoid(logits) * (1 - logits.sigmoid()) ** 2 * pos
    neg_loss = F.logsigmoid(-logits) * logits.sigmoid() ** 2 * (1 - target) ** 4 * ~pos
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def set_losses(outputs: dict[str, Tensor], boxes_set: list[Tensor], has_target: Tensor) -> dict[str, Tensor]:
    """Generalised grounding: the centre map ("centre"), L1 (summed over coordinates) and GIoU of
    the box decoded at each referred object's centre cell, averaged over objects ("l1", "giou"),
    and the existence cross-entropy ("exist")."""
    centre = outputs["centre_logits"]
    heat, sample, cells = centre_targets([b.to(centre.device) for b in boxes_set], tuple(centre.shape[-2:]))
    decoded = decode_boxes(outputs["box_params"].float())  # (B, H2, W2, 4)
    pred = decoded[sample, cells[:, 0], cells[:, 1]]  # (N, 4)
    target = torch.cat([t.float().to(pred.device) for t in boxes_set]) if boxes_set else pred.new_zeros(0, 4)
    terms = {"centre": centre_focal_loss(centre, heat),
             "exist": F.binary_cross_entropy_with_logits(outputs["exist_logits"].float(),
                                                         has_target.float().to(centre.device))}
    if len(target):
        terms["l1"] = (pred - target).abs().sum(1).mean()
        terms["giou"] = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"),
                                                 box_convert(target, "cxcywh", "xyxy"), reduction="mean")
    else:  # a batch that names nothing: no box to fit, but keep the graph for DDP
        terms["l1"] = terms["giou"] = decoded.sum() * 0.0
    return terms


def grounding_loss(outputs: dict[str, Tensor], boxes: Tensor, masks: Tensor, weights: dict[str, float],
                   categories: Tensor | None = None, boxes_set: list[Tensor] | None = None,
                   has_target: Tensor | None = None) -> dict[str, Tensor]:
    """Weighted total ("loss") and every unweighted term the model's outputs allow.

    The attention term ("lap") is added when the outputs hold "lap_attention" and `weights` has
    "lap"; the category term ("seg") when they hold "seg_logits", `weights` has "seg" and
    `categories` (B, H, W) is given; the generalised terms (`set_losses`) when they hold
    "centre_logits" (then `boxes_set` and `has_target` are needed).
    """
    terms: dict[str, Tensor] = {}
    if "boxes" in outputs:
        terms.update(box_losses(outputs["boxes"].float(), boxes.float()))
    if "centre_logits" in outputs:
        if boxes_set is None or has_target is None:
            raise UsageError("a generalised model needs generalised data (dataset grefcoco, gshapes, or custom "
                             "with data.generalised true): the batch has no box sets")
        terms.update(set_losses(outputs, boxes_set, has_target))
    if "mask_logits" in outputs:
        terms.update(mask_losses(outputs["mask_logits"], masks))
    if "lap_attention" in outputs and "lap" in weights:
        terms["lap"] = lap_attention_loss(outputs["lap_attention"], masks)
    if "seg_logits" in outputs and "seg" in weights and categories is not None:
        terms["seg"] = category_loss(outputs["seg_logits"], categories)
    terms["loss"] = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
    return terms
