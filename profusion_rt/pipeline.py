"""The eager PyTorch reference pipeline: ProFusion's Fusion Sampling, read top to bottom like
docs/algorithm.md, "The loop". Every optimised backend is checked element by element against this.

Randomness (all drawn up front, on the CPU, so every device and backend sees the same numbers):

* image j of a batch uses seed ``seed + j`` (or ``seed[j]`` when a list is given);
* from ``torch.Generator().manual_seed(seed_j)``: first x_T (1, 4, h, w), then every fusion-stage draw
  z in the order it is used, as one tensor (steps, fusion_steps, 1, 4, h, w);
* the reference latent's VAE posterior noise (``mode="sample"``) comes from a separate stream,
  ``torch.Generator().manual_seed(reference_seed(seed))`` of the batch's first seed, so
  ``pipe(reference_image=img, seed=s)`` equals ``pipe(reference=pipe.encode_reference(img, seed=s), seed=s)``.

Structure: :class:`RequestPreparation` computes a request's constants (``prepare``) and decodes; it calls
the networks through an :class:`Encoders` seam (:class:`TorchEncoders`: the pipeline's torch modules), which
the artifact-only runtime fills with exported graphs. :class:`ProFusionPipeline` adds the components and the
sampling loop (``denoise``).

Official-code names, for readers who know them: ``fusion_steps`` = ``refine_step``,
``fusion_guidance_scale`` = ``refine_guidance_scale``, ``fusion_eta`` = ``refine_eta``,
``fusion_embedding_scale`` = ``refine_emb_scale``, ``reference_guidance_scale`` = ``guidance_scale_ref``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import sampling
from .errors import InvalidParameterError, PromptError
from .finite import FiniteGuard, check_finite
from .image_io import center_crop_resize, load_image, pil_to_tensor, tensor_to_pil
from .models import text as textenc
from .models.factory import Components, build_components
from .models.stages import StepTables, guided_eps, placeholder_conditioning, step_tables
from .models.tokenizer import PLACEHOLDER, replace_placeholder, tokenize_prompt
from .models.vision import image_tokens, vae_encode
from .presets import get_preset

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")


def reference_seed(seed: int) -> int:
    """Seed of the reference-posterior stream derived from a request seed (documented, stable)."""
    digest = hashlib.sha256(f"profusion-rt/reference/{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class ReferenceEncoding:
    """Per-reference constants: ``latents`` z_ref (R, 4, h, w) and CLIP ``image_tokens`` (R, T, width)."""

    latents: torch.Tensor
    image_tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def expand(self, counts: Sequence[int]) -> "ReferenceEncoding":
        """Repeat reference i ``counts[i]`` times (one row per image of the batch)."""
        if len(self) == 1:
            total = int(sum(counts))
            return ReferenceEncoding(
                self.latents.expand(total, -1, -1, -1), self.image_tokens.expand(total, -1, -1)
            )
        rep = torch.tensor(list(counts), device=self.latents.device)
        return ReferenceEncoding(
            self.latents.repeat_interleave(rep, 0), self.image_tokens.repeat_interleave(rep, 0)
        )


@dataclass
class EncodedPrompts:
    """Token embeddings of the user prompts and the constant contexts, one row per image."""

    embeds: torch.Tensor  # (B, 77, D) token + position embeddings of C[S*]
    placeholder_mask: torch.Tensor  # (B, 77) float, 1.0 at the S* row
    empty: torch.Tensor  # (B, 77, D) conditioning of ∅
    class_context: torch.Tensor | None  # (B, 77, D) conditioning of C~ (the class-word prompt)


@dataclass
class ProFusionOutput:
    images: Any  # list of PIL images, (B, H, W, 3) float array in [0, 1], or latents
    latents: torch.Tensor
    seeds: list[int]


@dataclass
class PreparedRequest:
    """Everything one request needs inside the sampling loop, on the pipeline's device."""

    params: "SamplingParams"
    seeds: list[int]
    fusion_steps: int  # R actually run (0 without a reference)
    use_class: bool  # the refinement batch includes C~
    reference: ReferenceEncoding | None  # one row per image
    prompts: EncodedPrompts
    plain_context: torch.Tensor | None  # C without placeholder (plain SD2 mode)
    latents: torch.Tensor  # x_T (B, 4, h, w)
    noise: torch.Tensor  # (steps, R, B, 4, h, w)
    tables: StepTables

    @property
    def batch(self) -> int:
        return int(self.latents.shape[0])


