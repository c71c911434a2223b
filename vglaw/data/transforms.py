"""Paired image / box / mask / text augmentation, letterboxing and its inverse.

Images arrive (H, W, 3) uint8 and leave (3, S, S) float, normalised, letterboxed: resized so
the longer side is S, then padded symmetrically to S x S. The resize and padding are recorded
per sample (`scale` = (sx, sy), `pad` = (left, top), `orig_size` = (h, w)), so predictions go
back to original pixels with `boxes_to_original` and `mask_to_original`.
"""
from __future__ import annotations

import random
import re

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

from vglaw.errors import UsageError

DIRECTION_WORDS = frozenset(
    "left right leftmost rightmost top bottom topmost bottommost middle center centre upper lower above below "
    "corner side far near closest nearest farthest furthest".split()
)
_DIRECTION_RE = re.compile(r"\b(" + "|".join(sorted(DIRECTION_WORDS)) + r")\b", re.IGNORECASE)
_LEFT_RIGHT_RE = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def has_direction_word(text: str) -> bool:
    """True if the expression uses a spatial word that a crop could make false."""
    return _DIRECTION_RE.search(text) is not None


def flip_text(text: str) -> str:
    """Swap "left" and "right" (also "-most") as whole words, keeping case; "bright" stays."""

    def swap(m: re.Match) -> str:
        word = {"left": "right", "right": "left"}[m.group(1).lower()]
        if m.group(1)[0].isupper():
            word = word.capitalize()
        return word + (m.group(2) or "")

    return _LEFT_RIGHT_RE.sub(swap, text)


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


def resize_mask_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A boolean (h, w) mask at (height, width), nearest pixel centres, without building anything
    of the original's size (for drawing a full-resolution mask on a working-size picture)."""
    if mask.shape == (height, width):
        return mask
    ys = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int)
    xs = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int)
    return mask[ys][:, xs]


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
        from vglaw.models.generalised import BOX_SCORE_THRESHOLD, EXIST_THRESHOLD, decode_sets

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


# Letterbox padding after normalisation: the mean colour is 0; black is -mean / std (ImageNet).
FILLS = {"mean": np.zeros(3, np.float32),
         "black": -np.array([0.485, 0.456, 0.406], np.float32) / np.array([0.229, 0.224, 0.225], np.float32)}

# The optional category map travels like the mask: nearest resampling, 0 (background) padding.
CATEGORY_TARGET = {"categories": "mask"}


