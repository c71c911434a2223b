"""Describing a region (referring-expression generation) with the grounding model's own backbone.

Beside the paper, which maps an expression to a region, the inverse: a query box becomes an
expression that singles it out.

- `LocationEncoder`: the box becomes a few pseudo-tokens in the text features' space. They take
  the expression's place: the model's own aggregator and weight generator turn them into qkv
  updates, so the location drives the backbone the way an expression does (location-adaptive
  weights through the same low-rank generator; `describe_adaptive=False` reads the static
  backbone instead, the ablation).
- `ExpressionDecoder`: a small autoregressive Transformer decoder that writes WordPiece tokens
  of the text encoder's vocabulary, cross-attending to the location-adapted feature map (each
  cell marked inside or outside the box) and the location tokens.

`DescribeMixin` adds both to a grounding model; its grounding parts and outputs are unchanged,
so one model file both grounds (`forward`) and describes (`forward_describe`, and the decoding
in `vglaw.models.decoding`). Layouts as in `vglaw.models.vglaw`; boxes here are normalised
(x1, y1, x2, y2) of the letterboxed input; token ids (B, T) start with `[CLS]` (the decoder's
begin token) and end with `[SEP]` (its end token).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vglaw.models.config import DescribingConfig, DescribingScratchConfig
from vglaw.models.scratch import ScratchVGLAW
from vglaw.models.vglaw import VGLAW, LanguageWeights


class LocationEncoder(nn.Module):
    """A box -> `num_tokens` pseudo-tokens (B, n, d_l), from Fourier features of its corners.

    Args:
        text_dim: d_l, the width of the text encoder's token features.
        num_tokens: pseudo-tokens per box.
        frequencies: octaves of the Fourier features (2^0 .. 2^(f-1) periods across the input).
        hidden_dim: width of the MLP.
    """

    def __init__(self, text_dim: int, num_tokens: int = 4, frequencies: int = 8, hidden_dim: int = 256) -> None:
        super().__init__()
        self.num_tokens, self.text_dim = num_tokens, text_dim
        self.register_buffer("bands", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        in_dim = 4 * (2 * frequencies + 1)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * text_dim))
        self.norm = nn.LayerNorm(text_dim, eps=1e-6)

    def forward(self, boxes: Tensor) -> Tensor:
        """(B, 4) normalised xyxy -> (B, n, d_l)."""
        angles = boxes.unsqueeze(-1) * self.bands.to(boxes.dtype)  # (B, 4, F)
        feats = torch.cat([boxes, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)  # (B, 4(2F+1))
        return self.norm(self.mlp(feats).view(-1, self.num_tokens, self.text_dim))  # (B, n, d_l)


def inside_box(boxes: Tensor, h: int, w: int) -> Tensor:
    """(B, 4) normalised xyxy -> (B, h*w) bool: the cells whose centre lies in the box, and
    always the cell holding the box's centre (a box smaller than a cell marks that one)."""
    ys = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) / h  # (h,)
    xs = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) / w  # (w,)
    x1, y1, x2, y2 = (boxes[:, k, None, None] for k in range(4))  # (B, 1, 1) each
    inside = (xs >= x1) & (xs <= x2) & (ys[:, None] >= y1) & (ys[:, None] <= y2)  # (B, h, w)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 * w).long().clamp(0, w - 1)  # (B,)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 * h).long().clamp(0, h - 1)
    inside[torch.arange(len(boxes), device=boxes.device), cy, cx] = True
    return inside.flatten(1)  # (B, h*w)


