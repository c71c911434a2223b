"""Pretrained visual weights: detectron2 ViTDet `.pkl`, MAE `.pth`, timm SAM-ViT `.pth` /
`.safetensors`.

Each source format has a filter that maps its keys onto `ViTDet`'s names, drops the keys a
rule below names, and resizes position tables to the model's grid. Loading is strict: any
key left unmatched, or any shape that differs, is an error naming the key and the shapes.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from vglaw.errors import MissingFileError, UsageError
from vglaw.io.safe_pickle import load_torch_file, plain_load
from vglaw.models.geometry import fit_rel_pos, resize_abs_pos

StateDict = dict[str, Tensor]

# Keys of the backbone a checkpoint may lack, by format, with the reason.
MAY_BE_MISSING = {
    # MAE pretrains a ViT without relative positions; ViTDet fine-tunes them from zero.
    "mae": re.compile(r"blocks\.\d+\.attn\.rel_pos_[hw]"),
    "detectron2": None,
    "sam": None,
}
# Keys of a checkpoint that have no counterpart in the backbone, by format, with the reason.
DROPPED = {
    # Detection-specific parts of Mask R-CNN: simple feature pyramid, RPN and ROI heads.
    "detectron2": re.compile(r"(backbone\.(?!net\.)|proposal_generator\.|roi_heads\.|pixel_)"),
    # MAE's cls token, final norm and classifier: ViTDet uses neither a cls token nor a final norm.
    "mae": re.compile(r"(cls_token|norm\.|fc_norm\.|head\.|mask_token|decoder_)"),
    # SAM's neck (and, in original SAM checkpoints, the prompt encoder and mask decoder).
    "sam": re.compile(r"((image_encoder\.)?neck\.|prompt_encoder\.|mask_decoder\.|head\.)"),
}


def read_checkpoint(path: str | Path) -> StateDict:
    """Read a weight file into a flat {name: tensor} dict; `.pkl` files are unpickled safely."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"visual weights not found: {path}")
    if path.suffix == ".pkl":
        raw = plain_load(path, allow_numpy=True)
        raw = raw.get("model", raw) if isinstance(raw, dict) else raw
    elif path.suffix == ".safetensors":
        raw = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        raw = load_torch_file(path, "weight file")
        for wrapper in ("model", "state_dict"):
            if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
                raw = raw[wrapper]
    else:
        raise UsageError(f"{path}: unknown weight format {path.suffix!r}; expected .pkl, .pth or .safetensors")
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, Tensor):
            out[k] = v
    return out


def detect_format(state_dict: StateDict) -> str:
    """Recognise the source format by its keys."""
    if any(k.startswith("backbone.net.") for k in state_dict):
        return "detectron2"
    if "cls_token" in state_dict and "blocks.0.attn.qkv.weight" in state_dict:
        return "mae"
    pos = state_dict.get("pos_embed", state_dict.get("image_encoder.pos_embed"))
    if pos is not None and pos.dim() == 4:
        return "sam"
    raise UsageError(
        "unrecognised visual checkpoint: expected detectron2 ViTDet keys (backbone.net.*), "
        "MAE keys (cls_token, blocks.*) or SAM-ViT keys (4-D pos_embed); first keys: "
        + ", ".join(list(state_dict)[:5])
    )


def _resize_tables(state_dict: StateDict, model: nn.Module, rel_pos: str = "crop") -> StateDict:
    """Resize pos_embed (bicubic) and relative tables (`fit_rel_pos`) to the shapes `model` holds."""
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed" and k in target:
            grid = target[k].shape[1:3]
            if v.dim() == 3:  # (1, 1 + h*w, C) with a cls slot, or (1, h*w, C)
                n = v.shape[1]
                side = int(round((n - 1) ** 0.5))
                if side * side == n - 1:
                    v = v[:, 1:]
                side = int(round(v.shape[1] ** 0.5))
                v = v.reshape(1, side, side, v.shape[-1])  # (1, h, w, C)
            v = resize_abs_pos(v.float(), tuple(grid))
        elif re.fullmatch(r"blocks\.\d+\.attn\.rel_pos_[hw]", k) and k in target:
            v = fit_rel_pos(v.float(), target[k].shape[0], rel_pos)
        out[k] = v
    return out


def _filter(state_dict: StateDict, fmt: str) -> StateDict:
    """Drop the keys `DROPPED[fmt]` names (matched on the original key) and strip prefixes."""
    out = {}
    for k, v in state_dict.items():
        if DROPPED[fmt].match(k):
            continue
        if fmt == "detectron2" and k.startswith("backbone.net."):
            k = k[len("backbone.net."):]
        elif fmt == "sam" and k.startswith("image_encoder."):
            k = k[len("image_encoder."):].replace("mlp.lin", "mlp.fc")
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: StateDict, model: nn.Module, rel_pos: str = "crop") -> tuple[StateDict, str]:
    """Convert a checkpoint of any supported format to `model`'s (a `ViTDet`) names and shapes.

    Args:
        rel_pos: how longer relative-position tables reach the model's grid: "crop" (the
            paper's: centre crop, e.g. 127 -> 55 for a 1024-px ViTDet at 448) or
            "interpolate" (detectron2's). Tables that cannot be cropped are interpolated.

    Returns:
        the converted state dict and the detected format name.
    """
    fmt = detect_format(state_dict)
    return _resize_tables(_filter(state_dict, fmt), model, rel_pos), fmt


def state_dict_problems(given: StateDict, expected: dict[str, Tensor], may_be_missing: re.Pattern | None = None,
                        limit: int | None = None) -> list[str]:
    """Every key of `given` that `expected` lacks, every key of `expected` that `given` lacks
    (unless `may_be_missing` matches it in full), and every shape that differs, one line each."""
    problems = [f"unexpected key {k} {tuple(v.shape)}" for k, v in given.items() if k not in expected]
    problems += [f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                 for k, v in given.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems += [f"missing key {k}" for k in expected
                 if k not in given and (may_be_missing is None or not may_be_missing.fullmatch(k))]
    return problems[:limit] if limit else problems


def load_visual_weights(backbone: nn.Module, path: str | Path, log: Callable[[str], None] | None = print,
                        rel_pos: str = "crop") -> str:
    """Strictly load a pretrained visual checkpoint into `backbone`.

    Raises:
        ValueError: naming every unexpected key, every missing key not covered by
            `MAY_BE_MISSING`, and every shape mismatch.
    """
    state_dict, fmt = checkpoint_filter_fn(read_checkpoint(path), backbone, rel_pos)
    target = backbone.state_dict()
    problems = state_dict_problems(state_dict, target, MAY_BE_MISSING[fmt])
    if problems:
        raise UsageError(f"{path} ({fmt} format) does not fit the backbone:\n  " + "\n  ".join(problems))
    missing = [k for k in target if k not in state_dict]
    result = backbone.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys
    if log is not None:
        allowed = MAY_BE_MISSING[fmt]
        note = f", {len(missing)} keys left at initialisation ({allowed.pattern})" if missing else ""
        log(f"loaded {fmt} visual weights from {path}{note}")
    return fmt
