"""ViTDet backbone (plain ViT with window/global attention) whose qkv accept a per-sample
low-rank weight update.

Layout convention: tokens stay channels-last, (B, H, W, C), from the patch embedding to the
output, as in detectron2's ViT. Parameter names follow detectron2/timm (`blocks.N.attn.qkv`,
`pos_embed`, ...), so pretrained checkpoints map onto this module key for key.

The language-adaptive weight of block i is W_i = W0_i + ΔW_i(b) with ΔW_i(b)ᵀ = down_i(b) @ up,
`down_i` of shape (B, C, r) and `up` of shape (r, 3C). It is applied as a product chain,
qkv = x·W0ᵀ + bias + (x·down)·up, so no (B, 3C, C) tensor is ever built.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.models.geometry import (
    decomposed_rel_pos_bias,
    resize_abs_pos,
    sincos_pos_embed,
    window_partition,
    window_unpartition,
)

LowRank = tuple[Tensor, Tensor]  # (down: (B, C, r), up: (r, 3C))


class AdaptiveLinear(nn.Linear):
    """A linear layer whose weight takes a per-sample low-rank update: W(b) = W0 + (down(b)·up)ᵀ.

    The update arrives as a forward argument (as timm's `CondConv2d.forward(x, routing_weights)`
    takes its routing), never as module state, and is applied as the product chain
    x·W0ᵀ + bias + (x·down)·up, so no per-sample (B, C_out, C_in) weight is ever built. The
    parameters keep `nn.Linear`'s names (`weight`, `bias`), so pretrained `qkv` weights load
    as they are.
    """

    def forward(self, x: Tensor, low_rank: LowRank | None = None) -> Tensor:
        """(B, ..., C_in) -> (B, ..., C_out); every token of sample b uses sample b's update.

        Args:
            x: input, batch first.
            low_rank: None for the static weight, else (down (B, C_in, r), up (r, C_out)).
        """
        return add_low_rank(super().forward(x), x, low_rank)


def add_low_rank(out: Tensor, x: Tensor, low_rank: LowRank | None) -> Tensor:
    """The static projection `out` = x·W0ᵀ + bias plus the per-sample update (x·down)·up.

    Args:
        out: (B, ..., C_out) the static projection of `x`.
        x: (B, ..., C_in) its input.
        low_rank: None (out unchanged), else (down (B, C_in, r), up (r, C_out)).
    """
    if low_rank is None:
        return out
    down, up = low_rank
    B = x.shape[0]
    flat = x.reshape(B, -1, x.shape[-1])  # (B, N, C_in)
    out = torch.baddbmm(out.reshape(B, flat.shape[1], -1), flat @ down, up.expand(B, -1, -1))  # (B, N, C_out)
    return out.view(*x.shape[:-1], -1)


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position bias, windowed or global.

    Args:
        dim: channel width C.
        num_heads: number of heads; C must divide evenly.
        qkv_bias: learn a bias on the qkv projection.
        window_size: 0 for global attention, else the side of the square windows.
        input_size: token grid (H, W) the relative tables are sized for (the window for
            window blocks); other grids are handled by interpolating the tables.
        use_rel_pos: add the decomposed relative position bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] = (14, 14),
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.kernel = "sdpa"  # set by ViTDet.set_attention_kernel; the same arithmetic either way
        self.qkv = AdaptiveLinear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            table_hw = (window_size, window_size) if window_size else input_size
            # Zero-initialised as in ViTDet; pretrained tables are copied in by the checkpoint filters.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * table_hw[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * table_hw[1] - 1, self.head_dim))

    def no_weight_decay(self) -> set[str]:
        """Position tables, which AdamW leaves undecayed (timm's convention)."""
        return {"rel_pos_h", "rel_pos_w"} if self.use_rel_pos else set()

    def forward(self, x: Tensor, low_rank: LowRank | None = None) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        if self.window_size:
            # qkv is per token, so it is computed on the padded map before windowing; the padded
            # tokens then see exactly the bias detectron2 gives them, and the per-sample update
            # needs no repetition per window.
            pad_h = (self.window_size - H % self.window_size) % self.window_size
            pad_w = (self.window_size - W % self.window_size) % self.window_size
            if pad_h or pad_w:
                x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        qkv = self.qkv(x, low_rank)  # (B, Hp, Wp, 3C)
        if self.window_size:
            qkv, pad_hw = window_partition(qkv, self.window_size)  # (B*nW, ws, ws, 3C)
        Bw, h, w, _ = qkv.shape
        q, k, v = rearrange(qkv, "b h w (three nh hd) -> three b nh (h w) hd", three=3, nh=self.num_heads)
        if self.kernel == "flex" and self.use_rel_pos:
            from vglaw.models.flex import flex_rel_pos_attention

            out = flex_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))  # (Bw, nh, N, hd)
        else:
            bias = None
            if self.use_rel_pos:
                bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))  # (Bw, nh, N, N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (Bw, nh, N, hd)
        out = rearrange(out, "b nh (h w) hd -> b h w (nh hd)", h=h)  # (Bw, h, w, C)
        if self.window_size:
            out = window_unpartition(out, self.window_size, pad_hw, (H, W))  # (B, H, W, C)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Args:
        dim: channel width C.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of C.
        qkv_bias: learn a bias on the qkv projection.
        drop_path: stochastic depth rate of this block.
        window_size: 0 for global attention, else the window side.
        input_size: token grid the relative tables of a global block are sized for.
        use_rel_pos: add the decomposed relative position bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        window_size: int = 0,
        input_size: tuple[int, int] = (14, 14),
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, window_size, input_size, use_rel_pos)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, low_rank: LowRank | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), low_rank))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)