class ExpressionDecoder(nn.Module):
    """Write an expression token by token from the location-adapted features.

    Args:
        vocab_size: the text encoder's WordPiece vocabulary (input and output embeddings tied).
        visual_dim: C.
        text_dim: d_l (of the location tokens).
        grid: side of the token grid (img_size / patch_size), for the cells' position table.
        dim: decoder width.
        depth: decoder blocks.
        num_heads: attention heads.
        max_len: longest sequence, `[CLS]` included.
        dropout: dropout in the decoder blocks.
    """

    def __init__(self, vocab_size: int, visual_dim: int, text_dim: int, grid: int, dim: int = 256, depth: int = 2,
                 num_heads: int = 4, max_len: int = 24, dropout: float = 0.1) -> None:
        super().__init__()
        self.max_len = max_len
        self.words = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(max_len, dim))
        self.cells = nn.Parameter(torch.zeros(grid * grid, dim))
        self.inside = nn.Parameter(torch.zeros(2, dim))  # added to cells outside / inside the box
        self.visual = nn.Sequential(nn.LayerNorm(visual_dim, eps=1e-6), nn.Linear(visual_dim, dim))
        self.location = nn.Linear(text_dim, dim)
        block = nn.TransformerDecoderLayer(dim, num_heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerDecoder(block, depth)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for p in (self.positions, self.cells, self.inside):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.words.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"positions", "cells", "inside"}

    def memory(self, features: Tensor, boxes: Tensor, location: Tensor) -> Tensor:
        """(B, h, w, C) features, (B, 4) boxes, (B, n, d_l) location tokens -> (B, h*w + n, dim)."""
        B, h, w, C = features.shape
        cells = self.visual(features.reshape(B, h * w, C))  # (B, hw, dim)
        if cells.shape[1] != self.cells.shape[0]:
            raise ValueError(f"a {h}x{w} token grid; the decoder was built for {self.cells.shape[0]} cells")
        cells = cells + self.cells + self.inside[inside_box(boxes, h, w).long()]  # (B, hw, dim)
        return torch.cat([cells, self.location(location)], dim=1)

    def forward(self, memory: Tensor, input_ids: Tensor) -> Tensor:
        """(B, M, dim) memory, (B, T) ids so far -> (B, T, vocab) next-token logits."""
        T = input_ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"{T} tokens; the decoder holds at most {self.max_len}")
        x = self.words(input_ids) + self.positions[:T]  # (B, T, dim)
        causal = torch.triu(torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype), diagonal=1)
        x = self.blocks(x, memory, tgt_mask=causal)
        return self.norm(x) @ self.words.weight.t()  # (B, T, vocab)


class DescribeMixin:
    """Adds a describing head (`LocationEncoder` + `ExpressionDecoder`) to a VG-LAW model.

    Args:
        config: a `DescribingConfig` or `DescribingScratchConfig` (or its fields).
    """

    describes = True

    def __init__(self, config: Any = None, **fields: Any) -> None:
        super().__init__(config, **fields)
        c = self.config
        self.locator = LocationEncoder(self.text.dim, c.location_tokens)
        self.describer = ExpressionDecoder(self.text.bert_config.vocab_size, c.embed_dim, self.text.dim,
                                           c.img_size // c.patch_size, c.describe_dim, c.describe_layers,
                                           c.describe_heads, c.max_words)

    def location_weights(self, boxes: Tensor) -> LanguageWeights:
        """Box -> location tokens -> the model's own aggregation and qkv updates (as `language_weights`)."""
        tokens = self.locator(boxes)  # (B, n, d_l)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)  # (B, n)
        h1, alpha = self.aggregator(tokens, mask, return_attention=True)
        return LanguageWeights(self.weight_generator(h1), tokens.mean(1), alpha, tokens)

    def located_features(self, images: Tensor, boxes: Tensor) -> tuple[Tensor, LanguageWeights]:
        """The backbone features (B, h, w, C) steered by each box, and the box's location weights."""
        loc = self.location_weights(boxes)
        return self.forward_features(images, loc.qkv if self.config.describe_adaptive else None), loc

    def describe_memory(self, images: Tensor, boxes: Tensor) -> Tensor:
        """What the decoder reads for each (image, box): (B, h*w + n, dim)."""
        features, loc = self.located_features(images, boxes)
        return self.describer.memory(features, boxes, loc.tokens)

    def forward_describe(self, images: Tensor, boxes: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        """Teacher-forced next-token logits for expressions of the boxes.

        Args:
            images: (B, 3, H, W).
            boxes: (B, 4) normalised xyxy of the input.
            input_ids: (B, T) the expressions, `[CLS]` first.

        Returns:
            "word_logits" (B, T, vocab): the logits of token t+1 at position t; with a box head,
            "located_boxes" (B, 4) normalised cxcywh: its reading of the location-adapted
            features with the location tokens' mean as the sentence (where the box points the
            backbone; a training signal, not needed to describe).
        """
        features, loc = self.located_features(images, boxes)
        out = {"word_logits": self.describer(self.describer.memory(features, boxes, loc.tokens), input_ids)}
        if self.box_head is not None:
            out["located_boxes"] = self.box_head(features, loc.sentence)["boxes"]
        return out


class DescribingVGLAW(DescribeMixin, VGLAW):
    """The paper's VG-LAW with a describing head (`DescribeMixin`)."""

    config_class = DescribingConfig


class DescribingScratchVGLAW(DescribeMixin, ScratchVGLAW):
    """The from-scratch VG-LAW with a describing head (`DescribeMixin`), for the shapes demo."""

    config_class = DescribingScratchConfig
