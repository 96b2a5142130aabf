"""The official code's stage structure, for MEASURING its cost only (never used by the runtime).

docs/algorithm.md, "Cost per denoising step": in every fusion-stage call the official pipeline runs the UNet on the
batch of three [∅, C[γS*], C~] and discards the C~ branch, and it re-encodes ∅ and C~ with the text encoder
at every stage call (fusion and refinement). Section 7 counts this as (R+1) x 3 UNet evaluations and
R+1 text-encoder calls of 3 sequences per step, against our minimal R x 2 + 3 and one sequence per call.

:class:`OfficialFusionStage` and :class:`OfficialRefinementStage` take exactly the inputs of
:class:`~profusion_rt.models.stages.FusionStage` / ``RefinementStage`` (so they drop into the same
engines, runtime loop and per-stage timing), hold the token ids of ∅ and C~ as buffers and IGNORE the
precomputed ``empty_context`` / ``class_context`` inputs, recomputing them instead. The discarded branch
does not feed the output, so the result equals the minimal stage's up to floating-point differences of the
batch-3 kernels (a test checks this).
"""

from __future__ import annotations

from typing import Sequence

import torch

from profusion_rt import sampling
from profusion_rt.models import text as textenc
from profusion_rt.models.stages import (
    FUSION_INPUTS,
    REFINEMENT_INPUTS,
    FusionStage,
    RefinementStage,
)
from profusion_rt.models.tokenizer import replace_placeholder, tokenize_prompt
from profusion_rt.runtime import Runtime
from profusion_rt.runtime.torch_engine import TorchEngine


class _OfficialContexts:
    """Mixin: the official per-call prompt encoding. Every stage call runs PromptNet, then ONE text-encoder
    call on the three sequences [∅, C[scale·S*], C~] (docs/algorithm.md, "Cost per denoising step": "3 sequences each"), i.e. ∅
    and C~ are re-encoded from their token ids although they are constant (section 6, item 5)."""

    def __init__(self, unet, text_encoder, promptnet, text_skip_layers: int, empty_ids: torch.Tensor,
                 class_ids: torch.Tensor):
        super().__init__(unet, text_encoder, promptnet, text_skip_layers)
        self.register_buffer("empty_ids", empty_ids.reshape(1, -1).long(), persistent=False)
        self.register_buffer("class_ids", class_ids.reshape(1, -1).long(), persistent=False)

    def official_contexts(self, x, timestep, ref_latents, image_tokens, token_embeds, placeholder_mask, scale):
        b = x.shape[0]
        s_star = self.promptnet(ref_latents, timestep, image_tokens, x)
        const = textenc.token_embeddings(self.text_encoder, torch.cat([self.empty_ids, self.class_ids]))
        const = const.to(token_embeds.dtype)
        m = placeholder_mask.to(token_embeds.dtype).unsqueeze(-1)
        cond = token_embeds * (1.0 - m) + s_star.to(token_embeds.dtype) * m
        hidden = torch.cat([const[0:1].expand(b, -1, -1), cond, const[1:2].expand(b, -1, -1)])
        out = textenc.run_text_layers(self.text_encoder, hidden, self.text_skip_layers)
        empty, cond, cls = out.reshape(3, b, *out.shape[1:]).unbind(0)
        return empty, cond * (1.0 + m * (scale - 1.0)), cls


class OfficialFusionStage(_OfficialContexts, FusionStage):
    """One fusion-stage iteration the official way: ∅ and C~ re-encoded, UNet on [∅, C[γS*], C~], the C~
    branch discarded. Same inputs and output as :class:`FusionStage` (``empty_context`` is ignored)."""

    input_names = FUSION_INPUTS

    def forward(self, x, timestep, scalars, ref_latents, image_tokens, token_embeds, placeholder_mask,
                empty_context, noise):
        c_eps, c_noise, w_fusion, gamma = scalars.unbind(0)
        empty, cond, cls = self.official_contexts(x, timestep, ref_latents, image_tokens, token_embeds,
                                                  placeholder_mask, gamma)
        e_u, e_f, _discarded = self.eps(x, timestep, [empty, cond, cls])
        e_hat = sampling.fusion_guidance(e_u, e_f, w_fusion)
        return sampling.fusion_update(x, e_hat, noise, c_eps, c_noise)


