"""Task heads on the backbone's last feature map.

Layout: the backbone hands (B, H, W, C) channels-last tokens; the box head keeps them as
(B, H·W, C); the mask head upsamples channels-last and returns channels-first (B, ·, H, W) logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LAPBoxHead(nn.Module):
    """Language-adaptive pooling then a 3-layer MLP to a normalised (cx, cy, w, h) box.

    A = softmax_{HW}(φ_v(F̂_v) · φ_t(t) / √k); pooled = Σ A·F̂_v; box = σ(MLP(pooled)),
    with F̂_v = LayerNorm(F_v): ViTDet has no final norm, and a from-scratch backbone's
    residual stream grows, which would otherwise leave the attention logits badly scaled.

    Args:
        visual_dim: C.
        text_dim: d_l.
        attn_dim: k, width of the space the visual tokens and the `[CLS]` feature meet in.
        hidden_dim: width of the MLP's two hidden layers.
    """

    def __init__(self, visual_dim: int, text_dim: int, attn_dim: int = 64, hidden_dim: int = 256,
                 logit_scale: float | None = None) -> None:
        super().__init__()
        self.logit_scale = logit_scale if logit_scale is not None else 1 / math.sqrt(attn_dim)
        self.norm = nn.LayerNorm(visual_dim, eps=1e-6)
        self.visual_proj = nn.Linear(visual_dim, attn_dim)
        self.text_proj = nn.Linear(text_dim, attn_dim)
        self.mlp = nn.Sequential(
            nn.Linear(visual_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 4),
        )

    def forward(self, features: Tensor, text_cls: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, W, C) features and (B, d_l) text -> boxes (B, 4) and attention (B, H, W)."""
        B, H, W, C = features.shape
        tokens = self.norm(features.reshape(B, H * W, C))  # (B, HW, C)
        keys = self.visual_proj(tokens)  # (B, HW, k)
        query = self.text_proj(text_cls)  # (B, k)
        logits = torch.einsum("bnk,bk->bn", keys, query) * self.logit_scale  # (B, HW)
        attn = logits.softmax(dim=-1)
        pooled = torch.einsum("bn,bnc->bc", attn, tokens)  # (B, C)
        return self.mlp(pooled).sigmoid(), attn.view(B, H, W)


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


class MaskHead(nn.Module):
    """Two stride-2 transposed convolutions (stride 16 -> 4), a per-pixel dot product with the
    projected `[CLS]` feature, and bilinear upsampling to the input size.

    Args:
        visual_dim: C.
        text_dim: d_l.
        hidden_dim: channels between the two transposed convolutions.
        skip_dim: channels of a stride-4 image map added (projected to C) before the dot
            product, so mask edges can follow the image inside a patch (not in the paper);
            0 for none.
        seg_classes: also classify every pixel of the stride-4 features into this many
            categories (background included) with a linear layer, for an auxiliary loss that
            teaches a from-scratch backbone what the objects are (not in the paper); 0 for none.
    """

    def __init__(self, visual_dim: int, text_dim: int, hidden_dim: int = 256, skip_dim: int = 0,
                 seg_classes: int = 0) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(visual_dim, hidden_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.up2 = nn.ConvTranspose2d(hidden_dim, visual_dim, kernel_size=2, stride=2)
        self.text_proj = nn.Linear(text_dim, visual_dim)
        self.skip = nn.Linear(skip_dim, visual_dim) if skip_dim else None
        self.seg = nn.Linear(visual_dim, seg_classes) if seg_classes else None

    def forward(self, features: Tensor, text_cls: Tensor, out_size: tuple[int, int],
                skip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, H, W, C) features, (B, d_l) text [, (B, skip_dim, 4H, 4W) map] -> mask logits
        (B, 1, *out_size) and, with `seg_classes`, category logits (B, seg_classes, *out_size).

        The stride-4 features x = up2(y) [+ skip(map)] are only ever read through O = 1 +
        seg_classes vectors (the projected text / √C and the classifier's rows), and everything
        after the GELU is linear, so those vectors are folded into up2's and skip's weights per
        sample and the (B, 4H, 4W, C) map is never built: the same function (up to rounding)
        at a fraction of the memory traffic.
        """
        if (skip is None) != (self.skip is None):
            raise ValueError("pass a skip map exactly when the head was built with skip_dim")
        y = F.gelu(self.norm(conv_transpose_2x2(features, self.up1)))  # (B, 2H, 2W, hidden)
        B, H2, W2, hidden = y.shape
        C = self.up2.out_channels
        readout = (self.text_proj(text_cls) / math.sqrt(C)).unsqueeze(-1)  # (B, C, 1)
        if self.seg is not None:
            readout = torch.cat([readout, self.seg.weight.t().expand(B, -1, -1)], dim=-1)  # (B, C, O)
        n_out = readout.shape[-1]  # O
        w_up = self.up2.weight.permute(0, 2, 3, 1).reshape(hidden * 4, C)  # (hidden·kh·kw, C)
        w_y = (w_up @ readout).view(B, hidden, 4 * n_out)  # (B, hidden, kh·kw·O)
        out = torch.bmm(y.reshape(B, H2 * W2, hidden), w_y)  # (B, 2H·2W, kh·kw·O)
        out = out.view(B, H2, W2, 2, 2, n_out).permute(0, 5, 1, 3, 2, 4)  # (B, O, 2H, kh, 2W, kw)
        out = out.reshape(B, n_out, 2 * H2, 2 * W2)  # (B, O, 4H, 4W)
        bias = self.up2.bias @ readout  # (B, O)
        if self.skip is not None:
            w_skip = (self.skip.weight.t() @ readout).transpose(1, 2)  # (B, O, skip_dim)
            out = out + torch.bmm(w_skip, skip.flatten(2)).view_as(out)  # (B, O, 4H, 4W)
            bias = bias + self.skip.bias @ readout
        if self.seg is not None:
            bias = bias + torch.cat([self.seg.bias.new_zeros(1), self.seg.bias])
        out = out + bias[:, :, None, None]
        # Split before upsampling: a slice's backward fills a zero tensor of its source's size.
        up = lambda t: F.interpolate(t, size=out_size, mode="bilinear", align_corners=False)  # (B, ·, *out_size)
        return up(out[:, :1]), (up(out[:, 1:]) if self.seg is not None else None)
