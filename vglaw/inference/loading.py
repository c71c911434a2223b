"""Every model source a user can name, loaded the same way: a model folder, a hub id, a training
`.ckpt` or an `.onnx` export, on a device that is checked."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vglaw.errors import MissingFileError, UsageError
from vglaw.inference.onnx import OnnxModel
from vglaw.io.recent import latest_model
from vglaw.models.hub import is_local_path
from vglaw.models.loading import model_from_checkpoint
from vglaw.models.vglaw import VGLAW


def available_devices() -> list[str]:
    """The devices this machine offers PyTorch: "cpu", then each CUDA device ("cuda:0", ...)."""
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device the user named, checked: None picks "cuda" when present, else "cpu".

    Raises:
        UsageError: a malformed name ("gpu0") or a device this machine lacks ("cuda" without a
            GPU, "cuda:3" with two), naming the devices there are.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    there = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {device}: not a device name; this machine has: {there}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda" or not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: not available here; this machine has: {there}")
    return dev


def load_model(source: Any, device: str | torch.device = "cpu"):
    """A model from a folder (`save_pretrained`), a hub id, a training `.ckpt` or a model object
    on `device`; an `.onnx` export runs on ONNX Runtime's CPU provider, whatever `device` says."""
    path = Path(str(source)).expanduser()
    if not isinstance(source, torch.nn.Module) and path.suffix == ".onnx":
        return OnnxModel(path)
    device = resolve_device(device)
    if isinstance(source, torch.nn.Module):
        return source.eval().to(device)
    if path.suffix == ".ckpt":
        return model_from_checkpoint(path).to(device)
    if is_local_path(source) and not path.exists():
        raise MissingFileError(f"model not found: {path}")
    return VGLAW.from_pretrained(str(source), map_location=str(device))


def resolve_model(arg: str | None) -> str:
    """--model, or the most recent model folder written here (said on stderr)."""
    if arg:
        return arg
    latest = latest_model()
    if latest is None:
        raise MissingFileError("no model given and none trained here yet: run `make demo` (CPU, ~20 min) or "
                               "`vglaw fit`, or pass --model DIR|HUB_ID|CKPT")
    print(f"vglaw predict: using {latest} (the most recent model written here; --model to choose)", file=sys.stderr)
    return str(latest)
