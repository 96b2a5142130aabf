"""FLOPs of every benchmarked call, composed from per-network counts made on the meta device
(:func:`profusion_rt.models.flops.count_network_costs`: ``torch.utils.flop_counter``, no weights, instant).

Only the networks are counted (convolutions, matmuls, attention); guidance and DDIM arithmetic are
elementwise and negligible. Network costs are linear in the batch, so they are counted at batch 1 and
multiplied. docs/algorithm.md, "Cost per denoising step" gives the calls per denoising step of each sampling mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from profusion_rt.benchmarks.models import meta_components

from profusion_rt.models.flops import count_network_costs

#: The stage micro-benchmarks: (stage as the issue names it, graph, batch multiplier per image, what).
STAGES: tuple[tuple[str, str, int, str], ...] = (
    ("reference encoding", "vae_encoder", 1, "VAE encoder, reference image -> z_ref (once per request)"),
    ("reference encoding", "image_encoder", 1, "CLIP vision tower -> image tokens (once per request)"),
    ("prompt encoding", "text_encoder", 1, "text encoder, one 77-token prompt (∅ or C~, once per request)"),
    ("PromptNet", "promptnet", 1, "z_ref, x_t, t, image tokens -> S* (every stage call)"),
    ("UNet", "unet", 2, "one guided call on [∅, C]: batch 2 per image"),
    ("fusion stage", "fusion_stage", 1, "PromptNet + text enc. + UNet x2 + re-noise (minimal, ours)"),
    ("fusion stage", "fusion_stage_official", 1,
     "official-style: + C~ branch computed and discarded, ∅/C~ re-encoded (measure only)"),
    ("refinement stage", "refinement_stage", 1, "PromptNet + text enc. + UNet x3 + DDIM step (ours)"),
    ("refinement stage", "refinement_stage_official", 1, "official-style: ∅/C~ re-encoded (measure only)"),
    ("VAE decode", "vae_decoder", 1, "latent -> image"),
)

#: Graphs that exist only as torch modules in benchmarks/ (never exported).
TORCH_ONLY = ("fusion_stage_official", "refinement_stage_official")


@dataclass
class NetworkFlops:
    unet: int
    promptnet: int
    text_encoder: int
    image_encoder: int
    vae_encoder: int
    vae_decoder: int

    @classmethod
    def count(cls, model: str = "tiny", resolution: int | None = None) -> "NetworkFlops | None":
        built = meta_components(model, resolution)
        if built is None:
            return None
        components, res = built
        costs = {c.name: c.flops for c in count_network_costs(components, res, batch=1)}
        return cls(**costs)

    @classmethod
    def from_pipeline(cls, pipe) -> "NetworkFlops":
        costs = {c.name: c.flops for c in count_network_costs(pipe.components(), pipe.resolution, batch=1)}
        return cls(**costs)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    # -- per call -----------------------------------------------------------------------------------
    def graph(self, name: str, batch: int = 1) -> int:
        """FLOPs of one call of a benchmarked graph for ``batch`` images (the UNet graph: ``batch`` rows)."""
        pn, te, u = self.promptnet, self.text_encoder, self.unet
        per_image = {
            "vae_encoder": self.vae_encoder,
            "image_encoder": self.image_encoder,
            "text_encoder": te,
            "promptnet": pn,
            "unet": u,
            "fusion_stage": pn + te + 2 * u,
            "fusion_stage_official": pn + 3 * te + 3 * u,
            "refinement_stage": pn + te + 3 * u,
            "refinement_stage_official": pn + 3 * te + 3 * u,
            "vae_decoder": self.vae_decoder,
        }[name]
        return per_image * int(batch)

    # -- per image ----------------------------------------------------------------------------------
    def image(self, steps: int, fusion_steps: int = 1, mode: str = "minimal", reference_guidance: bool = True,
              batch: int = 1, decode: bool = True) -> int:
        """FLOPs of generating ``batch`` images end to end (prepare + loop + decode).

        ``mode``: "plain" (SD2 classifier-free guidance, no reference: 2 UNet evals per step), "minimal"
        (ours, = the eager reference pipeline: R x 2 + 2 or 3 per step), "official" ((R+1) x 3 per step
        and 3 text sequences per stage call)."""
        pn, te, u = self.promptnet, self.text_encoder, self.unet
        if mode == "plain":
            per_step = 2 * u
            once = 2 * te + self.vae_decoder  # C and ∅ encoded once
        elif mode == "minimal":
            per_step = fusion_steps * (pn + te + 2 * u) + pn + te + (3 if reference_guidance else 2) * u
            once = self.vae_encoder + self.image_encoder + 2 * te + self.vae_decoder
        elif mode == "official":
            per_step = (fusion_steps + 1) * (pn + 3 * te + 3 * u)
            once = self.vae_encoder + self.image_encoder + 2 * te + self.vae_decoder
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if not decode:
            once -= self.vae_decoder
        return (steps * per_step + once) * int(batch)


def unet_evals_per_step(mode: str, fusion_steps: int, reference_guidance: bool = True) -> str:
    """docs/algorithm.md's "Cost per denoising step" column "UNet calls (sequential) x batch" for one image."""
    if mode == "plain":
        return "1 x 2"
    if mode == "official":
        return f"{fusion_steps + 1} x 3"
    main = "1 x 3" if reference_guidance else "1 x 2"
    return main if fusion_steps == 0 else f"{fusion_steps} x 2 + {main}"


def achieved(flops: int | float | None, seconds: float | None, peak: float | None) -> dict[str, Any]:
    """FLOP/s achieved by a call of ``flops`` that took ``seconds``, and its fraction of ``peak``."""
    if not flops or not seconds:
        return {"flops_per_s": None, "utilization": None}
    rate = flops / seconds
    return {"flops_per_s": rate, "utilization": (rate / peak) if peak else None}
