"""The request side of the pipeline: a request's constants (prompt encodings, the reference encoding, the
drawn noise) computed by :class:`RequestPreparation` through the :class:`Encoders` seam, and the types that carry
them. The eager :class:`~profusion_rt.pipeline.eager.ProFusionPipeline` and the artifact-only runtime share it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch

from profusion_rt import sampling
from profusion_rt.core.errors import InvalidParameterError, PromptError
from profusion_rt.core.finite import check_finite
from profusion_rt.core.image_io import center_crop_resize, load_image, pil_to_tensor, tensor_to_pil
from profusion_rt.models import text as textenc
from profusion_rt.models.stages import StepTables, step_tables
from profusion_rt.models.tokenizer import PLACEHOLDER, replace_placeholder, tokenize_prompt
from profusion_rt.models.vision import image_tokens, vae_encode

if TYPE_CHECKING:  # annotation only
    from profusion_rt.pipeline.eager import ProFusionPipeline

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