class GroundingTransform:
    """Turn a raw refer sample into model inputs and targets.

    Every augmentation is off by default except the flip; the paper uses the flip only.

    Args:
        img_size: S, the square input side.
        train: apply random augmentation.
        flip_p: probability of a horizontal flip, swapping left/right in the text (paper: 0.5).
        crop_p: probability of a random box-safe crop, resized back (never with a direction
            word; not the paper's).
        color_jitter_p: probability of brightness/contrast/saturation jitter; hue is never
            jittered because expressions name colours (not the paper's).
        translate_p: probability of placing the resized image at a random offset inside the
            S x S square instead of its centre (the official port's random translation).
        keep_original: also return the original box (xyxy) and mask, for metrics.
        fill: the letterbox padding: "mean" (the mean colour, zero after normalisation: the
            paper's) or "black".
    """

    def __init__(self, img_size: int, train: bool = False, flip_p: float = 0.5, crop_p: float = 0.0,
                 color_jitter_p: float = 0.0, translate_p: float = 0.0, keep_original: bool = False,
                 fill: str = "mean") -> None:
        if fill not in FILLS:
            raise UsageError(f"letterbox fill must be one of {', '.join(FILLS)}, got {fill!r}")
        self.fill = FILLS[fill]
        for name, p in (("flip_p", flip_p), ("crop_p", crop_p), ("color_jitter_p", color_jitter_p),
                        ("translate_p", translate_p)):
            if not 0.0 <= p <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {p}")
        self.img_size, self.train, self.keep_original = img_size, train, keep_original
        self.flip_p, self.translate_p = flip_p, translate_p
        bbox = A.BboxParams(format="coco", label_fields=["labels"], clip=True)
        # INTER_NEAREST_EXACT samples pixel centres; plain INTER_NEAREST shifts masks by half a pixel.
        # Boxes are scaled by hand below: albumentations' box bookkeeping cost more than the resize.
        self.resize = A.Compose([A.LongestMaxSize(max_size=img_size, mask_interpolation=cv2.INTER_NEAREST_EXACT),
                                 A.Normalize()],  # ImageNet mean and std
                                additional_targets=CATEGORY_TARGET)
        # One pipeline per (crop allowed, flip drawn): each albumentations call costs ~1 ms of
        # bookkeeping, so a sample goes through one augmentation call, not one per transform.
        jitter = ([A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.0, p=color_jitter_p)]
                  if color_jitter_p > 0 else [])
        self.augment = {}
        for crop in (False, True):
            for flip in (False, True):
                spatial = (([A.BBoxSafeRandomCrop(erosion_rate=0.0, p=crop_p)] if crop and crop_p > 0 else [])
                           + ([A.HorizontalFlip(p=1.0)] if flip else []))
                steps = spatial + jitter
                self.augment[(crop, flip)] = (A.Compose(steps, bbox_params=bbox if spatial else None,
                                                        additional_targets=CATEGORY_TARGET) if steps else None)

    def __call__(self, sample: dict) -> dict:
        image, text = sample["image"], sample["text"]
        mask = sample.get("mask", np.zeros(image.shape[:2], dtype=np.uint8))  # inference has no target
        extra = {"categories": sample["categories"]} if "categories" in sample else {}
        if "bboxes" in sample:  # generalised: every box of the referred set (maybe none)
            bboxes = [list(b) for b in np.asarray(sample["bboxes"], dtype=np.float32).reshape(-1, 4)]
        else:
            bboxes = [sample["bbox"].tolist()] if "bbox" in sample else []
        labels = [0] * len(bboxes)
        h, w = image.shape[:2]
        translate = False
        if self.train:
            # albumentations draws from its own generators, seeded from OS entropy unless told;
            # seeding them from `random` puts augmentation under seed_everything (and resume).
            seed = random.getrandbits(31)
            flip = random.random() < self.flip_p
            translate = random.random() < self.translate_p
            augment = self.augment[(not has_direction_word(text), flip)]
            if augment is not None:
                augment.set_random_seed(seed)
                r = augment(image=image, mask=mask, bboxes=bboxes, labels=labels, **extra)
                image, mask, bboxes = r["image"], r["mask"], r["bboxes"]
                extra = {k: r[k] for k in extra}
            if flip:
                text = flip_text(text)
        ch, cw = image.shape[:2]
        r = self.resize(image=image, mask=mask, **extra)
        new_h, new_w = r["image"].shape[:2]
        S = self.img_size
        if translate:
            pad = (random.randint(0, S - new_w), random.randint(0, S - new_h))
        else:
            pad = ((S - new_w) // 2, (S - new_h) // 2)
        left, top = pad
        # Letterbox padding is the mean colour: zero after normalisation, as in the official port.
        canvas = np.empty((S, S, 3), dtype=np.float32)
        canvas[:] = self.fill
        canvas[top : top + new_h, left : left + new_w] = r["image"]

        def place(m: np.ndarray, dtype) -> np.ndarray:
            out = np.zeros((S, S), dtype=dtype)
            out[top : top + new_h, left : left + new_w] = m
            return out

        placed = np.asarray(bboxes, dtype=np.float32).reshape(-1, 4)  # COCO x, y, w, h of the (augmented) image
        x0 = np.clip(placed[:, :2], 0, [cw, ch]) * [new_w / cw, new_h / ch]
        x1 = np.clip(placed[:, :2] + placed[:, 2:], 0, [cw, ch]) * [new_w / cw, new_h / ch]
        placed = np.concatenate([x0 + [left, top], x1 - x0], axis=1).astype(np.float32)  # in the S x S input
        x, y, bw, bh = placed[0] if len(placed) else np.zeros(4, dtype=np.float32)
        out = {
            "image": torch.from_numpy(canvas.transpose(2, 0, 1).copy()),
            "mask": torch.from_numpy(place(r["mask"], np.float32)),
            "box": torch.tensor([(x + bw / 2) / S, (y + bh / 2) / S, bw / S, bh / S], dtype=torch.float32),
            "text": text,
            "scale": torch.tensor([new_w / cw, new_h / ch], dtype=torch.float32),
            "pad": torch.tensor(pad, dtype=torch.float32),
            "orig_size": torch.tensor([ch, cw]),
            "index": sample.get("index", -1),
        }
        if extra:
            out["categories"] = torch.from_numpy(place(r["categories"], np.int64))
        if "bboxes" in sample:
            cxcywh = np.concatenate([placed[:, :2] + placed[:, 2:] / 2, placed[:, 2:]], axis=1) / S  # (N, 4)
            out["boxes_set"] = torch.from_numpy(cxcywh.astype(np.float32))
            out["has_target"] = bool(sample.get("has_target", len(placed) > 0))
        if self.keep_original:
            if (ch, cw) != (h, w):
                raise ValueError("keep_original is for evaluation, where the image is not cropped")
            if "bboxes" in sample:
                b = torch.as_tensor(np.asarray(sample["bboxes"], dtype=np.float32).reshape(-1, 4))
                out["orig_boxes_set"] = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)  # (N, 4) xyxy
                out["orig_box"] = out["orig_boxes_set"][0] if len(b) else torch.zeros(4)
            else:
                x, y, bw, bh = sample["bbox"]
                out["orig_box"] = torch.tensor([x, y, x + bw, y + bh], dtype=torch.float32)
            out["orig_mask"] = torch.from_numpy(sample["mask"])
        return out
