"""From a name or a file to a model, one layer above the model classes (as transformers' Auto
classes sit above `PreTrainedModel`): the named variants and `create_model`, the class a model
folder's "model_class" names, and a Lightning training checkpoint rebuilt as its model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vglaw.errors import MissingFileError, UsageError
from vglaw.io.atomic import atomic_dir
from vglaw.io.recent import remember_model
from vglaw.io.safe_pickle import load_torch_file
from vglaw.models.checkpoint import load_visual_weights
from vglaw.models.config import ModelArgs, VGLAWConfig
from vglaw.models.describe import DescribingScratchVGLAW, DescribingVGLAW
from vglaw.models.generalised import GeneralisedScratchVGLAW, GeneralisedVGLAW
from vglaw.models.scratch import ScratchVGLAW
from vglaw.models.vglaw import VGLAW

_VITB = dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, window_size=14,
             window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10), text_layers=6)
# Small enough to train on a CPU in minutes. It keeps all six MiniLM layers: after two, MiniLM's
# [CLS] feature is the same for every expression (cosine 1.00), which leaves both heads without
# language; after six it separates them (cosine 0.65-0.97).
_SMALL = dict(img_size=128, patch_size=16, embed_dim=128, depth=4, num_heads=4, window_size=4,
              window_block_indexes=(0, 2), drop_path_rate=0.0, text_layers=None, mask_dim=64)
_TINY = dict(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=2, window_size=2,
             window_block_indexes=(0, 2), drop_path_rate=0.0, text_layers=1, rank=8, lap_dim=16)
_SCRATCH = dict(stem_depth=3, mask_skip=True, sentence="mean", freeze_text=True)

# name -> (class, constructor arguments)
VARIANTS: dict[str, tuple[type[VGLAW], dict[str, Any]]] = {
    "vglaw_vitb": (VGLAW, _VITB),  # the paper: ViTDet ViT-B/16 at 448, 6-layer BERT
    "vglaw_small": (VGLAW, _SMALL),  # the paper's architecture, CPU-sized
    "vglaw_tiny": (VGLAW, _TINY),  # for unit tests: seconds on a CPU
    # Trained from scratch (the shapes demo): see `vglaw.models.scratch`.
    "vglaw_small_scratch": (ScratchVGLAW, {**_SMALL, **_SCRATCH}),
    "vglaw_tiny_scratch": (ScratchVGLAW, {**_TINY, **_SCRATCH, "stem_depth": 1}),
    # Generalised grounding, 0..N referred objects: see `vglaw.models.generalised`.
    "vglaw_vitb_gref": (GeneralisedVGLAW, _VITB),
    "vglaw_small_scratch_gref": (GeneralisedScratchVGLAW, {**_SMALL, **_SCRATCH}),
    "vglaw_tiny_scratch_gref": (GeneralisedScratchVGLAW, {**_TINY, **_SCRATCH, "stem_depth": 1, "centre_dim": 32}),
    # Grounding models with a describing head (referring-expression generation): `vglaw.models.describe`.
    "vglaw_vitb_describe": (DescribingVGLAW, _VITB),
    "vglaw_small_scratch_describe": (DescribingScratchVGLAW, {**_SMALL, **_SCRATCH}),
    "vglaw_tiny_scratch_describe": (DescribingScratchVGLAW, {**_TINY, **_SCRATCH, "stem_depth": 1, "describe_dim": 32,
                                                             "describe_heads": 2, "describe_layers": 1}),
}


# config.json's "model_class" -> class
MODEL_CLASSES: dict[str, type[VGLAW]] = {
    c.__name__: c for c in (VGLAW, ScratchVGLAW, GeneralisedVGLAW, GeneralisedScratchVGLAW, DescribingVGLAW,
                            DescribingScratchVGLAW)}


def is_generalised(name: str) -> bool:
    """A variant that grounds 0..N objects (gRefCOCO)."""
    return name in VARIANTS and VARIANTS[name][0].generalised


def is_describing(name: str) -> bool:
    """A variant with a describing head (`vglaw.models.describe`)."""
    return name in VARIANTS and VARIANTS[name][0].describes


def monitor_metric(variant: str | None, task: str) -> str:
    """The validation metric that picks a run's checkpoints: the next-token accuracy of a
    describing model, gIoU for a generalised one, Prec@0.5 with a box head, else mIoU."""
    if variant and is_describing(variant):
        return "word_acc"
    return "giou" if variant and is_generalised(variant) else "miou" if task == "mask" else "prec@0.5"


def list_models() -> list[str]:
    return sorted(VARIANTS)


def variant_config(name: str, **overrides: Any) -> VGLAWConfig:
    """The config of a named variant with `overrides` applied.

    Raises:
        UsageError: an unknown name, or a field the variant's config does not have, named.
    """
    if name not in VARIANTS:
        raise UsageError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls, args = VARIANTS[name]
    unknown = sorted(set(overrides) - cls.config_class.field_names())
    if unknown:
        raise UsageError(f"model {name!r} ({cls.__name__}) takes no argument {', '.join(unknown)}")
    return cls.config_class.from_dict({**args, **overrides, "variant": name})


def create_model(name: str = "vglaw_vitb", visual_weights: str | None = None, **overrides: Any) -> VGLAW:
    """Build a named variant, optionally initialising the visual backbone from a checkpoint.

    Args:
        name: one of `list_models()`.
        visual_weights: detectron2 ViTDet `.pkl`, MAE `.pth` or timm SAM-ViT `.pth`/`.safetensors`.
        **overrides: fields of the variant's config (e.g. `text_encoder=...`, `task="box"`).
    """
    config = variant_config(name, **overrides)
    model = VARIANTS[name][0](config)
    if visual_weights is not None:
        load_visual_weights(model.backbone, visual_weights)
    return model


TRAINING_MODEL_ARGS = ("variant", "img_size", "text_encoder", "task")  # hyper-parameters every run records


def config_from_hparams(hp: dict[str, Any]) -> VGLAWConfig:
    """The model config of a training run (`VGLAWModule`'s hyper-parameters: variant, img_size,
    text_encoder, task, model_args, seg_classes): the one mapping shared by training and by
    loading its checkpoints."""
    extra = {"seg_classes": hp["seg_classes"]} if hp.get("seg_classes") else {}
    return variant_config(hp["variant"], img_size=hp["img_size"], text_encoder=hp["text_encoder"], task=hp["task"],
                          **model_args_dict(hp.get("model_args")), **extra)


def model_args_dict(model_args: ModelArgs | dict[str, Any] | None) -> dict[str, Any]:
    """A run's `model_args` as the config fields it sets: those not None of a `ModelArgs`, or
    of the mapping LightningCLI and older checkpoints give in its place."""
    if model_args is None:
        return {}
    values = model_args.given() if isinstance(model_args, ModelArgs) else dict(model_args)
    return {k: v for k, v in values.items() if v is not None}


class CheckpointError(UsageError):
    """The checkpoint is of another configuration, or not a vglaw training checkpoint."""


def model_from_checkpoint(path: str | Path):
    """Rebuild the model of a Lightning training checkpoint and load its weights strictly,
    without unpickling anything but tensors and plain data."""
    state = load_torch_file(path, "checkpoint")
    hp = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not isinstance(hp, dict) or "variant" not in hp or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a vglaw training checkpoint (no hyper_parameters.variant / state_dict)")
    missing = [k for k in TRAINING_MODEL_ARGS if k not in hp]
    if missing:
        raise CheckpointError(f"{path}: hyper_parameters lack {', '.join(missing)} (not written by `vglaw fit`)")
    try:
        config = config_from_hparams(hp)
    except (UsageError, TypeError) as err:
        raise CheckpointError(f"{path} was saved by another configuration of vglaw: {err}") from err
    weights = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    cls = VARIANTS[hp["variant"]][0]
    try:
        # The checkpoint holds the text weights: build without fetching the pretrained ones.
        return cls.with_weights(config, weights, path, built_as={"text_pretrained": False}, error=CheckpointError,
                                context=f"{path} does not match its own configuration ({hp['variant']})")
    except OSError as err:  # transformers cannot find the text encoder's config
        raise MissingFileError(f"{path} needs the text encoder {hp['text_encoder']!r}, which is not available "
                               f"here ({str(err).splitlines()[0][:120]}); make a model folder with `vglaw export` "
                               "where it is, or put it in the Hugging Face cache") from err


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write the model of a training checkpoint as a model folder, atomically (a folder that
    exists afterwards is complete), and remember it as the latest model."""
    model = model_from_checkpoint(ckpt)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    remember_model(out)
    return out
