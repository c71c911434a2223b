from vglaw.models.loading import VARIANTS, create_model, list_models
from vglaw.models.scratch import ScratchVGLAW
from vglaw.models.vglaw import VGLAW

__all__ = ["VARIANTS", "VGLAW", "ScratchVGLAW", "create_model", "list_models"]
