"""VG-LAW for a backbone trained from scratch on little data (the CPU shapes demo).

Not the paper: the paper starts from a COCO-pretrained ViTDet and a pretrained BERT. Without
them, a few departures measurably help (see docs/shapes_experiments.md for the trials):

- `ConvStem`: convolutions before the patch projection, so small shapes are seen whole;
- `FrozenTextEncoder`: a fixed, cached text encoder (the CPU cost of BERT every step buys
  nothing when the expressions repeat every epoch);
- `NormedLAPBoxHead`: LayerNorm before the pooling (a from-scratch residual stream grows);
- `ScratchMaskHead`: a projected, scaled text readout, the stem's stride-4 map added before it
  and an auxiliary per-pixel category classifier;
- the heads read the mean of the token features instead of `[CLS]`.

`ScratchVGLAW` passes these parts to the paper's `VGLAW` (its `text_layer=`, `embed_layer=`,
`box_head_layer=`, `mask_head_layer=`); the paper's classes carry none of them. Layouts as in `vglaw.models.vglaw`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.models.config import ScratchConfig
from vglaw.models.heads import LAPBoxHead, conv_transpose_2x2, conv_transpose_2x2_readout
from vglaw.models.text_encoder import TextEncoder
from vglaw.models.vglaw import VGLAW
from vglaw.models.vitdet import LowRank


class ConvStem(nn.Module):
    """A small CNN, then non-overlapping patches of its stride-4 map: (B, 3, H, W) -> (B, H/p, W/p, C).

    Two stride-2 3x3 convolutions and `depth` stride-1 3x3 convolutions at stride 4, each with
    BatchNorm and GELU ("early convolutions", Xiao et al., 2021): a linear patch embedding has
    to learn shapes smaller than two patches across from few examples. The stride-1
    convolutions widen the stride-4 map's receptive field from 7 to 7 + 8·depth pixels, enough
    to see a whole small object. Pretrained checkpoints carry a `PatchEmbed`, so they do not
    load into it; with several GPUs and a small per-device batch use `sync_batchnorm`.

    Args:
        patch_size: output stride p, a multiple of 4.
        in_chans: input channels.
        embed_dim: C; the stride-4 map has C / 4 channels.
        depth: stride-1 convolutions at stride 4.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, depth: int = 0) -> None:
        super().__init__()
        if patch_size % 4:
            raise UsageError(f"the conv stem needs a patch size divisible by 4, got {patch_size}")
        if depth < 0:
            raise UsageError(f"stem depth must be >= 0, got {depth}")
        self.out_dim = embed_dim // 4

        def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())

        self.convs = nn.Sequential(conv(in_chans, embed_dim // 8, 2), conv(embed_dim // 8, self.out_dim, 2),
                                   *(conv(self.out_dim, self.out_dim, 1) for _ in range(depth)))
        self.proj = nn.Conv2d(self.out_dim, embed_dim, kernel_size=patch_size // 4, stride=patch_size // 4)
        # CPU convolutions (oneDNN) run faster channels-last (~20% of this stem's cost), and the
        # patch tokens then come out channels-last without a copy.
        self.to(memory_format=torch.channels_last)

    def stride4(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> the stride-4 map (B, C/4, H/4, W/4), channels-last in memory."""
        return self.convs(x.contiguous(memory_format=torch.channels_last))

    def embed(self, s4: Tensor) -> Tensor:
        """The stride-4 map -> patch tokens (B, H/p, W/p, C)."""
        return self.proj(s4).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.stride4(x))


class FrozenTextEncoder(nn.Module):
    """A text encoder kept fixed (no gradients, no dropout) whose features may be remembered.

    Args:
        encoder: the `TextEncoder` to freeze.
        cache_size: remember the features of this many distinct expressions (least recently
            used dropped first); 0 disables the cache. Worth it when expressions repeat across
            epochs, as they do in training. Loading weights empties it.
    """

    def __init__(self, encoder: TextEncoder, cache_size: int = 0) -> None:
        super().__init__()
        if cache_size < 0:
            raise UsageError(f"text_cache_size must be >= 0, got {cache_size}")
        self.encoder = encoder.requires_grad_(False)
        self.dim, self.source = encoder.dim, encoder.source
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache.clear())
        self.train()

    @property
    def bert_config(self):
        return self.encoder.bert_config

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, L, d_l); with a cache, padding positions hold zeros."""
        if not self.cache_size:
            return self.encoder(input_ids, attention_mask)
        real = attention_mask.bool()  # (B, L)
        keys = [tuple(row[keep].tolist()) for row, keep in zip(input_ids, real)]
        for b, k in enumerate(keys):
            if k not in self._cache:
                # One expression at a time, unpadded: a remembered feature must not depend on the
                # batch it was first seen in (padding length and batch size change the rounding),
                # or a resumed run, which fills the cache in other batches, would drift from the
                # uninterrupted one.
                ids = input_ids[b : b + 1, real[b]]  # (1, n_real)
                self._cache[k] = self.encoder(ids, torch.ones_like(ids))[0]  # (n_real, d_l)
        rows = []
        for k in keys:
            self._cache.move_to_end(k)
            rows.append(self._cache[k])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        tokens = rows[0].new_zeros(*input_ids.shape, self.dim)  # (B, L, d_l)
        for b, row in enumerate(rows):
            tokens[b, real[b]] = row.to(tokens)
        return tokens.to(input_ids.device)


class NormedLAPBoxHead(LAPBoxHead):
    """`LAPBoxHead` on LayerNorm-ed features: a backbone trained from scratch has no pretrained
    scale, its residual stream grows, and the pooling logits would be badly scaled."""

    def __init__(self, visual_dim: int, text_dim: int, attn_dim: int = 64, hidden_dim: int = 256) -> None:
        super().__init__(visual_dim, text_dim, attn_dim, hidden_dim)
        self.norm = nn.LayerNorm(visual_dim, eps=1e-6)

    def forward(self, features: Tensor, text_cls: Tensor) -> dict[str, Tensor]:
        return super().forward(self.norm(features), text_cls)


class ScratchMaskHead(nn.Module):
    """Two stride-2 transposed convolutions to C channels at stride 4, [+ a projected stride-4
    image map], read per pixel by the projected text / √C [and a category classifier].

    Args:
        visual_dim: C.
        text_dim: d_l.
        hidden_dim: channels between the two transposed convolutions.
        skip_dim: channels of a stride-4 image map added (projected to C) before the readout,
            so mask edges can follow the image inside a patch; 0 for none.
        seg_classes: also classify every stride-4 pixel into this many categories (background
            included) for an auxiliary loss that teaches the backbone what the objects are; 0
            for none.
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

    def forward(self, features: Tensor, text: Tensor, out_size: tuple[int, int],
                skip: Tensor | None = None) -> dict[str, Tensor]:
        """(B, H, W, C) features, (B, d_l) text [, (B, skip_dim, 4H, 4W) map] -> "mask_logits"
        (B, 1, *out_size) and, with `seg_classes`, "seg_logits" (B, seg_classes, *out_size).

        The stride-4 features x = up2(y) [+ skip(map)] are read through O = 1 + seg_classes
        vectors, folded into up2's and skip's weights per sample (`conv_transpose_2x2_readout`).
        """
        if (skip is None) != (self.skip is None):
            raise ValueError("pass a skip map exactly when the head was built with skip_dim")
        y = F.gelu(self.norm(conv_transpose_2x2(features, self.up1)))  # (B, 2H, 2W, hidden)
        B, C = y.shape[0], self.up2.out_channels
        readout = (self.text_proj(text) / math.sqrt(C)).unsqueeze(-1)  # (B, C, 1)
        if self.seg is not None:
            readout = torch.cat([readout, self.seg.weight.t().expand(B, -1, -1)], dim=-1)  # (B, C, O)
        out = conv_transpose_2x2_readout(y, self.up2, readout)  # (B, O, 4H, 4W)
        bias = out.new_zeros(B, readout.shape[-1])  # (B, O)
        if self.skip is not None:
            w_skip = (self.skip.weight.t() @ readout).transpose(1, 2)  # (B, O, skip_dim)
            out = out + torch.bmm(w_skip, skip.flatten(2)).view_as(out)  # (B, O, 4H, 4W)
            bias = bias + self.skip.bias @ readout
        if self.seg is not None:
            bias = bias + torch.cat([self.seg.bias.new_zeros(1), self.seg.bias])
        out = out + bias[:, :, None, None]
        # Split before upsampling: a slice's backward fills a zero tensor of its source's size.
        # Category logits at full resolution too: at stride 4 they cost 5% less time but gave
        # coarser masks (val mask Prec@0.9 0.35 vs 0.39 after 4884 steps, make demo).
        up = lambda t: F.interpolate(t, size=out_size, mode="bilinear", align_corners=False)  # (B, ·, *out_size)
        return {"mask_logits": up(out[:, :1]), **({"seg_logits": up(out[:, 1:])} if self.seg is not None else {})}


class ScratchVGLAW(VGLAW):
    """VG-LAW with the parts that help a backbone trained from scratch (module docstring),
    passed in to the paper's `VGLAW`.

    Args:
        config: a `ScratchConfig` (or its fields as keyword arguments).
    """

    config_class = ScratchConfig

    def __init__(self, config: ScratchConfig | None = None, **fields: Any) -> None:
        config = self.make_config(config, fields)
        skip_dim = config.embed_dim // 4 if config.mask_skip else 0  # the stem's stride-4 channels

        def text_layer(name_or_path: str, num_layers: int | None, pretrained: bool) -> nn.Module:
            encoder = TextEncoder(name_or_path, num_layers, pretrained)
            return FrozenTextEncoder(encoder, config.text_cache_size) if config.freeze_text else encoder

        super().__init__(
            config,
            text_layer=text_layer,
            embed_layer=partial(ConvStem, depth=config.stem_depth),
            box_head_layer=NormedLAPBoxHead,
            mask_head_layer=partial(ScratchMaskHead, skip_dim=skip_dim, seg_classes=config.seg_classes),
        )

    def sentence_feature(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        if self.config.sentence == "cls":
            return tokens[:, 0]
        real = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return (tokens * real).sum(1) / real.sum(1).clamp(min=1)  # (B, d_l)

    def ground(self, images: Tensor, qkv: Sequence[LowRank] | None, sentence: Tensor) -> dict[str, Tensor]:
        stem = self.backbone.patch_embed
        s4 = stem.stride4(images)  # (B, C/4, H/4, W/4)
        features = self.backbone.forward_blocks(stem.embed(s4), qkv)  # (B, h, w, C)
        maps = {"skip": s4} if self.config.mask_skip else {}
        return self.forward_heads(features, sentence, images.shape[-2:], **maps)
