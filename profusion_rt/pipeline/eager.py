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
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from profusion_rt import sampling
from profusion_rt.core.dtypes import torch_dtype
from profusion_rt.core.errors import (
    InvalidParameterError,
    ModelLoadError,
    ProFusionError,
)
from profusion_rt.core.finite import FiniteGuard
from profusion_rt.core.presets import get_preset, preset_names
from profusion_rt.models.factory import Components, build_components
from profusion_rt.models.hub import looks_like_hub_id
from profusion_rt.models.loading import load_components, save_components
from profusion_rt.models.stages import guided_eps, placeholder_conditioning

logger = logging.getLogger(__name__)



from profusion_rt.pipeline.request import (
    OUTPUT_TYPES,
    EncodedPrompts,
    PreparedRequest,
    ProFusionOutput,
    ReferenceEncoding,
    RequestPreparation,
    TorchEncoders,
    _callback_tensor,
    step_callback_inputs,
)


class ProFusionPipeline(RequestPreparation):
    """ProFusion on Stable Diffusion 2: PromptNet turns a reference photo into S*, Fusion Sampling generates.

    Components are attributes: ``unet, vae, text_encoder, image_encoder, tokenizer, promptnet, scheduler``.
    ``prepare``, ``encode_reference``, ``encode_prompts`` and ``decode`` come from :class:`RequestPreparation`,
    running these modules through :class:`TorchEncoders`.
    """

    #: CLIP's projection heads (:class:`~profusion_rt.models.clip_heads.ClipProjections`) when the model
    #: carries them; evaluation only (``text_projection`` / ``visual_projection``)
    clip_projections = None

    #: True for a preset's seeded random weights (``from_preset``); see :func:`profusion_rt.core.presets.weights_label`
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
        initialised on the device: see :func:`~profusion_rt.models.factory.build_components`); "toy-faces"
        loads its trained weights shipped in the package (``seed`` is not used)."""
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
        components, meta = load_components(path, promptnet_path, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only, token=token)
        return cls.from_components(components, resolution=meta.get("resolution"), preset=meta.get("preset")).to(
            device, dtype
        )

    @classmethod
    def load(cls, model: str | Path, promptnet: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "fp32", seed: int = 0, **hub_kwargs) -> "ProFusionPipeline":
        """The one loader behind every command: ``model`` is a model folder, a preset name (random weights
        drawn from ``seed``) or a Hugging Face hub id ``org/name`` (a local folder wins; the hub honours
        HF_HOME, HF_HUB_OFFLINE and HF_TOKEN); ``promptnet`` a folder or hub id (folders and hub ids only);
        ``dtype`` a precision name (``fp32``/``fp16``/``bf16``) or a torch dtype; ``hub_kwargs`` go to
        :meth:`from_pretrained` (``revision``, ``cache_dir``, ``local_files_only``, ``token``)."""
        model = str(model)
        dtype = torch_dtype(dtype)
        if Path(model).is_dir() or (model not in preset_names() and looks_like_hub_id(model)):
            return cls.from_pretrained(model, promptnet_path=promptnet, device=device, dtype=dtype, **hub_kwargs)
        if promptnet is not None:
            raise ProFusionError("--promptnet needs --model to be a model folder or hub id")
        if model in preset_names() or "/" not in model:
            return cls.from_preset(model, seed=seed, device=device, dtype=dtype)
        raise ModelLoadError(f"model folder {model} does not exist")

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write every component in safetensors (atomically: a temporary folder renamed at the end)."""
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
