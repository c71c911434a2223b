"""Attention with ViTDet's decomposed relative-position bias through `flex_attention`.

With an additive (B, nh, N, N) bias, `scaled_dot_product_attention` can only use its math or
memory-efficient kernels; flex attention instead adds the bias inside the fused kernel from
its two small factors, rel_h (B, nh, N, H) and rel_w (B, nh, N, W): score(i, j) += rel_h[i, y(j)]
+ rel_w[i, x(j)] for key j at (y, x). Eager (as on CPUs) it runs PyTorch's unfused reference;
on CUDA the call is compiled once per input shape.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vglaw.models.geometry import decomposed_rel_pos_terms

_compiled = None


def _flex():
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                           hw: tuple[int, int]) -> Tensor:
    """softmax(q·kᵀ/√d + decomposed bias)·v for (B, nh, N, hd) q, k, v on an hw = (H, W) grid."""
    from torch.nn.attention.flex_attention import flex_attention

    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, hw)  # (B, nh, N, H), (B, nh, N, W)
    W = hw[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel_h[b, h, q_idx, kv_idx // W] + rel_w[b, h, q_idx, kv_idx % W]

    fn = _flex() if q.is_cuda else flex_attention
    return fn(q, k, v, score_mod=score_mod)
