"""The VG-LAW model: the expression generates the visual backbone's qkv weights; two heads
read the expression-specific feature map.

Layout: images (B, 3, H, W); text (B, L); backbone features (B, H/16, W/16, C).
The model returns a dict of tensors and computes no loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.models.heads import LAPBoxHead, MaskHead
from vglaw.models.hub import ModelFolderMixin
from vglaw.models.language import LanguageAggregator, WeightGenerator
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder
from vglaw.models.vitdet import LowRank, ViTDet

TASKS = ("both", "box", "mask")


class LanguageWeights(NamedTuple):
    """What the expression contributes: the backbone's qkv updates and the heads' text feature."""

    qkv: list[LowRank]  # one (down (B, C, d_w), up (d_w, 3C)) pair per visual block
    sentence: Tensor  # (B, d_l), the feature the heads read (paper: `[CLS]`)
    alpha: Tensor  # (B, depth, G, L), the aggregation weights, zero on padding
    tokens: Tensor  # (B, L, d_l), F_l


class VGLAW(nn.Module, ModelFolderMixin):
    """Single-stage multi-task visual grounding with language-adaptive weights (Su et al., 2023).

    Args:
        img_size: square input side the position tables are sized for.
        patch_size: ViT patch side (output stride).
        embed_dim: visual width C.
        depth: visual blocks.
        num_heads: attention heads.
        window_size: window side of the window-attention blocks.
        window_block_indexes: blocks using window attention; the others are global.
        drop_path_rate: stochastic depth of the backbone.
        text_encoder: Hugging Face BERT name or local folder, or "minilm" (packaged, offline).
        text_layers: keep the first n text layers (paper: 6); None keeps all.
        text_pretrained: load the text encoder's pretrained weights.
        groups: G, groups of the language aggregation.
        reduction: r, d_l -> d_l / r before weight generation.
        rank: d_w of the matrix factorisation.
        lap_dim: k, the attention width of the box head's language-adaptive pooling.
        mask_dim: channels between the mask head's two transposed convolutions (paper: 256).
        task: "both" (REC and RES), "box" (REC only) or "mask" (RES only).

    `save_pretrained(dir)` / `VGLAW.from_pretrained(dir_or_hub_id)` write and read model
    folders (`vglaw.models.hub`).
    """

    generalised = False  # grounds exactly one object; `GeneralisedMixin` models ground 0..N

    def __init__(
        self,
        img_size: int = 448,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        window_size: int = 14,
        window_block_indexes: Sequence[int] = (0, 1, 3, 4, 6, 7, 9, 10),
        drop_path_rate: float = 0.1,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        text_layers: int | None = 6,
        text_pretrained: bool = True,
        groups: int = 12,
        reduction: int = 16,
        rank: int = 32,
        lap_dim: int = 64,
        mask_dim: int = 256,
        task: str = "both",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise UsageError(f"task must be one of {TASKS}, got {task!r}")
        self.img_size = img_size
        self.task = task
        self.text = TextEncoder(text_encoder, text_layers, text_pretrained)
        self.backbone = ViTDet(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
            window_size=window_size,
            window_block_indexes=window_block_indexes,
        )
        self.aggregator = LanguageAggregator(self.text.dim, depth, groups, reduction)
        self.weight_generator = WeightGenerator(self.aggregator.out_dim, embed_dim, depth, rank)
        self.box_head = LAPBoxHead(embed_dim, self.text.dim, lap_dim) if task in ("both", "box") else None
        self.mask_head = MaskHead(embed_dim, self.text.dim, mask_dim) if task in ("both", "mask") else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone blocks during backward to save activation memory."""
        self.backbone.set_grad_checkpointing(enable)

    # ---- the four stages, each usable on its own -------------------------------------------

    def language_weights(self, input_ids: Tensor, attention_mask: Tensor) -> LanguageWeights:
        """Text -> F_l -> per-block aggregation h1_i -> qkv updates P·Φ_i(h1_i)·Qᵀ."""
        tokens = self.text(input_ids, attention_mask)  # (B, L, d_l)
        h1, alpha = self.aggregator(tokens, attention_mask, return_attention=True)  # (B, depth, d_l/r)
        return LanguageWeights(self.weight_generator(h1), self.sentence_feature(tokens, attention_mask), alpha,
                               tokens)

    def sentence_feature(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """The text feature the heads read: `[CLS]`, F_l¹ (B, d_l)."""
        return tokens[:, 0]

    def forward_features(self, images: Tensor, qkv: Sequence[LowRank] | None) -> Tensor:
        """The language-adaptive backbone (static with qkv=None): (B, 3, H, W) -> (B, h, w, C)."""
        return self.backbone(images, qkv)

    def forward_heads(self, features: Tensor, sentence: Tensor, out_size: tuple[int, int]) -> dict[str, Tensor]:
        """Box and/or mask from the backbone features and the heads' text feature."""
        out: dict[str, Tensor] = {}
        if self.box_head is not None:
            out["boxes"], out["lap_attention"] = self.box_head(features, sentence)
        if self.mask_head is not None:
            out["mask_logits"] = self.mask_head(features, sentence, out_size)
        return out

    def ground(self, images: Tensor, qkv: Sequence[LowRank] | None, sentence: Tensor) -> dict[str, Tensor]:
        """Backbone and heads for given language inputs (the ablations swap or drop them)."""
        return self.forward_heads(self.forward_features(images, qkv), sentence, images.shape[-2:])

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, return_attention: bool = False
    ) -> dict[str, Tensor]:
        """Ground each expression in its image.

        Args:
            images: (B, 3, H, W) normalised, letterboxed images.
            input_ids: (B, L) token ids, `[CLS]` first.
            attention_mask: (B, L), 0 on padding.
            return_attention: add the language aggregation weights ("lang_attention",
                (B, depth, G, L)) and the box head's pooling map ("lap_attention", (B, h, w)).

        Returns:
            "boxes": (B, 4) normalised (cx, cy, w, h) in [0, 1] of the padded input (box tasks);
            "mask_logits": (B, 1, H, W) at input resolution (mask tasks).
        """
        lang = self.language_weights(input_ids, attention_mask)
        out = self.ground(images, lang.qkv, lang.sentence)
        if return_attention:
            out["lang_attention"] = lang.alpha
        else:
            out.pop("lap_attention", None)
        return out
