"""The VG-LAW model: the expression generates the visual backbone's qkv weights; two heads
read the expression-specific feature map.

Layout: images (B, 3, H, W); text (B, L); backbone features (B, H/16, W/16, C).
The model returns a dict of tensors and computes no loss.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.models.config import VGLAWConfig
from vglaw.models.heads import LAPBoxHead, MaskHead
from vglaw.models.hub import ModelFolderMixin
from vglaw.models.language import LanguageAggregator, WeightGenerator
from vglaw.models.text_encoder import TextEncoder
from vglaw.models.vitdet import LowRank, PatchEmbed, ViTDet


class LanguageWeights(NamedTuple):
    """What the expression contributes: the backbone's qkv updates and the heads' text feature."""

    qkv: list[LowRank]  # one (down (B, C, d_w), up (d_w, 3C)) pair per visual block
    sentence: Tensor  # (B, d_l), the feature the heads read (paper: `[CLS]`)
    alpha: Tensor  # (B, depth, G, L), the aggregation weights, zero on padding
    tokens: Tensor  # (B, L, d_l), F_l


class VGLAW(nn.Module, ModelFolderMixin):
    """Single-stage multi-task visual grounding with language-adaptive weights (Su et al., 2023).

    Args:
        config: the architecture (`VGLAWConfig`, the paper's at its defaults); or give its
            fields as keyword arguments instead (`VGLAW(img_size=64, ...)`).
        text_layer, embed_layer, box_head_layer, mask_head_layer: the parts, as timm's
            `embed_layer=`: callables with the signatures of the paper's `TextEncoder`,
            `PatchEmbed`, `LAPBoxHead` and `MaskHead` (the defaults), so an extension passes
            its own parts in (`vglaw.models.scratch`) instead of replacing built ones.

    The model owns its configuration (`model.config`); `save_pretrained(dir)` /
    `VGLAW.from_pretrained(dir_or_hub_id)` write and read model folders (`vglaw.models.hub`).
    """

    config_class: type[VGLAWConfig] = VGLAWConfig
    generalised = False  # grounds exactly one object; `GeneralisedMixin` models ground 0..N
    describes = False  # `DescribeMixin` models also describe a region (`vglaw.models.describe`)

    def __init__(
        self,
        config: VGLAWConfig | None = None,
        *,
        text_layer: Callable[..., nn.Module] = TextEncoder,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        box_head_layer: Callable[..., nn.Module] = LAPBoxHead,
        mask_head_layer: Callable[..., nn.Module] = MaskHead,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.config = config = self.make_config(config, fields)
        self.text = text_layer(config.text_encoder, config.text_layers, config.text_pretrained)
        self.backbone = ViTDet(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            drop_path_rate=config.drop_path_rate,
            window_size=config.window_size,
            window_block_indexes=config.window_block_indexes,
            embed_layer=embed_layer,
        )
        C, d_l = config.embed_dim, self.text.dim
        self.aggregator = LanguageAggregator(d_l, config.depth, config.groups, config.reduction)
        self.weight_generator = WeightGenerator(self.aggregator.out_dim, C, config.depth, config.rank)
        self.box_head = box_head_layer(C, d_l, config.lap_dim) if config.box_task else None
        self.mask_head = mask_head_layer(C, d_l, config.mask_dim) if config.mask_task else None

    @classmethod
    def make_config(cls, config: VGLAWConfig | Mapping[str, Any] | None, fields: Mapping[str, Any]) -> VGLAWConfig:
        """The class's config from a config, a mapping of its fields, or keyword fields.

        Raises:
            UsageError: a config of another class, both a config and fields, or an unknown field.
        """
        if config is None:
            return cls.config_class.from_dict(fields)
        if fields:
            raise UsageError(f"{cls.__name__}: give a config or its fields, not both")
        if isinstance(config, Mapping):
            return cls.config_class.from_dict(config)
        if type(config) is not cls.config_class:
            raise UsageError(f"{cls.__name__} is built from a {cls.config_class.__name__}, got a "
                             f"{type(config).__name__}")
        return config

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def task(self) -> str:
        return self.config.task

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

    def forward_heads(self, features: Tensor, sentence: Tensor, out_size: tuple[int, int],
                      **maps: Tensor) -> dict[str, Tensor]:
        """Every head's named outputs from the backbone features and the heads' text feature.

        `maps`: finer maps of the image for a mask head that reads one (the paper's reads none;
        a from-scratch model's reads its stem's stride-4 map as `skip`).
        """
        out: dict[str, Tensor] = {}
        if self.box_head is not None:
            out.update(self.box_head(features, sentence))
        if self.mask_head is not None:
            out.update(self.mask_head(features, sentence, out_size, **maps))
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
