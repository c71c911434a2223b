"""Task heads on the backbone's last feature map: language-adaptive pooling (box) and the
transposed-convolution mask head.

Layout: the backbone hands (B, H, W, C) channels-last tokens; the box head keeps them as
(B, H·W, C); the mask head upsamples channels-last and returns channels-first (B, ·, H, W) logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LAPBoxHead(nn.Module):
    """Language-adaptive pooling, then a 3-layer MLP to a normalised (cx, cy, w, h) box.

    A = softmax_{HW}(φ_v(F_v) · φ_t(F_l¹) / √k); pooled = Σ A·F_v over the raw backbone
    features; box = σ(MLP(pooled)). The 1/√k is the official port's (a single-head attention
    with k = 64).

    Args:
        visual_dim: C.
        text_dim: d_l.
        attn_dim: k, width of the space the visual tokens and the `[CLS]` feature meet in.
        hidden_dim: width of the MLP's two hidden layers.
    """

    def __init__(self, visual_dim: int, text_dim: int, attn_dim: int = 64, hidden_dim: int = 256) -> None:
        super().__init__()
        self.visual_proj = nn.Linear(visual_dim, attn_dim)
        self.text_proj = nn.Linear(text_dim, attn_dim)
        self.mlp = nn.Sequential(
            nn.Linear(visual_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 4),
        )

    def forward(self, features: Tensor, text_cls: Tensor) -> dict[str, Tensor]:
        """(B, H, W, C) features and (B, d_l) text -> "boxes" (B, 4) and "lap_attention", A (B, H, W)."""
        B, H, W, C = features.shape
        tokens = features.reshape(B, H * W, C)  # (B, HW, C)
        keys = self.visual_proj(tokens)  # (B, HW, k)
        query = self.text_proj(text_cls)  # (B, k)
        logits = torch.einsum("bnk,bk->bn", keys, query) / math.sqrt(keys.shape[-1])  # (B, HW)
        attn = logits.softmax(dim=-1)
        pooled = torch.einsum("bn,bnc->bc", attn, tokens)  # (B, C)
        return {"boxes": self.mlp(pooled).sigmoid(), "lap_attention": attn.view(B, H, W)}


def conv_transpose_2x2(x: Tensor, conv: nn.ConvTranspose2d) -> Tensor:
    """`conv` (kernel 2, stride 2) applied to a channels-last map: (B, H, W, Cin) -> (B, 2H, 2W, Cout).

    With kernel = stride the output pixels of different input pixels never overlap, so the
    transposed convolution is one matrix product followed by depth-to-space; this is the same
    arithmetic as `conv(x.permute(0, 3, 1, 2))`, several times faster on CPUs. The weight is
    ordered (kh, kw, Cout) so depth-to-space moves whole Cout-long rows, and the bias rides in
    the matrix product.
    """
    B, H, W, cin = x.shape
    cout = conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout).to(x.dtype)  # (Cin, kh*kw*Cout)
    flat = x.reshape(-1, cin)
    if conv.bias is None:
        y = flat @ weight
    else:
        y = torch.addmm(conv.bias.to(x.dtype).repeat(4), flat, weight)
    y = y.view(B, H, W, 2, 2, cout).permute(0, 1, 3, 2, 4, 5)  # (B, H, kh, W, kw, Cout)
    return y.reshape(B, 2 * H, 2 * W, cout)


def conv_transpose_2x2_readout(y: Tensor, conv: nn.ConvTranspose2d, readout: Tensor) -> Tensor:
    """Per-pixel dot products of `conv(y)` with O per-sample vectors, without building `conv(y)`.

    The (B, 2H, 2W, Cout) output of the last transposed convolution is only ever read through a
    few vectors, and the readout is linear, so the vectors are folded into the convolution's
    weight per sample: the same function (up to rounding) at a fraction of the memory traffic.

    Args:
        y: (B, H, W, Cin) channels-last input.
        conv: kernel-2, stride-2 transposed convolution Cin -> Cout.
        readout: (B, Cout, O) vectors.

    Returns:
        (B, O, 2H, 2W): out[b, o] = Σ_c conv(y)[b, c] · readout[b, c, o], bias included.
    """
    B, H, W, cin = y.shape
    n_out = readout.shape[-1]  # O
    w_up = conv.weight.permute(0, 2, 3, 1).reshape(cin * 4, -1)  # (Cin·kh·kw, Cout)
    w_y = (w_up @ readout).view(B, cin, 4 * n_out)  # (B, Cin, kh·kw·O)
    out = torch.bmm(y.reshape(B, H * W, cin), w_y.to(y.dtype))  # (B, H·W, kh·kw·O)
    out = out.view(B, H, W, 2, 2, n_out).permute(0, 5, 1, 3, 2, 4)  # (B, O, H, kh, W, kw)
    out = out.reshape(B, n_out, 2 * H, 2 * W)  # (B, O, 2H, 2W)
    bias = (conv.bias @ readout).to(out.dtype)  # (B, O)
    return out + bias[:, :, None, None]


class MaskHead(nn.Module):
    """Two stride-2 transposed convolutions (stride 16 -> 4, d_l channels out), a per-pixel
    linear projection whose weight is the raw `[CLS]` feature, bilinear x4 upsampling.

    s̄ = F̂_v · F_l¹ with F̂_v = up2(GELU(LN(up1(F_v)))); no projection of the text. The last
    upsampling uses align_corners=True, as the official port's `nn.Upsample` does.

    Args:
        visual_dim: C.
        text_dim: d_l, the output width of the second transposed convolution.
        hidden_dim: channels between the two transposed convolutions (paper: 256).
    """

    def __init__(self, visual_dim: int, text_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(visual_dim, hidden_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.up2 = nn.ConvTranspose2d(hidden_dim, text_dim, kernel_size=2, stride=2)

    def forward(self, features: Tensor, text_cls: Tensor, out_size: tuple[int, int]) -> dict[str, Tensor]:
        """(B, H, W, C) features and (B, d_l) `[CLS]` -> "mask_logits" (B, 1, *out_size)."""
        y = F.gelu(self.norm(conv_transpose_2x2(features, self.up1)))  # (B, 2H, 2W, hidden)
        logits = conv_transpose_2x2_readout(y, self.up2, text_cls.unsqueeze(-1))  # (B, 1, 4H, 4W)
        return {"mask_logits": F.interpolate(logits, size=out_size, mode="bilinear", align_corners=True)}
