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
    """Per-pixel cross-entropy of (B, K, H, W) category logits against (B, H, W) category maps.

    Not in the paper: the grounding losses only say which object the expression means, so a
    backbone trained from scratch learns what each object is slowly; naming every object of
    the image (instances.json has them all) teaches it directly.

    Raises:
        ValueError: a category outside the K classes (the model's `seg_classes` is too small).
    """
    outside = (categories >= logits.shape[1]) & (categories != ignore_index)
    if outside.any():
        raise UsageError(f"category map holds class {int(categories[outside].max())} but the model classifies "
                         f"{logits.shape[1]} (seg_classes must be the dataset's categories + 1 for background)")
    return F.cross_entropy(logits.float(), categories, ignore_index=ignore_index)


def grounding_loss(outputs: dict[str, Tensor], boxes: Tensor, masks: Tensor,
                   weights: dict[str, float], categories: Tensor | None = None) -> dict[str, Tensor]:
    """Weighted total ("loss") and every unweighted term the model's outputs allow.

    The attention term ("lap") is added when the outputs hold "lap_attention" and `weights` has
    "lap"; the category term ("seg") when they hold "seg_logits", `weights` has "seg" and
    `categories` (B, H, W) is given.
    """
    terms: dict[str, Tensor] = {}
    if "boxes" in outputs:
        terms.update(box_losses(outputs["boxes"].float(), boxes.float()))
    if "mask_logits" in outputs:
        terms.update(mask_losses(outputs["mask_logits"], masks))
    if "lap_attention" in outputs and "lap" in weights:
        terms["lap"] = lap_attention_loss(outputs["lap_attention"], masks)
    if "seg_logits" in outputs and "seg" in weights and categories is not None:
        terms["seg"] = category_loss(outputs["seg_logits"], categories)
    terms["loss"] = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
    return terms
