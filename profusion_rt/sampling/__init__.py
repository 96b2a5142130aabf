"""Pure tensor math shared by the eager pipeline and the fused stage modules: DDIM tables, the prediction
type (ε or v) and its conversion to ε, guidance and the fusion re-noise update. No modules, no I/O."""

from profusion_rt.sampling.ddim import DDIMSchedule, ddim_step, predict_x0
from profusion_rt.sampling.fusion import fusion_coefficients, fusion_update
from profusion_rt.sampling.guidance import cfg, fusion_guidance, refinement_guidance
from profusion_rt.sampling.prediction import EPSILON, PREDICTION_TYPES, V_PREDICTION, prediction_type, to_epsilon, v_to_epsilon, v_to_x0

__all__ = [
    "DDIMSchedule",
    "ddim_step",
    "predict_x0",
    "fusion_coefficients",
    "fusion_update",
    "cfg",
    "fusion_guidance",
    "refinement_guidance",
    "EPSILON",
    "V_PREDICTION",
    "PREDICTION_TYPES",
    "prediction_type",
    "to_epsilon",
    "v_to_epsilon",
    "v_to_x0",
]
