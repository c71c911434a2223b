"""Training with PyTorch Lightning: the LightningModule, losses, metrics, calibration, callbacks,
the run's preflight checks and the `vglaw fit / validate / test` entry (`lightning.py`)."""
from __future__ import annotations

_LAZY = {"GroundingMetrics": "vglaw.training.metrics", "VGLAWModule": "vglaw.training.module"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vglaw.training' has no attribute {name!r}")
