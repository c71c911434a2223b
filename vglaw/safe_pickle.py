"""Unpickling of user-supplied files that builds data, never code.

A pickle may name any importable callable and run it while loading; `plain_load` only lets
through plain containers and scalars, plus (when asked) NumPy arrays, so a file that tries
to build anything else is refused before any of it runs.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

_PLAIN = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex")}
_NUMPY = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class UnsafePickleError(pickle.UnpicklingError):
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
    """
    path = Path(path)
    allowed = _PLAIN | (_NUMPY if allow_numpy else set())
    data = path.read_bytes()
    return _Restricted(io.BytesIO(data), allowed, str(path)).load()
