"""Generalised grounding: an expression names zero, one or many objects (gRefCOCO).

Beside the paper: the same language-adaptive backbone and union-mask head, plus

- `CentreBoxHead`, dense referring-object centres: at stride p/2, a language-conditioned
  heat map of where the centres of the referred objects are, and the box at each location
  (CenterNet's formulation, Zhou et al., 2019). Every local maximum is one box with its score,
  so a set of any size, empty included, comes out with no matching step, and the dense
  supervision trains from scratch faster than set prediction with learned queries;
- `ExistenceHead`: whether the expression names anything at all, from a language-adaptive
  pooling of the features; it gates both the boxes and the mask.

A centre peak's height is not a probability that its box is right (the penalty-reduced focal
loss keeps peaks low), while GREC keeps the boxes scoring at least 0.7. So a box's score is the
peak's logit through a Platt scaling fitted on held-out data (`CentreBoxHead.score_calibration`,
fitted at each validation by `vglaw.training.calibration`): a score is then the estimated
probability that the box matches a referred object.

`GeneralisedVGLAW` (the paper's model) and `GeneralisedScratchVGLAW` (the from-scratch one)
add both heads through `GeneralisedMixin`; the paper's classes are unchanged.
Layouts as in `vglaw.models.vglaw`; the centre map is (B, 2h, 2w) for an (h, w) token grid.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vglaw.models.config import GeneralisedConfig, GeneralisedScratchConfig
from vglaw.models.heads import conv_transpose_2x2
from vglaw.models.scratch import ScratchVGLAW
from vglaw.models.vglaw import VGLAW

EXIST_THRESHOLD = 0.5  # existence probability below which the expression names nothing
BOX_SCORE_THRESHOLD = 0.7  # a box counts when its centre score reaches this (gRefCOCO's GREC rule)


class CentreBoxHead(nn.Module):
    """Where the referred objects' centres are, and the box at each location.

    Args:
        visual_dim: C.
        text_dim: d_l.
        hidden_dim: channels of the stride-p/2 map.
    """

    def __init__(self, visual_dim: int, text_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(visual_dim, hidden_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.centre_bias = nn.Parameter(torch.tensor(-math.log((1 - 0.1) / 0.1)))  # prior: 10% of cells
        self.box = nn.Linear(hidden_dim, 4)  # (dx, dy) offset in the cell, (w, h) as fractions of the input
        # Box score logit = scale * centre logit + bias (identity until fitted; the scale stays > 0,
        # so the peaks are the centre map's).
        self.register_buffer("score_calibration", torch.tensor([1.0, 0.0]))

    def forward(self, features: Tensor, text: Tensor) -> dict[str, Tensor]:
        """(B, h, w, C), (B, d_l) -> "centre_logits" (B, 2h, 2w), "score_logits" (B, 2h, 2w)
        (calibrated box scores) and "box_params" (B, 2h, 2w, 4)."""
        y = F.gelu(self.norm(conv_transpose_2x2(features, self.up)))  # (B, 2h, 2w, hidden)
        query = self.text_proj(text) / math.sqrt(y.shape[-1])  # (B, hidden)
        centre = torch.einsum("bhwc,bc->bhw", y, query) + self.centre_bias  # (B, 2h, 2w)
        return {"centre_logits": centre, "box_params": self.box(y), "score_logits": self.score_logits(centre)}

    def score_logits(self, centre: Tensor) -> Tensor:
        """Centre logits (B, 2h, 2w) -> calibrated box-score logits (B, 2h, 2w)."""
        return self.score_calibration[0] * centre + self.score_calibration[1]


class ExistenceHead(nn.Module):
    """Does the expression name anything? A logit from the features pooled with
    language-adaptive attention, and the expression.

    Args:
        visual_dim: C.
        text_dim: d_l.
        attn_dim: width of the pooling attention.
        hidden_dim: width of the MLP.
    """

    def __init__(self, visual_dim: int, text_dim: int, attn_dim: int = 64, hidden_dim: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(visual_dim, eps=1e-6)
        self.visual_proj = nn.Linear(visual_dim, attn_dim)
        self.text_proj = nn.Linear(text_dim, attn_dim)
        self.mlp = nn.Sequential(nn.Linear(visual_dim + text_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, 1))

    def forward(self, features: Tensor, text: Tensor) -> dict[str, Tensor]:
        """(B, h, w, C), (B, d_l) -> "exist_logits" (B,)."""
        B, H, W, C = features.shape
        tokens = self.norm(features.reshape(B, H * W, C))  # (B, HW, C)
        logits = torch.einsum("bnk,bk->bn", self.visual_proj(tokens), self.text_proj(text))  # (B, HW)
        pooled = torch.einsum("bn,bnc->bc", (logits / math.sqrt(self.visual_proj.out_features)).softmax(-1), tokens)
        return {"exist_logits": self.mlp(torch.cat([pooled, text], dim=-1)).squeeze(-1)}


class GeneralisedMixin:
    """Adds `CentreBoxHead` and `ExistenceHead` to a VG-LAW model built without its own box head
    (its config's `box_task` is False): task "both" means boxes from the centre head and the
    base model's union mask.

    Args:
        config: a `GeneralisedConfig` or `GeneralisedScratchConfig` (or its fields).
    """

    generalised = True

    def __init__(self, config: GeneralisedConfig | None = None, **fields: Any) -> None:
        super().__init__(config, **fields)
        C, d_l = self.config.embed_dim, self.text.dim
        self.centre_head = CentreBoxHead(C, d_l, self.config.centre_dim)
        self.exist_head = ExistenceHead(C, d_l)

    def forward_heads(self, features: Tensor, sentence: Tensor, out_size: tuple[int, int],
                      **maps: Tensor) -> dict[str, Tensor]:
        """The union mask, plus the centre head's and the existence head's outputs."""
        out = super().forward_heads(features, sentence, out_size, **maps)
        out.update(self.centre_head(features, sentence))
        out.update(self.exist_head(features, sentence))
        return out


class GeneralisedVGLAW(GeneralisedMixin, VGLAW):
    """The paper's VG-LAW with generalised heads (`GeneralisedMixin`), for gRefCOCO."""

    config_class = GeneralisedConfig


class GeneralisedScratchVGLAW(GeneralisedMixin, ScratchVGLAW):
    """The from-scratch VG-LAW with generalised heads (`GeneralisedMixin`), for the gshapes demo."""

    config_class = GeneralisedScratchConfig


def decode_boxes(box_params: Tensor) -> Tensor:
    """Box parameters (B, H2, W2, 4) -> normalised (cx, cy, w, h) boxes (B, H2, W2, 4) of the input:
    the centre is the cell plus a sigmoid offset, the size a sigmoid fraction of the input."""
    B, H2, W2, _ = box_params.shape
    ys = torch.arange(H2, device=box_params.device, dtype=box_params.dtype)[:, None]
    xs = torch.arange(W2, device=box_params.device, dtype=box_params.dtype)[None, :]
    p = box_params.sigmoid()
    cx = (xs + p[..., 0]) / W2
    cy = (ys + p[..., 1]) / H2
    return torch.stack([cx, cy, p[..., 2], p[..., 3]], dim=-1)


def decode_sets(outputs: dict[str, Tensor], top_k: int = 20, min_score: float = 0.05) -> list[dict[str, Tensor]]:
    """Per sample: "boxes" (K, 4) normalised cxcywh, "scores" (K,) (calibrated) and
    "centre_logits" (K,) (raw) of the centre map's local maxima (3x3) whose score is at least
    `min_score`, best first, and "exists", the existence probability."""
    logits = outputs["centre_logits"].float()  # (B, H2, W2)
    peaks = logits == F.max_pool2d(logits[:, None], 3, stride=1, padding=1)[:, 0]
    scores = outputs["score_logits"].float().sigmoid()  # a monotone map of the centre logits: same peaks
    boxes = decode_boxes(outputs["box_params"].float())  # (B, H2, W2, 4)
    exists = outputs["exist_logits"].float().sigmoid()
    out = []
    for b in range(logits.shape[0]):
        score = torch.where(peaks[b] & (scores[b] >= min_score), scores[b], torch.zeros_like(scores[b])).flatten()
        k = min(top_k, int((score > 0).sum()))
        top = score.topk(k)
        out.append({"boxes": boxes[b].reshape(-1, 4)[top.indices], "scores": top.values,
                    "centre_logits": logits[b].flatten()[top.indices], "exists": exists[b]})
    return out
