"""Pure tensor geometry for the ViTDet backbone.

Layout convention: token maps are channels-last, (B, H, W, C), as in detectron2's ViT.
Every function here is stateless so it can be tested against a reference on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vglaw.errors import UsageError


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Split a (B, H, W, C) map into non-overlapping windows, zero-padding H and W up.

    Returns:
        windows of shape (B * nW, ws, ws, C) and the padded size (Hp, Wp).
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    windows = rearrange(x, "b (nh h) (nw w) c -> (b nh nw) h w c", h=window_size, w=window_size)
    return windows, (H + pad_h, W + pad_w)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of `window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C), padding removed."""
    Hp, Wp = pad_hw
    H, W = hw
    x = rearrange(windows, "(b nh nw) h w c -> b (nh h) (nw w) c", nh=Hp // window_size, nw=Wp // window_size)
    return x[:, :H, :W, :].contiguous()


def resize_abs_pos(pos_embed: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bicubically resize a (1, h, w, C) absolute position table to (1, H, W, C).

    Uses align_corners=False and no antialiasing, as detectron2's `get_abs_pos` does.
    """
    if tuple(pos_embed.shape[1:3]) == tuple(hw):
        return pos_embed
    grid = pos_embed.permute(0, 3, 1, 2).float()  # (1, C, h, w)
    grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).to(pos_embed.dtype)  # (1, H, W, C)


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Linearly resize a (L, head_dim) relative position table to (length, head_dim)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    table = rel_pos.float().t().unsqueeze(0)  # (1, head_dim, L)
    table = F.interpolate(table, size=length, mode="linear", align_corners=False)
    return table.squeeze(0).t().to(rel_pos.dtype)  # (length, head_dim)


def crop_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Keep the central `length` rows of a (L, head_dim) relative position table.

    Row L // 2 of a table is offset 0, so the centre crop keeps the embeddings of offsets
    -(length // 2) .. length // 2 exactly as trained: a 1024-px ViTDet global table (127 rows, a
    64-token grid) cropped to a 448-px grid (55 rows) keeps rows 36..90, as the official VG-LAW
    code does (`[36:-36]`).

    Raises:
        ValueError: the table is shorter than `length` or the difference is odd (no centre).
    """
    L = rel_pos.shape[0]
    if L < length or (L - length) % 2:
        raise ValueError(f"cannot centre-crop a relative position table of {L} rows to {length}")
    start = (L - length) // 2
    return rel_pos[start : start + length]


def fit_rel_pos(rel_pos: Tensor, length: int, mode: str = "crop") -> Tensor:
    """A relative table of `length` rows: centre-cropped where `mode` is "crop" and the table is
    longer by an even number of rows (the paper's choice for ViTDet's 1024-px tables), linearly
    interpolated otherwise (detectron2's choice, and the only one for a shorter table)."""
    if mode not in ("crop", "interpolate"):
        raise UsageError(f"rel_pos mode must be 'crop' or 'interpolate', got {mode!r}")
    L = rel_pos.shape[0]
    if mode == "crop" and L > length and (L - length) % 2 == 0:
        return crop_rel_pos(rel_pos, length)
    return resize_rel_pos(rel_pos, length)


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: (L, head_dim) table; resized linearly when L != 2 * max(q, k) - 1.

    Returns:
        (q_size, k_size, head_dim)
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    rel_pos = resize_rel_pos(rel_pos, max_rel_dist)
    # Scale coordinates with the shorter side when q and k sizes differ (detectron2 rule).
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_terms(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The two factors of the decomposed relative position bias (MViTv2 / ViTDet).

    Args:
        q: unscaled queries, (B, nh, q_h * q_w, head_dim).
        rel_pos_h, rel_pos_w: relative tables for the height and width axes.
        q_hw, k_hw: query and key grid sizes.

    Returns:
        rel_h (B, nh, q_h * q_w, k_h) and rel_w (B, nh, q_h * q_w, k_w): the bias of query i and
        key (y, x) is rel_h[..., i, y] + rel_w[..., i, x].
    """
    q_h, q_w = q_hw
    k_h, k_w = k_hw
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, hd)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, hd)
    B, nh, _, hd = q.shape
    r_q = q.reshape(B, nh, q_h, q_w, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh.to(q.dtype))  # (B, nh, q_h, q_w, k_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw.to(q.dtype))  # (B, nh, q_h, q_w, k_w)
    return rel_h.reshape(B, nh, q_h * q_w, k_h), rel_w.reshape(B, nh, q_h * q_w, k_w)


def decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> Tensor:
    """Additive attention bias of decomposed relative positions (MViTv2 / ViTDet).

    Args as `decomposed_rel_pos_terms`.

    Returns:
        bias of shape (B, nh, q_h * q_w, k_h * k_w), to be added to q·kᵀ·scale before softmax.
    """
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, q_hw, k_hw)
    B, nh, N, k_h = rel_h.shape
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, nh, N, k_h, k_w)
    return bias.reshape(B, nh, N, k_h * rel_w.shape[-1])


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position table (MAE's), (1, H, W, C): half the channels encode the
    row, half the column. Used to initialise `pos_embed` when no pretrained table is loaded."""
    if dim % 4:
        raise UsageError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (C/4,)
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                            indexing="ij")
    enc = lambda pos: torch.cat([torch.sin(pos[..., None] * omega), torch.cos(pos[..., None] * omega)], dim=-1)
    return torch.cat([enc(ys), enc(xs)], dim=-1).float().unsqueeze(0)  # (1, H, W, C)
