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


def resize_mask_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A boolean (h, w) mask at (height, width), nearest pixel centres, without building anything
    of the original's size (for drawing a full-resolution mask on a working-size picture)."""
    if mask.shape == (height, width):
        return mask
    ys = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int)
    xs = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int)
    return mask[ys][:, xs]


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
