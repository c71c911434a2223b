from vglaw.training.metrics import GroundingMetrics
from vglaw.training.module import VGLAWModule

__all__ = ["GroundingMetrics", "VGLAWModule"]
