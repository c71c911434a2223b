"""Named model variants and `create_model`."""
from __future__ import annotations

from typing import Any

from vglaw.models.vglaw import VGLAW

VARIANTS: dict[str, dict[str, Any]] = {
    # The paper configuration: ViTDet ViT-B/16 at 448, 6-layer BERT.
    "vglaw_vitb": dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, window_size=14,
                       window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10), text_layers=6),
    # Small enough to train on a CPU in minutes (the shapes demo). It keeps all six MiniLM layers:
    # after two, MiniLM's [CLS] feature is the same for every expression (cosine 1.00), which
    # leaves both heads without language; after six it separates them (cosine 0.65-0.97).
    "vglaw_small": dict(img_size=128, patch_size=16, embed_dim=128, depth=4, num_heads=4, window_size=4,
                        window_block_indexes=(0, 2), drop_path_rate=0.0, text_layers=None, mask_dim=64),
    # For unit tests: seconds on a CPU.
    "vglaw_tiny": dict(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=2, window_size=2,
                       window_block_indexes=(0, 2), drop_path_rate=0.0, text_layers=1, rank=8, lap_dim=16),
}


def list_models() -> list[str]:
    return sorted(VARIANTS)


def create_model(name: str = "vglaw_vitb", visual_weights: str | None = None, **overrides: Any) -> VGLAW:
    """Build a named variant, optionally initialising the visual backbone from a checkpoint.

    Args:
        name: one of `list_models()`.
        visual_weights: detectron2 ViTDet `.pkl`, MAE `.pth` or timm SAM-ViT `.pth`/`.safetensors`.
        **overrides: any `VGLAW` constructor argument (e.g. `text_encoder=...`, `task="box"`).
    """
    if name not in VARIANTS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = VGLAW(**{**VARIANTS[name], **overrides})
    if visual_weights is not None:
        from vglaw.models.checkpoint import load_visual_weights

        load_visual_weights(model.backbone, visual_weights)
    return model
