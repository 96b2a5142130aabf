"""The fused per-stage modules: ONE call = one stage of Fusion Sampling.

``FusionStage``: PromptNet(z_ref, x_t, t, image tokens) -> S* -> text encoder with γ·S* inserted ->
UNet on [∅, C[γS*]] -> fusion guidance -> variance-preserving re-noise of x_t.
``RefinementStage``: PromptNet -> text encoder with S* -> UNet on [∅, C[S*], C~] -> guidance -> DDIM step.

They compose the same modules and the same :mod:`profusion_rt.sampling` functions as the eager pipeline
(the UNet's context-free prefix is computed once for the k conditionings, see
:mod:`profusion_rt.models.shared_prefix`), with every per-step and per-request scalar passed as a tensor
(so one exported graph, or one compiled graph, serves every step and every request of the same shape).
The scalars are packed per step:

* fusion ``scalars`` = [c_eps, c_noise, fusion_guidance_scale, fusion_embedding_scale]
* refinement ``scalars`` = [a_t, a_t', guidance_scale, reference_guidance_scale]

(float32, shape (4,)); :func:`step_tables` builds the (steps, 4) tables once per request.

The prediction type of the model (ε or v, :mod:`profusion_rt.sampling.prediction`) is a property of the
module, fixed when it is built (:meth:`FusionStage.from_pipeline`): an exported graph computes one kind, and
the model hash that names its artifacts covers the scheduler config that says which. For v-prediction the
fusion stage needs a_t to turn the guided v into ε; it reads it from the scheduler's ᾱ table at ``timestep``
(a constant of the module), so the stage inputs are the same for both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from profusion_rt import sampling
from profusion_rt.models import text as textenc
from profusion_rt.models.shared_prefix import shared_prefix_eps

FUSION_INPUTS = ("x", "timestep", "scalars", "ref_latents", "image_tokens", "token_embeds",
                 "placeholder_mask", "empty_context", "noise")
REFINEMENT_INPUTS = ("x", "timestep", "scalars", "ref_latents", "image_tokens", "token_embeds",
                     "placeholder_mask", "empty_context", "class_context")
STAGE_OUTPUT = "x_out"


def placeholder_conditioning(promptnet: nn.Module, text_encoder: nn.Module, text_skip_layers: int, x, timestep,
                             ref_latents, image_tokens, token_embeds, placeholder_mask, scale) -> torch.Tensor:
    """PromptNet on the live x_t and t -> S* -> C[scale * S*] (docs/algorithm.md, "The loop")."""
    s_star = promptnet(ref_latents, timestep, image_tokens, x)
    return textenc.encode_with_placeholder(text_encoder, token_embeds, placeholder_mask, s_star, scale,
                                           text_skip_layers)


def guided_eps(unet: nn.Module, x: torch.Tensor, timestep: torch.Tensor,
               contexts: Sequence[torch.Tensor], shared_prefix: bool = False) -> list[torch.Tensor]:
    """One UNet call on len(contexts) conditionings sharing x_t; one ε per conditioning.

    ``shared_prefix``: compute the UNet's context-free prefix once instead of k times
    (:mod:`profusion_rt.models.shared_prefix`; same result up to float rounding). The eager reference
    pipeline uses the plain batched call; the fused stages use the shared prefix."""
    k = len(contexts)
    if shared_prefix:
        out = shared_prefix_eps(unet, x, timestep, contexts)
    else:
        out = unet(torch.cat([x] * k), timestep, encoder_hidden_states=torch.cat(list(contexts))).sample
    # reshape + unbind, not chunk: chunk makes the exporter freeze the batch size.
    return list(out.reshape(k, x.shape[0], *out.shape[1:]).unbind(0))


class _Stage(nn.Module):
    #: the stage converts a guided v into ε itself and so needs a_t from the scheduler's table (the
    #: refinement stage gets a_t in its scalars)
    needs_alpha_table = False

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, promptnet: nn.Module, text_skip_layers: int,
                 prediction_type: str = sampling.EPSILON, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.promptnet = promptnet
        self.text_skip_layers = int(text_skip_layers)
        self.prediction_type = sampling.prediction_type(prediction_type)
        needs_table = self.prediction_type != sampling.EPSILON and self.needs_alpha_table
        if needs_table and alphas_cumprod is None:
            raise ValueError(f"a {self.prediction_type} {type(self).__name__} needs the scheduler's alphas_cumprod")
        if needs_table:
            device = next(unet.parameters()).device
            self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().to(device), persistent=False)
        else:
            self.alphas_cumprod = None

    @classmethod
    def from_pipeline(cls, pipe) -> "_Stage":
        """The stage over a pipeline's networks, for the prediction type of its scheduler config."""
        config = pipe.scheduler_config
        kind = sampling.prediction_type(config)
        table = sampling.ddim.alphas_cumprod_table(config) if kind != sampling.EPSILON and cls.needs_alpha_table \
            else None
        return cls(pipe.unet, pipe.text_encoder, pipe.promptnet, pipe.text_skip_layers, prediction_type=kind,
                   alphas_cumprod=table).eval()

    def alpha_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """a_t (0-d float32) from the scheduler's table, for ``timestep`` of shape (1,) or ()."""
        return self.alphas_cumprod.index_select(0, timestep.reshape(1)).reshape(())

    def conditioning(self, x, timestep, ref_latents, image_tokens, token_embeds, placeholder_mask, scale):
        return placeholder_conditioning(self.promptnet, self.text_encoder, self.text_skip_layers, x, timestep,
                                        ref_latents, image_tokens, token_embeds, placeholder_mask, scale)

    def eps(self, x: torch.Tensor, timestep: torch.Tensor, contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return guided_eps(self.unet, x, timestep, contexts, shared_prefix=True)


class FusionStage(_Stage):
    """x_t -> x_t after one fusion-stage iteration (docs/algorithm.md, "The loop", fusion stage)."""

    input_names = FUSION_INPUTS
    needs_alpha_table = True

    def forward(self, x, timestep, scalars, ref_latents, image_tokens, token_embeds, placeholder_mask,
                empty_context, noise):
        c_eps, c_noise, w_fusion, gamma = scalars.unbind(0)
        cond = self.conditioning(x, timestep, ref_latents, image_tokens, token_embeds, placeholder_mask, gamma)
        o_u, o_f = self.eps(x, timestep, [empty_context, cond])
        guided = sampling.fusion_guidance(o_u, o_f, w_fusion)
        if self.prediction_type != sampling.EPSILON:
            guided = sampling.to_epsilon(guided, x, self.alpha_at(timestep), self.prediction_type)
        return sampling.fusion_update(x, guided, noise, c_eps, c_noise)


class RefinementStage(_Stage):
    """x_t -> x_{t'}: the refinement stage and its DDIM step (docs/algorithm.md, "The loop", refinement stage)."""

    input_names = REFINEMENT_INPUTS

    def forward(self, x, timestep, scalars, ref_latents, image_tokens, token_embeds, placeholder_mask,
                empty_context, class_context):
        alpha, alpha_prev, s1, s2 = scalars.unbind(0)
        cond = self.conditioning(x, timestep, ref_latents, image_tokens, token_embeds, placeholder_mask, 1.0)
        e_u, e_c, e_r = self.eps(x, timestep, [empty_context, cond, class_context])
        e = sampling.refinement_guidance(e_u, e_c, e_r, s1, s2)
        return sampling.ddim_step(x, e, alpha, alpha_prev, self.prediction_type)


@dataclass
class StepTables:
    """Per-step inputs of the stage graphs for one request: timesteps (steps,) int64 and the packed
    scalars (steps, 4) float32 of each stage; ``prediction_type`` of the model the tables are for."""

    timesteps: torch.Tensor
    fusion: torch.Tensor
    refinement: torch.Tensor
    prediction_type: str = sampling.EPSILON

    def to(self, device) -> "StepTables":
        return StepTables(self.timesteps.to(device), self.fusion.to(device), self.refinement.to(device),
                          self.prediction_type)


def step_tables(schedule: sampling.DDIMSchedule, guidance_scale: float, reference_guidance_scale: float,
                fusion_guidance_scale: float, fusion_eta: float, fusion_embedding_scale: float) -> StepTables:
    n = len(schedule)
    c_eps, c_noise = sampling.fusion_coefficients(schedule.alpha, schedule.alpha_prev, fusion_eta)
    ones = torch.ones(n, dtype=torch.float32)
    fusion = torch.stack([c_eps, c_noise, ones * fusion_guidance_scale, ones * fusion_embedding_scale], 1)
    refinement = torch.stack([schedule.alpha, schedule.alpha_prev, ones * guidance_scale,
                              ones * reference_guidance_scale], 1)
    return StepTables(schedule.timesteps.clone(), fusion, refinement, schedule.prediction_type)
