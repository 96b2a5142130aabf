"""Pure tensor math shared by the eager pipeline and the fused stage modules: DDIM tables, guidance and
the fusion re-noise update. No modules, no I/O."""

from .ddim import DDIMSchedule, ddim_step, predict_x0
from .fusion import fusion_coefficients, fusion_update
from .guidance import cfg, fusion_guidance, refinement_guidance

__all__ = [
    "DDIMSchedule",
    "ddim_step",
    "predict_x0",
    "fusion_coefficients",
    "fusion_update",
    "cfg",
    "fusion_guidance",
    "refinement_guidance",
]
