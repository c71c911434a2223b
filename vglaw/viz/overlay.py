"""The picture of an answer: each expression's mask, box and text in its own colour."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from vglaw.data.transforms import resize_mask_nearest
from vglaw.inference.results import Description, Grounding

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


OVERLAY_MIN_SIDE = 512  # smaller pictures are enlarged so the expressions fit as text


def draw_overlay(image: np.ndarray, results: list[Grounding]) -> Image.Image:
    """The picture with each expression's mask, box and text in its own colour.

    `image` may be smaller than the original (a working copy of a large photo); masks and boxes,
    in original pixels, are scaled to it. A picture whose longer side is under
    `OVERLAY_MIN_SIDE` is enlarged by an integer factor (nearest neighbour) so the text fits.
    """
    H, W = image.shape[:2]
    canvas = image.astype(np.float32)
    for k, r in enumerate(results):
        if r.mask is not None and r.mask.any():
            mask = resize_mask_nearest(r.mask, H, W)
            colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
            canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    zoom = max(1, math.ceil(OVERLAY_MIN_SIDE / max(H, W)))
    if zoom > 1:
        out = out.resize((W * zoom, H * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    for k, r in enumerate(results):
        colour = PALETTE[k % len(PALETTE)]
        h0, w0 = r.size
        fx, fy = out.width / w0, out.height / h0
        scale = lambda b, fx=fx, fy=fy: [b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy]  # noqa: E731
        box = scale(r.box) if r.box is not None else None
        if box is not None:
            draw.rectangle(box, outline=colour, width=width)
        for b, s in zip(r.boxes or [], r.box_scores or []):  # generalised: every box of the set
            b = scale(b)
            draw.rectangle(b, outline=colour, width=width)
            draw.text((b[0] + 2, b[1] + 1), f"{s:.2f}", fill=colour)
            box = box or b
        x, y = (box[0], max(0, box[1] - 12)) if box is not None else (2, 2 + 12 * k)
        label = " ".join(r.text.split())
        if r.no_target:
            label += f" (no target, existence {r.exists:.2f})"
        elif r.score is not None:
            label += f" ({r.score:.2f})"
        x = max(0, min(x, out.width - draw.textlength(label)))  # keep the label inside the picture
        left, top, right, bottom = draw.textbbox((x, y), label)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), label, fill=colour)
    return out


def draw_descriptions(image: np.ndarray, descriptions: list[Description], size: tuple[int, int]) -> Image.Image:
    """The picture with each query box (thick) in its own colour, the box the model grounds its
    expression back to (thin), and the expression with its listener IoU.

    `size` is the original image's (h, w), whose pixels the boxes are in; `image` may be a
    smaller working copy. Small pictures are enlarged as in `draw_overlay`.
    """
    H, W = image.shape[:2]
    out = Image.fromarray(image)
    zoom = max(1, math.ceil(OVERLAY_MIN_SIDE / max(H, W)))
    if zoom > 1:
        out = out.resize((W * zoom, H * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    fx, fy = out.width / size[1], out.height / size[0]
    scale = lambda b: [b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy]  # noqa: E731
    for k, d in enumerate(descriptions):
        colour = PALETTE[k % len(PALETTE)]
        box = scale(d.box)
        draw.rectangle(box, outline=colour, width=2 * width)
        if d.grounded_box is not None:
            draw.rectangle(scale(d.grounded_box), outline=(255, 255, 255), width=max(1, width // 2))
        label = f"{' '.join(d.text.split()) or '(empty)'} (IoU {d.listener_iou:.2f})"
        x = max(0, min(box[0], out.width - draw.textlength(label)))
        y = max(0, box[1] - 12)
        left, top, right, bottom = draw.textbbox((x, y), label)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), label, fill=colour)
    return out
