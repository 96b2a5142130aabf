"""The request types and the eager PyTorch reference pipeline (every optimised backend is checked against it)."""

from profusion_rt.pipeline.eager import ProFusionPipeline
from profusion_rt.pipeline.request import (
    OUTPUT_TYPES,
    EncodedPrompts,
    Encoders,
    PreparedRequest,
    ProFusionOutput,
    ReferenceEncoding,
    RequestPreparation,
    SamplingParams,
    TorchEncoders,
    check_tensor,
    reference_seed,
    resolve_seeds,
    step_callback_inputs,
    tokenize_negative_prompt,
)

__all__ = [
    "OUTPUT_TYPES", "EncodedPrompts", "Encoders", "PreparedRequest", "ProFusionOutput", "ProFusionPipeline",
    "ReferenceEncoding", "RequestPreparation", "SamplingParams", "TorchEncoders", "check_tensor", "reference_seed",
    "resolve_seeds", "step_callback_inputs", "tokenize_negative_prompt",
]
