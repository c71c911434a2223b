"""Opening user-supplied pickles (refs `.p` files, detectron2 `.pkl`, PyTorch checkpoints)
without running code from them.

A pickle may name any importable callable and run it while loading. `plain_load` only lets
through plain containers and scalars, plus (when asked) NumPy arrays; `load_torch_file` opens
PyTorch files with `torch.load(weights_only=True)`, which allows tensors and plain data only. A
file that asks for anything else is refused, naming the file, before any of it runs.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from vglaw.errors import MissingFileError, UnsafeFileError

_PLAIN = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex")}
_NUMPY = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class UnsafePickleError(UnsafeFileError, pickle.UnpicklingError):
    """The pickle asked to build an object outside the allowed set."""


class _Restricted(pickle.Unpickler):
    def __init__(self, file, allowed: set[tuple[str, str]], source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle {module}.{name}; only plain containers"
                " and scalars (and NumPy arrays for weight files) are allowed"
            )
        return super().find_class(module, name)


def plain_load(path: str | Path, allow_numpy: bool = False) -> Any:
    """Load a pickle file allowing only plain Python data (and NumPy arrays if `allow_numpy`).

    Raises:
        UnsafePickleError: the file references any other global (nothing of it was executed).
        UnsafeFileError: the file is not a pickle at all.
    """
    path = Path(path)
    allowed = _PLAIN | (_NUMPY if allow_numpy else set())
    data = path.read_bytes()
    try:
        return _Restricted(io.BytesIO(data), allowed, str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure means the file is not a usable pickle
        raise UnsafeFileError(f"{path}: not a readable pickle ({type(err).__name__}: {_first_line(err)})") from err


def load_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load` without running code: tensors, containers and plain values only.

    Raises:
        MissingFileError: no such file.
        UnsafeFileError: empty, not a PyTorch file, or one whose pickle names code to run
            (refused before any of it ran).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise UnsafeFileError(f"{path}: empty file, not a {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            culprit = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise UnsafeFileError(f"{path}: refusing to load this {what}: it asks to run code ({culprit[:160]}); "
                                  "vglaw opens files only as tensors and plain data") from err
        raise UnsafeFileError(f"{path}: not a PyTorch {what} ({_first_line(err)})") from err
    except Exception as err:  # noqa: BLE001 - zip, EOF, decode errors: the file is not a checkpoint
        raise UnsafeFileError(f"{path}: not a PyTorch {what} ({type(err).__name__}: {_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