class OfficialRefinementStage(_OfficialContexts, RefinementStage):
    """The refinement stage with ∅ and C~ re-encoded at the call (``empty_context`` and ``class_context``
    are ignored). The UNet batch is [∅, C[S*], C~] as in the minimal stage."""

    input_names = REFINEMENT_INPUTS

    def forward(self, x, timestep, scalars, ref_latents, image_tokens, token_embeds, placeholder_mask,
                empty_context, class_context):
        alpha, alpha_prev, s1, s2 = scalars.unbind(0)
        empty, cond, cls = self.official_contexts(x, timestep, ref_latents, image_tokens, token_embeds,
                                                  placeholder_mask, 1.0)
        e_u, e_c, e_r = self.eps(x, timestep, [empty, cond, cls])
        e = sampling.refinement_guidance(e_u, e_c, e_r, s1, s2)
        return sampling.ddim_step(x, e, alpha, alpha_prev)


def prompt_ids(pipe, prompt: str, class_word: str = "person") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, 77) of ∅ and of C~ (the prompt with the class word in place of {S*})."""

    empty, _ = tokenize_prompt(pipe.tokenizer, "")
    cls, _ = tokenize_prompt(pipe.tokenizer, replace_placeholder(prompt, class_word))
    return empty.reshape(1, -1).to(pipe.device), cls.reshape(1, -1).to(pipe.device)


def official_stage_modules(pipe, prompt: str, class_word: str = "person",
                           ) -> tuple[OfficialFusionStage, OfficialRefinementStage]:
    """The two official-style stage modules over ``pipe``'s networks (shared, not copied) for ``prompt``."""
    empty_ids, class_ids = prompt_ids(pipe, prompt, class_word)
    args = (pipe.unet, pipe.text_encoder, pipe.promptnet, pipe.text_skip_layers, empty_ids, class_ids)
    return OfficialFusionStage(*args).eval(), OfficialRefinementStage(*args).eval()


def official_runtime(pipe, prompt: str, class_word: str = "person", use_cuda_graph: bool | None = False):
    """A :class:`~profusion_rt.runtime.Runtime` whose torch engines run the official-style stages, for a
    like-for-like comparison with the ``torch`` backend (same loop, same buffers)."""

    fusion, refinement = official_stage_modules(pipe, prompt, class_word)
    return Runtime(pipe, TorchEngine(fusion, FUSION_INPUTS, name="torch-official"),
                   TorchEngine(refinement, REFINEMENT_INPUTS, name="torch-official"),
                   backend="torch-official", use_cuda_graph=use_cuda_graph)


def stage_inputs_from_request(req, step: int = 0, fusion_iteration: int = 0) -> tuple[dict, dict]:
    """Real inputs of the fusion and refinement stage graphs at ``step`` of a prepared request (the
    constants the runtime loads into its buffers), as {name: tensor} in graph input order."""
    tab = req.tables
    common = {
        "x": req.latents,
        "timestep": tab.timesteps[step].reshape(1),
        "ref_latents": req.reference.latents.contiguous(),
        "image_tokens": req.reference.image_tokens.contiguous(),
        "token_embeds": req.prompts.embeds,
        "placeholder_mask": req.prompts.placeholder_mask,
        "empty_context": req.prompts.empty.contiguous(),
    }
    fusion = dict(common, scalars=tab.fusion[step], noise=req.noise[step, fusion_iteration])
    refinement = dict(common, scalars=tab.refinement[step], class_context=req.prompts.class_context)
    return ({n: fusion[n] for n in FUSION_INPUTS}, {n: refinement[n] for n in REFINEMENT_INPUTS})


__all__: Sequence[str] = ("OfficialFusionStage", "OfficialRefinementStage", "official_runtime",
                          "official_stage_modules", "prompt_ids", "stage_inputs_from_request")
