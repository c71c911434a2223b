"""What a VG-LAW model is, as typed configurations: each model class builds itself from one
(`model.config`) and a model folder's `config.json` stores its fields (`vglaw.models.hub`).

`VGLAWConfig` holds the paper's architecture at the paper's defaults; the from-scratch and
generalised models extend it with their own fields. A config checks itself when it is made, so
a bad value is one error naming the field, before anything is built.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from vglaw.errors import UsageError
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER

TASKS = ("both", "box", "mask")
SENTENCE_FEATURES = ("cls", "mean")

C = TypeVar("C", bound="VGLAWConfig")


@dataclass(frozen=True)
class VGLAWConfig:
    """The paper's model (defaults: ViTDet ViT-B/16 at 448 px, a 6-layer BERT).

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
        text_pretrained: the text encoder starts from its pretrained weights (False: random,
            as when the weights come from a trained model's file anyway).
        groups: G, groups of the language aggregation.
        reduction: r, d_l -> d_l / r before weight generation.
        rank: d_w of the matrix factorisation.
        lap_dim: k, the attention width of the box head's language-adaptive pooling.
        mask_dim: channels between the mask head's two transposed convolutions (paper: 256).
        task: "both" (REC and RES), "box" (REC only) or "mask" (RES only).
        variant: the named variant this configuration is (`vglaw.models.loading.VARIANTS`),
            None for one made by hand.
    """

    img_size: int = 448
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    window_block_indexes: tuple[int, ...] = (0, 1, 3, 4, 6, 7, 9, 10)
    drop_path_rate: float = 0.1
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_layers: int | None = 6
    text_pretrained: bool = True
    groups: int = 12
    reduction: int = 16
    rank: int = 32
    lap_dim: int = 64
    mask_dim: int = 256
    task: str = "both"
    variant: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_block_indexes", tuple(self.window_block_indexes))
        if self.task not in TASKS:
            raise UsageError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.img_size % self.patch_size:
            raise UsageError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def box_task(self) -> bool:
        """The model predicts boxes."""
        return self.task in ("both", "box")

    @property
    def mask_task(self) -> bool:
        """The model predicts masks."""
        return self.task in ("both", "mask")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """A config from a mapping of its fields; a key it has no field for is an error naming it.

        Raises:
            UsageError: an unknown field, or a value the config refuses.
        """
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise UsageError(f"{cls.__name__} has no field {', '.join(unknown)}")
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes`; unknown fields are an error (`from_dict`)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ScratchConfig(VGLAWConfig):
    """`VGLAWConfig` plus what a backbone trained from scratch needs (`vglaw.models.scratch`).

    Args:
        stem_depth: stride-1 convolutions of the `ConvStem` at stride 4.
        mask_skip: add the stem's stride-4 map inside the mask head.
        seg_classes: categories (background included) of the mask head's auxiliary per-pixel
            classifier (outputs "seg_logits"); 0 for none. Linked to the data by the CLI.
        sentence: the feature the heads read: "mean" of the real tokens (what sentence models
            such as MiniLM are trained to separate) or "cls".
        freeze_text: keep the text encoder fixed (`FrozenTextEncoder`).
        text_cache_size: with `freeze_text`, remember this many expressions' features.
    """

    stem_depth: int = 3
    mask_skip: bool = True
    seg_classes: int = 0
    sentence: str = "mean"
    freeze_text: bool = True
    text_cache_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sentence not in SENTENCE_FEATURES:
            raise UsageError(f"sentence must be one of {SENTENCE_FEATURES}, got {self.sentence!r}")
        if self.stem_depth < 0:
            raise UsageError(f"stem_depth must be >= 0, got {self.stem_depth}")
        if self.mask_skip and not self.mask_task:
            raise UsageError("mask_skip needs a mask task")
        if self.seg_classes < 0 or self.seg_classes == 1 or (self.seg_classes and not self.mask_task):
            raise UsageError(f"seg_classes must be 0 or >= 2 (background + categories) and needs a mask task, "
                             f"got {self.seg_classes} with task {self.task!r}")
        if self.text_cache_size < 0:
            raise UsageError(f"text_cache_size must be >= 0, got {self.text_cache_size}")
        if self.text_cache_size and not self.freeze_text:
            raise UsageError("text_cache_size needs freeze_text=True: a trained encoder's features change every step")


@dataclass(frozen=True)
class GeneralisedConfig(VGLAWConfig):
    """A model that grounds 0..N objects (`vglaw.models.generalised`): the union mask from the
    base model's mask head, boxes from a centre head, an existence head. Task "both" only.

    Args:
        centre_dim: channels of the centre head's stride-p/2 map.
    """

    centre_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task != "both":
            raise UsageError(f"generalised models predict boxes and masks together (task 'both'), got {self.task!r}")

    @property
    def box_task(self) -> bool:
        """False: the boxes come from the centre head, not the paper's box head."""
        return False


@dataclass(frozen=True)
class GeneralisedScratchConfig(GeneralisedConfig, ScratchConfig):
    """The from-scratch model with generalised heads (the gshapes demo)."""


@dataclass(frozen=True)
class DescribeFields:
    """The fields a describing head adds (`vglaw.models.describe`); mixed into a model's config.

    Args:
        describe_dim: width of the expression decoder.
        describe_layers: decoder blocks.
        describe_heads: decoder attention heads.
        location_tokens: pseudo-tokens a query box becomes in the text features' space.
        max_words: longest generated expression, in WordPiece tokens (`[SEP]` included).
        describe_adaptive: the query box drives the backbone through the weight generator, as
            an expression does (location-adaptive weights); False reads the static backbone
            (the ablation).
    """

    describe_dim: int = 256
    describe_layers: int = 2
    describe_heads: int = 4
    location_tokens: int = 4
    max_words: int = 24
    describe_adaptive: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.describe_dim % self.describe_heads:
            raise UsageError(f"describe_dim {self.describe_dim} is not divisible by describe_heads "
                             f"{self.describe_heads}")
        if self.max_words < 2 or self.location_tokens < 1 or self.describe_layers < 1:
            raise UsageError("max_words must be >= 2, location_tokens and describe_layers >= 1")


@dataclass(frozen=True)
class DescribingConfig(DescribeFields, VGLAWConfig):
    """The paper's model with a describing head."""


@dataclass(frozen=True)
class DescribingScratchConfig(DescribeFields, ScratchConfig):
    """The from-scratch model with a describing head (the shapes describe demo)."""


@dataclass(frozen=True)
class ModelArgs:
    """The config fields a training run may set beyond what `VGLAWModule` sets itself (variant,
    img_size, text_encoder, task, seg_classes): `model.model_args` in a run's YAML, checked by
    LightningCLI field by field. None leaves the variant's value; a field the variant's config
    does not have is an error when the model is built.
    """

    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    window_size: int | None = None
    window_block_indexes: list[int] | None = None
    drop_path_rate: float | None = None
    text_layers: int | None = None
    groups: int | None = None
    reduction: int | None = None
    rank: int | None = None
    lap_dim: int | None = None
    mask_dim: int | None = None
    # from-scratch models (`ScratchConfig`)
    stem_depth: int | None = None
    mask_skip: bool | None = None
    sentence: str | None = None
    freeze_text: bool | None = None
    text_cache_size: int | None = None
    # generalised models (`GeneralisedConfig`)
    centre_dim: int | None = None
    # describing heads (`DescribeFields`)
    describe_dim: int | None = None
    describe_layers: int | None = None
    describe_heads: int | None = None
    location_tokens: int | None = None
    max_words: int | None = None
    describe_adaptive: bool | None = None

    def given(self) -> dict[str, Any]:
        """The fields set (not None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