class ViTDet(nn.Module):
    """Plain ViT backbone of ViTDet (Li et al., 2022) with language-adaptive qkv.

    Args:
        img_size: input side the position tables are sized for; other sizes are interpolated.
        patch_size: patch side (output stride).
        in_chans: input channels.
        embed_dim: channel width C.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of C.
        qkv_bias: learn a bias on qkv.
        drop_path_rate: stochastic depth, increasing linearly to this rate over the blocks.
        window_size: window side of the window blocks.
        window_block_indexes: blocks using window attention; the others attend globally.
        use_rel_pos: add decomposed relative position bias.
        embed_layer: the patch embedding, called as `PatchEmbed(patch_size, in_chans,
            embed_dim)` (timm's `embed_layer=`); it maps (B, in_chans, H, W) to (B, H/p, W/p, C).
    """

    def __init__(
        self,
        img_size: int = 448,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        window_size: int = 14,
        window_block_indexes: Sequence[int] = (0, 1, 3, 4, 6, 7, 9, 10),
        use_rel_pos: bool = True,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise UsageError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = img_size // patch_size
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grad_checkpointing = False
        self.patch_embed = embed_layer(patch_size, in_chans, embed_dim)
        # Without pretrained weights, start from MAE's fixed sin-cos table: position is then
        # readable from step one, which matters for "left of" / "at the top" expressions.
        self.pos_embed = nn.Parameter(sincos_pos_embed((grid, grid), embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                rates[i],
                window_size if i in window_block_indexes else 0,
                (grid, grid),
                use_rel_pos,
            )
            for i in range(depth)
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """The absolute position table, which AdamW leaves undecayed (timm's convention)."""
        return {"pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block during backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def set_attention_kernel(self, kernel: str = "sdpa") -> None:
        """How attention with the relative-position bias runs: "sdpa" (the bias as an additive
        mask to `scaled_dot_product_attention`) or "flex" (`torch.nn.attention.flex_attention`
        adding the two bias terms in a `score_mod`, which lets a fused kernel run on GPUs; see
        `vglaw.models.flex`). Both compute the same attention."""
        if kernel not in ("sdpa", "flex"):
            raise UsageError(f"attention kernel must be 'sdpa' or 'flex', got {kernel!r}")
        for block in self.blocks:
            block.attn.kernel = kernel

    def forward(self, images: Tensor, qkv_low_rank: Sequence[LowRank] | None = None) -> Tensor:
        """Encode images: (B, 3, H, W), H and W multiples of the patch size -> (B, H/p, W/p, C).

        Args:
            images: normalised images.
            qkv_low_rank: one (down, up) pair per block for language-adaptive weights, or None
                for the static backbone.
        """
        return self.forward_blocks(self.patch_embed(images), qkv_low_rank)

    def forward_blocks(self, tokens: Tensor, qkv_low_rank: Sequence[LowRank] | None = None) -> Tensor:
        """Add position embeddings to patch tokens (B, h, w, C) and run the blocks."""
        if qkv_low_rank is not None and len(qkv_low_rank) != len(self.blocks):
            raise ValueError(f"got {len(qkv_low_rank)} low-rank updates for {len(self.blocks)} blocks")
        x = tokens + resize_abs_pos(self.pos_embed, tokens.shape[1:3])
        for i, block in enumerate(self.blocks):
            low_rank = None if qkv_low_rank is None else qkv_low_rank[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, low_rank, use_reentrant=False)
            else:
                x = block(x, low_rank)
        return x
