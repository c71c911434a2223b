from vglaw.models.factory import VARIANTS, create_model, list_models
from vglaw.models.vglaw import VGLAW

__all__ = ["VARIANTS", "VGLAW", "create_model", "list_models"]
