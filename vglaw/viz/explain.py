"""Which words drive which backbone block: the picture of one grounded expression.

Three panels: (a) the language aggregation weights α as a block x token heat map (groups
averaged, padding excluded), (b) the box head's pooling map A over the image, (c) the mask and
box. Needs `Grounder.predict(..., return_attention=True)` results.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vglaw.data.transforms import resize_mask_nearest
from vglaw.inference.results import Grounding
from vglaw.io.atomic import atomic_write
from vglaw.viz.plots import pyplot


def pooling_map_on_image(lap: np.ndarray, letterbox: dict, image_shape: tuple[int, int], img_size: int,
                         size: tuple[int, int]) -> np.ndarray:
    """The (h/16, w/16) pooling map of the letterboxed input, cropped to the image and resized
    to `image_shape` (the picture being drawn)."""
    grid = lap.shape[0]
    cell = img_size / grid
    sx, sy = letterbox["scale"]
    left, top = letterbox["pad"]
    new_w, new_h = size[1] * sx, size[0] * sy
    x0, y0 = left / cell, top / cell
    x1, y1 = (left + new_w) / cell, (top + new_h) / cell
    up = Image.fromarray(lap.astype(np.float32)).resize((grid * 16, grid * 16), Image.NEAREST)
    up = np.asarray(up)[int(y0 * 16) : max(int(y0 * 16) + 1, int(y1 * 16)),
                        int(x0 * 16) : max(int(x0 * 16) + 1, int(x1 * 16))]
    return np.asarray(Image.fromarray(up).resize((image_shape[1], image_shape[0]), Image.NEAREST))


def explain_figure(image: np.ndarray, result: Grounding, path: str | Path, img_size: int) -> Path:
    """Write the three-panel PNG (`build_explain_figure`) for one result."""
    plt = pyplot()
    fig = build_explain_figure(image, result, img_size)
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def build_explain_figure(image: np.ndarray, result: Grounding, img_size: int):
    """The matplotlib figure for one result of `Grounder.predict(..., return_attention=True)`.

    Args:
        image: the picture to draw on, (H, W, 3) uint8 (any size; boxes and masks are scaled).
        result: one result with its `attention`.
        img_size: the model's input side S.

    Returns:
        a 15 x 4.8 inch figure whose first three axes are the panels (a), (b), (c).
    """
    plt = pyplot()
    if result.attention is None:
        raise ValueError("an explanation needs the result's attention: Grounder.predict(..., return_attention=True)")
    att = result.attention
    h0, w0 = result.size
    H, W = image.shape[:2]
    fx, fy = W / w0, H / h0
    alpha = att.lang.mean(axis=1)  # (depth, tokens): groups averaged
    tokens = att.tokens
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ax = axes[0]
    im = ax.imshow(alpha, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(alpha.shape[0]), [f"block {i}" for i in range(alpha.shape[0])], fontsize=8)
    ax.set_title("(a) language weights α per block (groups averaged)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[1]
    ax.imshow(image)
    if att.lap is not None or att.centre is not None:
        grid = att.lap if att.lap is not None else att.centre
        heat = pooling_map_on_image(grid, att.letterbox, image.shape[:2], img_size, (h0, w0))
        overlay = plt.get_cmap("inferno")(heat / max(float(heat.max()), 1e-12))  # (H, W, 4)
        overlay[..., 3] = 0.75 * heat / max(float(heat.max()), 1e-12)  # the image shows where attention is low
        ax.imshow(overlay)
        ax.set_title("(b) box head's pooling map A" if att.lap is not None else
                     "(b) referred-object centre map", fontsize=10)
    else:
        ax.set_title("(b) no box head in this model", fontsize=10)
    ax.axis("off")
    ax = axes[2]
    ax.imshow(image)
    if result.mask is not None:
        mask = resize_mask_nearest(result.mask, H, W)
        overlay = np.zeros((H, W, 4), dtype=np.float32)
        overlay[mask] = (0.9, 0.1, 0.3, 0.5)
        ax.imshow(overlay)
    for x1, y1, x2, y2 in ([result.box] if result.box is not None else []) + (result.boxes or []):
        ax.add_patch(plt.Rectangle((x1 * fx, y1 * fy), (x2 - x1) * fx, (y2 - y1) * fy, fill=False,
                                   edgecolor="lime", linewidth=2))
    score = f" (score {result.score:.2f})" if result.score is not None else ""
    if result.no_target:
        score = f" (no target, existence {result.exists:.2f})"
    ax.set_title(f"(c) mask and box{score}", fontsize=10)
    ax.axis("off")
    fig.suptitle(f"\u201c{result.text}\u201d", fontsize=12)
    fig.tight_layout()
    return fig
