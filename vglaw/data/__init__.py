"""Datasets: the refer / gRefCOCO readers, the shapes generator, augmentation and letterbox, the
Lightning data module. Import the module you need (`vglaw.data.refer`, `vglaw.data.datamodule`,
...): loading a reader does not load Lightning."""
from __future__ import annotations

_LAZY = {"ReferDataModule": "vglaw.data.datamodule", "ReferDataset": "vglaw.data.refer", "SPLITS": "vglaw.data.refer"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vglaw.data' has no attribute {name!r}")
