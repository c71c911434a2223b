"""A model's outputs in the original image's pixels: boxes, masks and, for generalised models,
the box sets and the no-target decision. The one place metrics and prediction share."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

from vglaw.models.generalised import BOX_SCORE_THRESHOLD, EXIST_THRESHOLD, decode_sets


def boxes_to_original(boxes: Tensor, scale: Tensor, pad: Tensor, orig_size: Tensor, img_size: int) -> Tensor:
    """Normalised (cx, cy, w, h) boxes of the letterboxed input -> (x1, y1, x2, y2) original pixels.

    Args:
        boxes: (B, 4) in [0, 1] of the S x S input.
        scale: (B, 2) resize factors (sx, sy).
        pad: (B, 2) padding (left, top) in input pixels.
        orig_size: (B, 2) original (h, w).
        img_size: S.
    """
    xyxy = box_convert(boxes.float() * img_size, "cxcywh", "xyxy")  # (B, 4) input pixels
    xyxy = (xyxy - pad.float().repeat(1, 2)) / scale.float().repeat(1, 2)
    limits = orig_size.float().flip(1).repeat(1, 2)  # (B, 4): w, h, w, h
    return torch.minimum(xyxy.clamp(min=0), limits)


MASK_THRESHOLD = 0.35  # sigmoid probability above which a pixel is in the mask (paper)


_STRIP_PIXELS = 1_000_000  # output pixels interpolated at a time: bounds memory for 100 MP images


def _bilinear_taps(n_in: int, n_out: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights of `F.interpolate(mode="bilinear", align_corners=False)`
    along one axis: out[i] = (1 - w[i]) * in[i0[i]] + w[i] * in[i1[i]]."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, src - i0


def mask_to_original(logits: Tensor, scale: Tensor, pad: Tensor, orig_size: Tensor,
                     threshold: float = MASK_THRESHOLD) -> tuple[Tensor, Tensor]:
    """(1, S, S) mask logits of one letterboxed sample -> the (h, w) boolean mask in original
    pixels and its score (mean probability over the mask's pixels, 0 when empty).

    The logits are cropped to the image, bilinearly resized to (h, w) as `F.interpolate`
    (align_corners=False) does, and thresholded; rows are resized a strip at a time, so a
    100-megapixel image needs the boolean mask and a few MB, not (h, w) floats.
    """
    h, w = (int(v) for v in orig_size)
    left, top = (int(v) for v in pad)
    new_w, new_h = max(1, round(w * float(scale[0]))), max(1, round(h * float(scale[1])))
    crop = logits.reshape(logits.shape[-2:])[top : top + new_h, left : left + new_w].float()  # (new_h, new_w)
    x0, x1, wx = _bilinear_taps(crop.shape[1], w, crop.device)
    cols = crop[:, x0] * (1 - wx) + crop[:, x1] * wx  # (new_h, w): resized along x
    y0, y1, wy = _bilinear_taps(crop.shape[0], h, crop.device)
    mask = torch.empty(h, w, dtype=torch.bool, device=crop.device)
    prob_sum = torch.zeros((), dtype=torch.float64, device=crop.device)
    n = torch.zeros((), dtype=torch.int64, device=crop.device)  # counted per strip: a sum over a 100 MP
    step = max(1, _STRIP_PIXELS // max(w, 1))  # bool tensor would first make it int64 (800 MB)
    for r in range(0, h, step):
        ly = wy[r : r + step, None]
        strip = cols[y0[r : r + step]] * (1 - ly) + cols[y1[r : r + step]] * ly  # (rows, w) logits
        prob = strip.sigmoid()
        keep = prob > threshold
        mask[r : r + step] = keep
        prob_sum += prob[keep].double().sum()
        n += keep.sum()
    score = (prob_sum / n).float() if n > 0 else prob_sum.new_zeros((), dtype=torch.float32)
    return mask, score


def to_original(outputs: dict[str, Tensor], scale: Tensor, pad: Tensor, orig_size: Tensor,
                img_size: int, sets: list[dict] | None = None, gate_masks: bool = True) -> dict[str, list]:
    """The model's outputs in original-image pixels: the one place metrics and prediction share.

    Args:
        outputs: model outputs ("boxes" (B, 4) normalised cxcywh, "mask_logits" (B, 1, S, S)).
        scale, pad, orig_size: the letterbox records (B, 2) of each sample.
        img_size: S.
        sets: a generalised model's `decode_sets(outputs)`, when the caller has it already.
        gate_masks: empty a generalised model's mask where it predicts no target (the GRES
            metrics measure the mask as drawn, beside the no-target decision).

    Returns:
        "boxes": (B, 4) xyxy in original pixels (box tasks); "masks": B boolean (h, w) masks at
        `MASK_THRESHOLD` and "mask_scores": (B,) the mean probability over each mask's pixels
        (0 for an empty mask) (mask tasks); for generalised models "exists" (B,) the existence
        probability, "box_sets" B (K_b, 4) xyxy boxes scoring at least `BOX_SCORE_THRESHOLD` and
        "box_set_scores" their scores, boxes and mask emptied where "exists" < `EXIST_THRESHOLD`.
    """
    out: dict[str, list] = {}
    if "boxes" in outputs:
        out["boxes"] = boxes_to_original(outputs["boxes"], scale, pad, orig_size, img_size)
    if "mask_logits" in outputs:
        pairs = [mask_to_original(outputs["mask_logits"][i], scale[i], pad[i], orig_size[i])
                 for i in range(len(outputs["mask_logits"]))]
        out["masks"], out["mask_scores"] = [m for m, _ in pairs], torch.stack([s for _, s in pairs])
    if "centre_logits" in outputs:  # generalised: 0..N boxes, gated by the existence score
        out["box_sets"], out["box_set_scores"] = [], []
        sets = sets if sets is not None else decode_sets(outputs)
        out["exists"] = torch.stack([s["exists"] for s in sets])
        for i, s in enumerate(sets):
            keep = (s["scores"] >= BOX_SCORE_THRESHOLD) & (s["exists"] >= EXIST_THRESHOLD)
            n = int(keep.sum())
            boxes = boxes_to_original(s["boxes"][keep], scale[i : i + 1].expand(n, 2), pad[i : i + 1].expand(n, 2),
                                      orig_size[i : i + 1].expand(n, 2), img_size)
            out["box_sets"].append(boxes)
            out["box_set_scores"].append(s["scores"][keep])
            if gate_masks and s["exists"] < EXIST_THRESHOLD and "masks" in out:
                out["masks"][i] = torch.zeros_like(out["masks"][i])
                out["mask_scores"][i] = 0.0
    return out