@dataclass(frozen=True)
class SamplingParams:
    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    reference_guidance_scale: float = 5.0
    fusion_steps: int = 1
    fusion_guidance_scale: float = 7.0
    fusion_eta: float = 1.0
    fusion_embedding_scale: float = 0.6

    def validate(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise InvalidParameterError(f"num_inference_steps must be an integer >= 1, got {self.num_inference_steps!r}")
        if not isinstance(self.fusion_steps, int) or self.fusion_steps < 0:
            raise InvalidParameterError(f"fusion_steps must be an integer >= 0, got {self.fusion_steps!r}")
        for name in ("guidance_scale", "reference_guidance_scale", "fusion_guidance_scale", "fusion_embedding_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise InvalidParameterError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.fusion_eta, (int, float)) or not 0.0 <= self.fusion_eta <= 1.0:
            raise InvalidParameterError(f"fusion_eta must be in [0, 1], got {self.fusion_eta!r}")


class Encoders(Protocol):
    """The network calls of request preparation and decoding: the seam between the algorithm and where
    the networks run. :class:`TorchEncoders` (the default) calls the pipeline's torch modules; the
    artifact-only runtime (:mod:`profusion_rt.runtime.artifact_pipeline`) runs the exported graphs behind
    the same methods, so both share :class:`RequestPreparation` line for line."""

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 ids -> token + position embeddings (B, L, D)."""

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids of prompts without placeholder (∅, C~) -> their conditioning (B, L, D)."""

    def encode_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, D) token embeddings of prompts without placeholder -> their conditioning (plain SD2 C)."""

    def reference_latents(self, pixels: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
        """[0, 1] pixels -> scaled z_ref: the VAE posterior mean, or (``"sample"``) a draw whose noise comes
        from ``generator`` on the CPU."""

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels at the model resolution -> CLIP image tokens (B, T, V)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1]."""


class TorchEncoders:
    """:class:`Encoders` over a pipeline's torch modules (read at each call, so swapped modules are used)."""

    def __init__(self, pipe: "ProFusionPipeline"):
        self.pipe = pipe

    def token_embeddings(self, input_ids):
        return textenc.token_embeddings(self.pipe.text_encoder, input_ids)

    def encode_ids(self, input_ids):
        return textenc.encode_plain(self.pipe.text_encoder, input_ids, self.pipe.text_skip_layers)

    def encode_embeddings(self, embeds):
        return textenc.run_text_layers(self.pipe.text_encoder, embeds, self.pipe.text_skip_layers)

    def reference_latents(self, pixels, mode, generator):
        return vae_encode(self.pipe.vae, pixels, mode, generator)

    def image_tokens(self, pixels):
        return image_tokens(self.pipe.image_encoder, pixels)

    def decode_latents(self, latents):
        vae = self.pipe.vae
        y = vae.decode(latents / vae.config.scaling_factor).sample
        check_finite(y, "VAE decode", self.pipe.dtype)  # before the clamp, which would hide an Inf
        return (y / 2 + 0.5).clamp(0, 1)


class RequestPreparation:
    """Per-request constants (validation, tokenization, reference features, noise, step tables) and
    decoding: everything of a request outside the sampling loop. Shared by :class:`ProFusionPipeline` and
    the artifact-only runtime; the networks are called through ``self.encoders`` (:class:`Encoders`).

    A subclass provides ``encoders``, ``tokenizer``, ``scheduler_config`` (the DDIM scheduler's config),
    ``resolution``, ``latent_shape``, ``device`` and ``dtype``.
    """

    # -- per-request constants -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_reference(self, image, mode: str = "sample", seed: int = 0) -> ReferenceEncoding:
        """Reference image(s) -> z_ref and CLIP image tokens. ``image``: a path, PIL image, array or bytes,
        or a list of them. ``mode``: "sample" (seeded VAE posterior draw, as the official code) or "mean"."""
        if mode not in ("sample", "mean"):
            raise InvalidParameterError(f"reference mode must be 'sample' or 'mean', got {mode!r}")
        images = image if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise InvalidParameterError("no reference image given")
        pixels = torch.stack(
            [pil_to_tensor(center_crop_resize(load_image(im), self.resolution)) for im in images]
        ).to(self.device, self.dtype)
        generator = torch.Generator().manual_seed(reference_seed(seed))
        latents = self.encoders.reference_latents(pixels, mode, generator)
        tokens = self.encoders.image_tokens(pixels)
        return ReferenceEncoding(latents=latents, image_tokens=tokens.to(self.dtype))

    def _tokenize(self, prompts: Sequence[str], allow_placeholder: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = [], []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
            row, index = tokenize_prompt(self.tokenizer, prompt)
            if index is not None and not allow_placeholder:
                raise PromptError(f"the prompt {prompt!r} contains {PLACEHOLDER} but no reference image was given")
            if index is None and allow_placeholder:
                raise PromptError(
                    f"the prompt {prompt!r} has no {PLACEHOLDER} placeholder, but a reference image was given"
                )
            m = torch.zeros(row.shape[0])
            if index is not None:
                m[index] = 1.0
            ids.append(row)
            mask.append(m)
        return torch.stack(ids).to(self.device), torch.stack(mask).to(self.device, self.dtype)

    @torch.no_grad()
    def _tokenize_negative(self, negative_prompt, n_prompts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids of the distinct negative prompts (U, 77), index of each prompt's row or None when U == 1).
        ``None`` means the empty prompt ∅; a string applies to every prompt; a list gives one per prompt."""
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = ["" if negative_prompt is None else negative_prompt]
        elif isinstance(negative_prompt, (list, tuple)):
            negatives = list(negative_prompt)
            if len(negatives) != n_prompts:
                raise InvalidParameterError(
                    f"{len(negatives)} negative prompts for {n_prompts} prompts; give one string, or one per prompt")
        else:
            raise InvalidParameterError(
                f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
        distinct = list(dict.fromkeys(negatives)) if all(isinstance(n, str) for n in negatives) else negatives
        ids = [tokenize_negative_prompt(self.tokenizer, text) for text in distinct]
        rows = None if len(distinct) == 1 else torch.tensor([distinct.index(n) for n in negatives])
        return torch.stack(ids).to(self.device), rows

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], class_word: str | None, with_reference: bool,
                       counts: Sequence[int], negative_prompt: str | Sequence[str] | None = None) -> EncodedPrompts:
        """Token embeddings of C[S*] (S* is inserted per stage call) and the constant ∅ and C~ contexts.
        ``negative_prompt`` replaces ∅ in every guidance term (one string for all prompts, or one per prompt)."""
        ids, mask = self._tokenize(prompts, allow_placeholder=with_reference)
        negative_ids, negative_rows = self._tokenize_negative(negative_prompt, len(prompts))
        rep = torch.tensor(list(counts), device=self.device)
        encoders = self.encoders
        embeds = encoders.token_embeddings(ids)
        empty = encoders.encode_ids(negative_ids)
        if negative_rows is not None:  # one negative prompt per prompt, then one row per image
            empty = empty[negative_rows.to(self.device)].repeat_interleave(rep, 0)
        if with_reference:
            word = class_word if class_word is not None else "person"
            class_ids, _ = self._tokenize([replace_placeholder(p, word) for p in prompts], allow_placeholder=False)
            class_context = encoders.encode_ids(class_ids).repeat_interleave(rep, 0)
        else:
            class_context = None
        total = int(sum(counts))
        return EncodedPrompts(
            embeds=embeds.repeat_interleave(rep, 0),
            placeholder_mask=mask.repeat_interleave(rep, 0),
            empty=empty.expand(total, -1, -1) if negative_rows is None else empty,
            class_context=class_context,
        )

    def draw_noise(self, seeds: Sequence[int], steps: int, fusion_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (B, 4, h, w) and the fusion noise (steps, fusion_steps, B, 4, h, w), float32 on the CPU."""
        shape = self.latent_shape
        xs, zs = [], []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            xs.append(torch.randn((1, *shape), generator=g))
            zs.append(torch.randn((steps, fusion_steps, 1, *shape), generator=g))
        return torch.cat(xs, 0), torch.cat(zs, 2)

    @torch.no_grad()
    def prepare(
        self,
        reference_image=None,
        prompt: str | Sequence[str] = "a {S*}",
        class_word: str | None = "person",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        reference_guidance_scale: float = 5.0,
        fusion_steps: int = 1,
        fusion_guidance_scale: float = 7.0,
        fusion_eta: float = 1.0,
        fusion_embedding_scale: float = 0.6,
        seed: int | Sequence[int] = 0,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        reference: ReferenceEncoding | None = None,
        num_images_per_prompt: int = 1,
        reference_mode: str = "sample",
        negative_prompt: str | Sequence[str] | None = None,
    ) -> PreparedRequest:
        """Validate a request and compute its constants once: reference features, prompt embeddings and
        placeholder mask, the ∅ and C~ contexts, x_T and all fusion noise, and the per-step tables.

        ``negative_prompt`` (as diffusers): replaces the empty prompt ∅ in every guidance term (fusion stage,
        refinement stage, plain CFG); one string for all prompts or a list with one per prompt; at most 77
        tokens. ``None`` and ``""`` are ∅."""
        params = SamplingParams(num_inference_steps, guidance_scale, reference_guidance_scale, fusion_steps,
                                fusion_guidance_scale, fusion_eta, fusion_embedding_scale)
        params.validate()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise PromptError("no prompt given")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InvalidParameterError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        counts = [num_images_per_prompt] * len(prompts)
        seeds = resolve_seeds(seed, sum(counts))
        with_reference = reference_image is not None or reference is not None
        device, dtype = self.device, self.dtype

        # Tokenize first: prompt errors are reported before any network runs.
        encoded = self.encode_prompts(prompts, class_word, with_reference, counts, negative_prompt)
        if with_reference and reference is None:
            reference = self.encode_reference(reference_image, mode=reference_mode, seed=seeds[0])
        if reference is not None and len(reference) not in (1, len(prompts)):
            raise InvalidParameterError(
                f"{len(reference)} reference images for {len(prompts)} prompts; give one, or one per prompt"
            )

        # All randomness up front.
        fusion = params.fusion_steps if with_reference else 0
        schedule = sampling.DDIMSchedule.create(self.scheduler_config, params.num_inference_steps)
        x_init, z = self.draw_noise(seeds, params.num_inference_steps, fusion)
        x = check_tensor("latents", latents, x_init.shape) if latents is not None else x_init
        if noise is not None:
            z = check_tensor("noise", noise, z.shape)
        # Without a reference the pipeline is plain SD2 classifier-free guidance: C is constant.
        plain = None if with_reference else self.encoders.encode_embeddings(encoded.embeds)
        tables = step_tables(schedule, params.guidance_scale, params.reference_guidance_scale,
                             params.fusion_guidance_scale, params.fusion_eta, params.fusion_embedding_scale)
        return PreparedRequest(
            params=params,
            seeds=seeds,
            fusion_steps=fusion,
            use_class=with_reference and params.reference_guidance_scale != 0,
            reference=reference.expand(counts) if reference is not None else None,
            prompts=encoded,
            plain_context=plain,
            latents=x.to(device, dtype),
            noise=z.to(device, dtype),
            tables=tables.to(device),
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images: VAE decode of x / scaling_factor, then (y / 2 + 0.5) clamped to [0, 1]."""
        if output_type == "latent":
            return latents
        images = check_finite(self.encoders.decode_latents(latents), "VAE decode", self.dtype).float().cpu()
        if output_type == "np":
            return images.permute(0, 2, 3, 1).numpy()
        return [tensor_to_pil(im) for im in images]


class ProFusionPipeline(RequestPreparation):
    """ProFusion on Stable Diffusion 2: PromptNet turns a reference photo into S*, Fusion Sampling generates.

    Components are attributes: ``unet, vae, text_encoder, image_encoder, tokenizer, promptnet, scheduler``.
    ``prepare``, ``encode_reference``, ``encode_prompts`` and ``decode`` come from :class:`RequestPreparation`,
    running these modules through :class:`TorchEncoders`.
    """

    #: CLIP's projection heads (:class:`~profusion_rt.models.clip_heads.ClipProjections`) when the model
    #: carries them; evaluation only (``text_projection`` / ``visual_projection``)
    clip_projections = None

    #: True for a preset's seeded random weights (``from_preset``); see :func:`profusion_rt.presets.weights_label`
    random_weights: bool = False

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        image_encoder,
        tokenizer,
        promptnet,
        scheduler,
        text_skip_layers: int = 1,
        resolution: int | None = None,
        preset: str | None = None,
    ):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.tokenizer = tokenizer
        self.promptnet = promptnet
        self.scheduler = scheduler
        self.text_skip_layers = int(text_skip_layers)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or unet.config.sample_size * self.vae_scale_factor)
        self.preset = preset
        self.progress_bar = True

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_components(cls, c: Components, **kwargs) -> "ProFusionPipeline":
        pipe = cls(
            c.unet, c.vae, c.text_encoder, c.image_encoder, c.tokenizer, c.promptnet, c.scheduler,
            text_skip_layers=c.text_skip_layers, **kwargs,
        )
        pipe.clip_projections = c.clip_projections
        return pipe

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> "ProFusionPipeline":
        """Random weights for preset ``name`` ("tiny", "sd2-base", "sd2-768") drawn from ``seed`` (on CUDA,
        initialised on the device: see :func:`~profusion_rt.models.factory.build_components`)."""
        preset = get_preset(name)
        pipe = cls.from_components(build_components(preset, seed=seed, device=device),
                                   resolution=preset.resolution, preset=name)
        pipe.random_weights = preset.random_weights  # announced by the commands (presets.announce_random_weights)
        return pipe.to(device, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, promptnet_path: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, token: str | bool | None = None) -> "ProFusionPipeline":
        """Load a model folder: the released ProFusion layout (``openclip`` CLIPModel), our own layout, or a
        plain SD2 folder with the PromptNet (and image encoder) in ``promptnet_path``. ``path`` and
        ``promptnet_path`` may be Hugging Face hub ids (``org/name``; a local folder of that name wins):
        ``revision``, ``cache_dir``, ``local_files_only`` and ``token`` go to ``huggingface_hub``."""
        from .models.loading import load_components

        components, meta = load_components(path, promptnet_path, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only, token=token)
        return cls.from_components(components, resolution=meta.get("resolution"), preset=meta.get("preset")).to(
            device, dtype
        )

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write every component in safetensors (atomically: a temporary folder renamed at the end)."""
        from .models.loading import save_components

        return save_components(self, Path(path), overwrite=overwrite)

    def components(self) -> Components:
        return Components(self.unet, self.vae, self.text_encoder, self.image_encoder, self.promptnet,
                          self.scheduler, self.tokenizer, self.text_skip_layers, self.clip_projections)

    def networks(self) -> dict[str, torch.nn.Module]:
        return self.components().networks()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ProFusionPipeline":
        for net in self.networks().values():
            current = next(net.parameters())
            if dtype is not None and current.dtype != dtype:
                net.to(dtype=dtype)
            if device is not None and current.device != torch.device(device):
                net.to(device=device)
        if self.clip_projections is not None:
            self.clip_projections.to(device=device, dtype=dtype)
        return self

    @property
    def text_projection(self):
        return None if self.clip_projections is None else self.clip_projections.text_projection

    @property
    def visual_projection(self):
        return None if self.clip_projections is None else self.clip_projections.visual_projection

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.unet.config.in_channels), side, side)

    @property
    def scheduler_config(self):
        return self.scheduler.config

    def image_tokens_shape(self, batch: int) -> tuple[int, int, int]:
        """(batch, CLIP tokens incl. the class token, vision width) of :meth:`encode_reference`'s tokens."""
        cfg = self.image_encoder.config
        return (batch, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    @property
    def encoders(self) -> TorchEncoders:
        return TorchEncoders(self)

    # -- the algorithm ---------------------------------------------------------------------------------
    def _conditioning(self, ref: ReferenceEncoding, prompts: EncodedPrompts, x: torch.Tensor,
                      t: torch.Tensor, scale) -> torch.Tensor:
        return placeholder_conditioning(self.promptnet, self.text_encoder, self.text_skip_layers, x, t,
                                        ref.latents, ref.image_tokens, prompts.embeds, prompts.placeholder_mask, scale)

    @torch.no_grad()
    def denoise(self, req: PreparedRequest, callback_on_step_end: Callable | None = None,
                callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                progress_callback: Callable[[int, int], Any] | None = None) -> torch.Tensor:
        """The sampling loop of docs/algorithm.md, "The loop", eagerly: returns the final latents. The callbacks are
        described in :meth:`__call__`."""
        x, ref, enc, tab = req.latents, req.reference, req.prompts, req.tables
        kind = tab.prediction_type  # ε or v: the fusion update and the DDIM step need ε (sampling.prediction)
        names = step_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, ref is not None)
        plain = req.plain_context
        steps = tqdm(range(len(tab.timesteps)), desc="sampling", disable=not self.progress_bar, leave=False)
        guard = FiniteGuard(self.dtype)  # device-side flags per stage call, read once after the loop
        for i in steps:
            t = tab.timesteps[i]
            c_eps, c_noise, w_fusion, gamma = tab.fusion[i].unbind(0)
            alpha, alpha_prev, s1, s2 = tab.refinement[i].unbind(0)

            # Fusion stage, R times: re-noise x_t at the same level with ê guided by C[γ S*].
            for r in range(req.fusion_steps):
                cond = self._conditioning(ref, enc, x, t, gamma)
                e_u, e_f = guided_eps(self.unet, x, t, [enc.empty, cond])
                e_hat = sampling.fusion_guidance(e_u, e_f, w_fusion)
                e_hat = sampling.to_epsilon(e_hat, x, alpha, kind)  # v -> ε; ε unchanged
                x = guard.watch(sampling.fusion_update(x, e_hat, req.noise[i, r], c_eps, c_noise), "fusion stage", i)

            # Refinement stage: one UNet call on [∅, C[S*], C~], guidance, DDIM step (eta = 0).
            cond = self._conditioning(ref, enc, x, t, 1.0) if ref is not None else plain
            contexts = [enc.empty, cond] + ([enc.class_context] if req.use_class else [])
            eps = guided_eps(self.unet, x, t, contexts)
            e = sampling.refinement_guidance(eps[0], eps[1], eps[2] if req.use_class else None, s1, s2)
            x = guard.watch(sampling.ddim_step(x, e, alpha, alpha_prev, kind), "refinement stage", i)
            if callback_on_step_end is not None:
                x, enc, plain = self._step_end(callback_on_step_end, names, i, t, x, enc, plain)
            if progress_callback is not None:
                progress_callback(i + 1, len(tab.timesteps))
        guard.check()
        return x

    def _step_end(self, callback: Callable, names: Sequence[str], i: int, t: torch.Tensor, x: torch.Tensor,
                  enc: EncodedPrompts, plain: torch.Tensor | None):
        """Call ``callback_on_step_end`` after step i; the tensors it returns replace the loop's (diffusers)."""
        current = {"latents": x, "negative_prompt_embeds": enc.empty, "prompt_embeds": plain}
        out = callback(self, i, t, {name: current[name] for name in names})
        if out is None:
            out = {}
        if not isinstance(out, Mapping):
            raise InvalidParameterError(
                f"callback_on_step_end must return a dict of tensors, got {type(out).__name__}")
        new = {name: _callback_tensor(name, out[name], old) if name in out and old is not None else old
               for name, old in current.items()}
        if new["negative_prompt_embeds"] is not enc.empty:
            enc = dataclasses.replace(enc, empty=new["negative_prompt_embeds"])
        return new["latents"], enc, new["prompt_embeds"]

    @torch.no_grad()
    def __call__(self, *args, output_type: str = "pil", callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 progress_callback: Callable[[int, int], Any] | None = None, **kwargs) -> ProFusionOutput:
        """Generate images. Arguments as :meth:`prepare`, plus ``output_type`` ("pil", "np", "latent") and:

        * ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict``, diffusers' step
          callback, called after each step's DDIM update with ``callback_kwargs`` holding the tensors named in
          ``callback_on_step_end_tensor_inputs`` (default ``["latents"]``; also ``"negative_prompt_embeds"``,
          the ∅ / negative context, and in plain mode ``"prompt_embeds"``); the tensors of the returned dict
          replace the loop's (same shapes). An object with a ``tensor_inputs`` attribute (diffusers'
          ``PipelineCallback``) names its own inputs. The runtime has no per-step hook (see
          :class:`~profusion_rt.runtime.Runtime`).
        * ``progress_callback(done_steps, total_steps)``: called after each step (the runtime takes it too).
        """
        if output_type not in OUTPUT_TYPES:
            raise InvalidParameterError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if progress_callback is not None and not callable(progress_callback):
            raise InvalidParameterError("progress_callback must be callable (done_steps, total_steps)")
        step_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, False)  # fail fast
        req = self.prepare(*args, **kwargs)
        x = self.denoise(req, callback_on_step_end, callback_on_step_end_tensor_inputs, progress_callback)
        return ProFusionOutput(images=self.decode(x, output_type), latents=x, seeds=req.seeds)


def tokenize_negative_prompt(tokenizer, text) -> torch.Tensor:
    """Token ids (77,) of a negative prompt: a plain prompt (no ``{S*}``) of at most 77 tokens. Raises
    :class:`InvalidParameterError` for a non-string and :class:`PromptError` (one line) otherwise."""
    if not isinstance(text, str):
        raise InvalidParameterError(f"a negative prompt must be a string, got {type(text).__name__}")
    try:
        row, index = tokenize_prompt(tokenizer, text)
    except PromptError as exc:
        raise PromptError(f"negative_prompt: {exc}") from None
    if index is not None:
        raise PromptError(f"negative_prompt: {text!r} contains {PLACEHOLDER}; a negative prompt is a plain prompt")
    return row


#: the tensors ``callback_on_step_end`` may read and replace (diffusers' names)
STEP_CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")


def step_callback_inputs(callback, names: Sequence[str] | str | None, with_reference: bool) -> tuple[str, ...]:
    """The validated ``callback_on_step_end_tensor_inputs`` (() without a callback)."""
    if callback is None:
        return ()
    if not callable(callback):
        raise InvalidParameterError("callback_on_step_end must be callable (pipe, step_index, timestep, callback_kwargs)")
    names = getattr(callback, "tensor_inputs", None) or names or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in STEP_CALLBACK_TENSORS]
    if unknown:
        raise InvalidParameterError(f"callback_on_step_end_tensor_inputs: {', '.join(map(repr, unknown))} not among "
                                    f"{', '.join(STEP_CALLBACK_TENSORS)}")
    if with_reference and "prompt_embeds" in names:
        raise InvalidParameterError("callback_on_step_end_tensor_inputs: 'prompt_embeds' exists in plain mode only; "
                                    "with a reference image C[S*] is recomputed from S* at every stage call")
    return names


def _callback_tensor(name: str, value, old: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise InvalidParameterError(f"callback_on_step_end returned {name} as {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(old.shape):
        raise InvalidParameterError(
            f"callback_on_step_end returned {name} of shape {tuple(value.shape)}; expected {tuple(old.shape)}")
    return value.to(old.device, old.dtype)


def resolve_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """``seed`` -> one seed per image: an int gives seed, seed+1, ...; a list must have one per image."""
    if isinstance(seed, (list, tuple)):
        seeds = list(seed)
        if len(seeds) != batch:
            raise InvalidParameterError(f"{len(seeds)} seeds given for {batch} images")
    else:
        # bool is an int subclass: keep it as given so the check below rejects it
        seeds = [seed + j for j in range(batch)] if isinstance(seed, int) and not isinstance(seed, bool) else [seed]
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 - batch:
            raise InvalidParameterError(f"seed must be a non-negative integer, got {s!r}")
    return seeds


def check_tensor(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise InvalidParameterError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise InvalidParameterError(f"{name} has shape {tuple(value.shape)}; expected {tuple(shape)}")
    if not torch.isfinite(value).all():
        raise InvalidParameterError(f"{name} contains NaN or Inf")
    return value.float().cpu()
