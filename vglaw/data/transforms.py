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
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

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


def mask_to_original(logits: Tensor, scale: Tensor, pad: Tensor, orig_size: Tensor) -> Tensor:
    """(1, S, S) mask logits of one letterboxed sample -> (h, w) logits in original pixels."""
    h, w = (int(v) for v in orig_size)
    left, top = (int(v) for v in pad)
    new_w, new_h = round(w * float(scale[0])), round(h * float(scale[1]))
    crop = logits[..., top : top + new_h, left : left + new_w]  # (1, new_h, new_w)
    return F.interpolate(crop[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]


# The optional category map travels like the mask: nearest resampling, 0 (background) padding.
CATEGORY_TARGET = {"categories": "mask"}


class GroundingTransform:
    """Turn a raw refer sample into model inputs and targets.

    Args:
        img_size: S, the square input side.
        train: apply random augmentation.
        crop_p: probability of a random box-safe crop (never with a direction word).
        flip_p: probability of a horizontal flip (swapping left/right in the text).
        color_jitter_p: probability of brightness/contrast/saturation jitter; hue is never
            jittered because expressions name colours.
        keep_original: also return the original box (xyxy) and mask, for metrics.
    """

    def __init__(self, img_size: int, train: bool = False, crop_p: float = 0.5, flip_p: float = 0.5,
                 color_jitter_p: float = 0.8, keep_original: bool = False) -> None:
        self.img_size, self.train, self.flip_p, self.keep_original = img_size, train, flip_p, keep_original
        bbox = A.BboxParams(format="coco", label_fields=["labels"], clip=True)
        self.letterbox = A.Compose([
            # INTER_NEAREST_EXACT samples pixel centres; plain INTER_NEAREST shifts masks by half a pixel.
            A.LongestMaxSize(max_size=img_size, mask_interpolation=cv2.INTER_NEAREST_EXACT),
            A.PadIfNeeded(img_size, img_size, position="center", border_mode=0, fill=0, fill_mask=0),
        ], bbox_params=bbox, additional_targets=CATEGORY_TARGET)
        # One pipeline per (crop allowed, flip drawn): each albumentations call costs ~1 ms of
        # bookkeeping, so a sample goes through one augmentation call, not one per transform.
        self.augment = {
            (crop, flip): A.Compose(
                ([A.BBoxSafeRandomCrop(erosion_rate=0.0, p=crop_p)] if crop else [])
                + ([A.HorizontalFlip(p=1.0)] if flip else [])
                + [A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.0, p=color_jitter_p)],
                bbox_params=bbox, additional_targets=CATEGORY_TARGET)
            for crop in (False, True) for flip in (False, True)
        }
        self.normalize = A.Normalize()  # ImageNet mean and std

    def __call__(self, sample: dict) -> dict:
        image, text = sample["image"], sample["text"]
        mask = sample.get("mask", np.zeros(image.shape[:2], dtype=np.uint8))  # inference has no target
        extra = {"categories": sample["categories"]} if "categories" in sample else {}
        bboxes, labels = ([sample["bbox"].tolist()], [0]) if "bbox" in sample else ([], [])
        h, w = image.shape[:2]
        if self.train:
            # albumentations draws from its own generators, seeded from OS entropy unless told;
            # seeding them from `random` puts augmentation under seed_everything (and resume).
            seed = random.getrandbits(31)
            flip = random.random() < self.flip_p
            augment = self.augment[(not has_direction_word(text), flip)]
            augment.set_random_seed(seed)
            r = augment(image=image, mask=mask, bboxes=bboxes, labels=labels, **extra)
            image, mask, bboxes = r["image"], r["mask"], r["bboxes"]
            extra = {k: r[k] for k in extra}
            if flip:
                text = flip_text(text)
        ch, cw = image.shape[:2]
        r = self.letterbox(image=image, mask=mask, bboxes=bboxes, labels=labels, **extra)
        new_h = round(ch * min(self.img_size / ch, self.img_size / cw))
        new_w = round(cw * min(self.img_size / ch, self.img_size / cw))
        pad = ((self.img_size - new_w) // 2, (self.img_size - new_h) // 2)  # PadIfNeeded's centre rule
        x, y, bw, bh = np.asarray(r["bboxes"][0], dtype=np.float32) if bboxes else np.zeros(4, dtype=np.float32)
        S = self.img_size
        out = {
            "image": torch.from_numpy(self.normalize(image=r["image"])["image"].transpose(2, 0, 1).copy()),
            "mask": torch.from_numpy(r["mask"].astype(np.float32)),
            "box": torch.tensor([(x + bw / 2) / S, (y + bh / 2) / S, bw / S, bh / S], dtype=torch.float32),
            "text": text,
            "scale": torch.tensor([new_w / cw, new_h / ch], dtype=torch.float32),
            "pad": torch.tensor(pad, dtype=torch.float32),
            "orig_size": torch.tensor([ch, cw]),
            "index": sample.get("index", -1),
        }
        if extra:
            out["categories"] = torch.from_numpy(r["categories"].astype(np.int64))
        if self.keep_original:
            if (ch, cw) != (h, w):
                raise ValueError("keep_original is for evaluation, where the image is not cropped")
            x, y, bw, bh = sample["bbox"]
            out["orig_box"] = torch.tensor([x, y, x + bw, y + bh], dtype=torch.float32)
            out["orig_mask"] = torch.from_numpy(sample["mask"])
        return out
