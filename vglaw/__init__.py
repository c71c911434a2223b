"""vglaw: single-stage multi-task visual grounding with language-adaptive weights (VG-LAW)."""
from vglaw.models import VARIANTS, VGLAW, ScratchVGLAW, create_model, list_models

__version__ = "0.2.0"
__all__ = ["VARIANTS", "VGLAW", "Grounder", "ScratchVGLAW", "create_model", "list_models"]


def __getattr__(name: str):
    if name == "Grounder":  # imported on first use: it pulls in the data pipeline
        from vglaw.inference import Grounder

        return Grounder
    raise AttributeError(f"module 'vglaw' has no attribute {name!r}")
