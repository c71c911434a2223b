"""vglaw: single-stage multi-task visual grounding with language-adaptive weights (VG-LAW).

The public names load on first use, so `import vglaw` (and `vglaw --help`) does not import torch.
"""
from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["VARIANTS", "VGLAW", "Grounder", "ScratchVGLAW", "create_model", "list_models"]

_LAZY = {"VARIANTS": "vglaw.models.loading", "create_model": "vglaw.models.loading",
         "list_models": "vglaw.models.loading", "VGLAW": "vglaw.models.vglaw", "ScratchVGLAW": "vglaw.models.scratch",
         "Grounder": "vglaw.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vglaw' has no attribute {name!r}")
