"""Language-adaptive weight generation: per-block aggregation of the expression, then a
matrix-factorised update of each block's qkv weight.

Layout: token features (B, L, d_l); one row of every stacked parameter per visual block, so all
blocks are computed in one batched product instead of a Python loop over blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.models.vitdet import LowRank


class LanguageAggregator(nn.Module):
    """Per-block attention pooling of the token features with a learnable query e_i.

    For block i and group g: α = softmax_j(e_i^g · F^{g,j}) over non-padding tokens,
    h0_i^g = Σ_j α_j F^{g,j}; then h1_i = GELU(LN(W1_i h0_i)).

    Args:
        text_dim: d_l.
        depth: number of visual blocks (one query e_i and one W1_i each).
        groups: G, number of groups d_l is split into (d_l must divide evenly).
        reduction: r; h1 has d_l // r channels.
    """

    def __init__(self, text_dim: int, depth: int, groups: int = 12, reduction: int = 16) -> None:
        super().__init__()
        if text_dim % groups:
            raise UsageError(f"text width {text_dim} is not divisible by groups={groups}")
        if text_dim % reduction:
            raise UsageError(f"text width {text_dim} is not divisible by reduction={reduction}")
        self.groups = groups
        self.out_dim = text_dim // reduction
        self.queries = nn.Parameter(torch.randn(depth, text_dim) * 0.02)  # e_i
        self.reduce_weight = nn.Parameter(torch.empty(depth, self.out_dim, text_dim))  # W1_i
        self.reduce_bias = nn.Parameter(torch.zeros(depth, self.out_dim))
        self.norm_weight = nn.Parameter(torch.ones(depth, self.out_dim))
        self.norm_bias = nn.Parameter(torch.zeros(depth, self.out_dim))
        bound = 1 / math.sqrt(text_dim)  # nn.Linear's default range
        nn.init.uniform_(self.reduce_weight, -bound, bound)

    def no_weight_decay(self) -> set[str]:
        """The queries and the stacked per-block biases and norms: AdamW decays matrices only,
        and these are vectors stored one row per block."""
        return {"queries", "reduce_bias", "norm_weight", "norm_bias"}

    def forward(self, tokens: Tensor, attention_mask: Tensor, return_attention: bool = False):
        """Aggregate.

        Args:
            tokens: (B, L, d_l) token features.
            attention_mask: (B, L), 1 for real tokens and 0 for padding.
            return_attention: also return α.

        Returns:
            h1 of shape (B, depth, d_l // r), and α of shape (B, depth, G, L) if asked.
        """
        B, L, D = tokens.shape
        G = self.groups
        f = tokens.view(B, L, G, D // G)  # (B, L, G, dg)
        e = self.queries.view(-1, G, D // G)  # (N, G, dg)
        scores = torch.einsum("ngd,blgd->bngl", e.to(f.dtype), f)  # (B, N, G, L)
        pad = ~attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        alpha = scores.masked_fill(pad, float("-inf")).softmax(dim=-1)  # (B, N, G, L)
        h0 = torch.einsum("bngl,blgd->bngd", alpha, f).flatten(2)  # (B, N, d_l)
        h1 = torch.einsum("bnd,nkd->bnk", h0, self.reduce_weight.to(h0.dtype)) + self.reduce_bias  # (B, N, d_l/r)
        h1 = F.layer_norm(h1, (self.out_dim,), eps=1e-5) * self.norm_weight + self.norm_bias
        h1 = F.gelu(h1)
        return (h1, alpha) if return_attention else h1


class WeightGenerator(nn.Module):
    """Matrix-factorised qkv updates: ΔW_i = P · Φ_i(h1_i) · Qᵀ with P, Q shared by all blocks.

    Φ_i is a linear map d_l/r -> d_w·d_w, zero-initialised (weight and bias), so at
    initialisation every update is zero and the backbone is exactly the pretrained one.

    Args:
        in_dim: d_l / r, the width of the aggregated language feature.
        embed_dim: visual width C.
        depth: number of visual blocks.
        rank: d_w.
    """

    def __init__(self, in_dim: int, embed_dim: int, depth: int, rank: int = 32) -> None:
        super().__init__()
        self.rank = rank
        # P maps d_w -> 3C and Q maps C -> d_w; each starts uniform in ±1 / sqrt(its fan-in), as
        # the official port's HeUniform(a=sqrt(5)) initialises its S (3C, d_w) and D (d_w, C)
        # (src/model_law.py:299-300), nn.Linear's default range.
        p_bound, q_bound = 1 / math.sqrt(rank), 1 / math.sqrt(embed_dim)
        self.P = nn.Parameter(torch.empty(3 * embed_dim, rank).uniform_(-p_bound, p_bound))  # (3C, d_w)
        self.Q = nn.Parameter(torch.empty(embed_dim, rank).uniform_(-q_bound, q_bound))  # (C, d_w)
        self.phi_weight = nn.Parameter(torch.zeros(depth, rank * rank, in_dim))  # Φ_i
        self.phi_bias = nn.Parameter(torch.zeros(depth, rank * rank))

    def no_weight_decay(self) -> set[str]:
        """Φ's stacked per-block biases: AdamW decays matrices only."""
        return {"phi_bias"}

    def phi(self, h1: Tensor) -> Tensor:
        """(B, depth, d_l/r) -> Φ of shape (B, depth, d_w, d_w)."""
        phi = torch.einsum("bnk,nok->bno", h1, self.phi_weight.to(h1.dtype)) + self.phi_bias  # (B, N, d_w*d_w)
        return phi.view(*phi.shape[:2], self.rank, self.rank)  # (B, N, d_w, d_w)

    def forward(self, h1: Tensor) -> list[LowRank]:
        """Per-block factors (down, up) with ΔW_i(b)ᵀ = down @ up.

        down = Q·Φᵀ is (B, C, d_w) and up = Pᵀ is (d_w, 3C): x·ΔWᵀ = (x·Q)·Φᵀ·Pᵀ.
        """
        phi = self.phi(h1)  # (B, N, d_w, d_w)
        down = torch.einsum("cr,bnsr->bncs", self.Q.to(phi.dtype), phi)  # (B, N, C, d_w) = Q·Φᵀ
        up = self.P.t()  # (d_w, 3C)
        return [(down[:, i], up) for i in range(down.shape[1])]
