"""vglaw: single-stage multi-task visual grounding with language-adaptive weights (VG-LAW)."""
from vglaw.models import VARIANTS, VGLAW, create_model, list_models

__version__ = "0.1.0"
__all__ = ["VARIANTS", "VGLAW", "create_model", "list_models"]
