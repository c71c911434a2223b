"""The VG-LAW model: the expression generates the visual backbone's qkv weights; two heads
read the expression-specific feature map.

Layout: images (B, 3, H, W); text (B, L); backbone features (B, H/16, W/16, C).
The model returns a dict of tensors and computes no loss.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from vglaw.models.heads import LAPBoxHead, MaskHead
from vglaw.models.language import LanguageAggregator, WeightGenerator
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder
from vglaw.models.vitdet import ViTDet

TASKS = ("both", "box", "mask")


class VGLAW(nn.Module):
    """Single-stage multi-task visual grounding with language-adaptive weights.

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
        freeze_text: keep the text encoder fixed (no gradients, no dropout); the paper trains it.
        text_cache_size: with `freeze_text`, remember the features of this many distinct
            expressions instead of re-encoding them every epoch (0: no cache).
        groups: G, groups of the language aggregation.
        reduction: r, d_l -> d_l / r before weight generation.
        rank: d_w of the matrix factorisation.
        lap_dim: k, the attention width of the box head's language-adaptive pooling.
        mask_dim: channels between the mask head's two transposed convolutions (paper: 256).
        task: "both" (REC and RES), "box" (REC only) or "mask" (RES only).
        text_pool: the sentence feature the heads read: "cls" (paper) or "mean" (see `TextEncoder`).
        grad_checkpointing: recompute backbone blocks during backward.
        stem: "patch" (ViTDet) or "conv" (`ConvStem`, for backbones trained from scratch).
        stem_depth: stride-1 convolutions at stride 4 in the conv stem (see `ConvStem`).
        mask_skip: feed the conv stem's stride-4 map to the mask head (needs stem="conv").
        seg_classes: categories (background included) of the mask head's auxiliary per-pixel
            classifier, for backbones trained from scratch (see `MaskHead`); 0 for none.
    """

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
        freeze_text: bool = False,
        text_cache_size: int = 0,
        groups: int = 12,
        reduction: int = 16,
        rank: int = 32,
        lap_dim: int = 64,
        mask_dim: int = 256,
        task: str = "both",
        text_pool: str = "cls",
        grad_checkpointing: bool = False,
        stem: str = "patch",
        stem_depth: int = 0,
        mask_skip: bool = False,
        seg_classes: int = 0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if mask_skip and (stem != "conv" or task == "box"):
            raise ValueError("mask_skip needs stem='conv' and a mask task")
        if seg_classes < 0 or seg_classes == 1 or (seg_classes and task == "box"):
            raise ValueError(f"seg_classes must be 0 or >= 2 (background + categories) and needs a mask task, "
                             f"got {seg_classes} with task {task!r}")
        self.mask_skip = mask_skip
        self.img_size = img_size
        self.task = task
        self.text = TextEncoder(text_encoder, text_layers, text_pretrained, freeze_text, text_cache_size, text_pool)
        self.backbone = ViTDet(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            drop_path_rate=drop_path_rate,
            window_size=window_size,
            window_block_indexes=window_block_indexes,
            grad_checkpointing=grad_checkpointing,
            stem=stem,
            stem_depth=stem_depth,
        )
        self.aggregator = LanguageAggregator(self.text.dim, depth, groups, reduction)
        self.weight_generator = WeightGenerator(self.aggregator.out_dim, embed_dim, depth, rank)
        self.box_head = LAPBoxHead(embed_dim, self.text.dim, lap_dim) if task in ("both", "box") else None
        skip_dim = self.backbone.patch_embed.out_dim if mask_skip else 0
        self.mask_head = (MaskHead(embed_dim, self.text.dim, mask_dim, skip_dim, seg_classes)
                          if task in ("both", "mask") else None)

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
            "mask_logits": (B, 1, H, W) at input resolution (mask tasks);
            "seg_logits": (B, seg_classes, H, W) category logits (with `seg_classes`).
        """
        tokens, sentence = self.text(input_ids, attention_mask)  # (B, L, d_l), (B, d_l)
        h1, alpha = self.aggregator(tokens, attention_mask, return_attention=True)  # (B, depth, d_l/r)
        features, stem = self.backbone(images, self.weight_generator(h1), return_stem=True)  # (B, h, w, C)
        out: dict[str, Tensor] = {}
        if self.box_head is not None:
            out["boxes"], lap = self.box_head(features, sentence)
            if return_attention:
                out["lap_attention"] = lap
        if self.mask_head is not None:
            out["mask_logits"], seg = self.mask_head(features, sentence, images.shape[-2:],
                                                      stem if self.mask_skip else None)
            if seg is not None:
                out["seg_logits"] = seg
        if return_attention:
            out["lang_attention"] = alpha
        return out
