"""One declaration per exported graph: names, dtypes, symbolic shapes, variable axes, sample inputs and
the validation tolerance (docs/architecture.md, "One spec per graph").

Export, validation, engine building, the runtime's buffer allocation and the tests all read these specs.
This module imports torch but nothing of onnx / onnxruntime / polygraphy / tensorrt.

Symbolic dimensions (:func:`model_dims` gives their values for a pipeline):

=====  ==========================================================================
``B``  batch (the only axis that may vary; the stage graphs batch their UNet call to 2B or 3B inside)
``L``  text sequence length (77)
``D``  text width (= UNet cross-attention width = S* width)
``N``  S* tokens produced by PromptNet (1 for the released configuration)
``T``  CLIP image tokens (1 + patches), ``V`` CLIP vision width
``C``  latent channels (4), ``h``/``w`` latent side, ``H``/``W`` image side (the reference resolution)
``S``  packed per-step scalars of a stage (4)
=====  ==========================================================================

Dtypes: a tensor declared ``float32`` with ``fixed=False`` follows the precision of the artifact
("fp16" -> ``float16``); ``timestep`` (int64), ``input_ids`` (int64), the stage ``scalars`` and
``embedding_scale`` (float32) are fixed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from profusion_rt import sampling
from profusion_rt.artifacts import graphs
from profusion_rt.core.dtypes import torch_dtype
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.core.presets import SD2_SCHEDULER
from profusion_rt.models.stages import (
    FUSION_INPUTS,
    REFINEMENT_INPUTS,
    STAGE_OUTPUT,
    step_tables,
)
from profusion_rt.models.text import token_embeddings

__all__ = [
    "TensorSpec",
    "GraphSpec",
    "GRAPHS",
    "GRAPH_NAMES",
    "PRECISIONS",
    "model_dims",
    "get_graph",
    "precision_dtype",
]

#: Artifact precisions. ``bf16`` exists for TensorRT only (built from the float32 ONNX with the BF16 flag).
PRECISIONS = ("fp32", "fp16", "bf16")

def precision_dtype(precision: str) -> str:
    """Dtype name of the model-dtype tensors of an artifact of ``precision`` ("fp16" -> "float16").
    ``bf16`` artifacts keep float32 inputs and outputs (the engine computes in bf16 inside)."""

    if precision not in PRECISIONS:
        raise InvalidParameterError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "float16" if precision == "fp16" else "float32"


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape`` holds ints and symbols (see the module docstring)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    #: True: the dtype never follows the precision (int64 ids and timesteps, float32 step scalars).
    fixed: bool = False

    def with_precision(self, precision: str) -> "TensorSpec":
        if self.fixed or not self.dtype.startswith("float"):
            return self
        return replace(self, dtype=precision_dtype(precision))

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(d) if isinstance(d, int) else int(dims[d]) for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "fixed": self.fixed}


def _t(name: str, *shape: str | int, dtype: str = "float32", fixed: bool | None = None) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), fixed=(dtype != "float32") if fixed is None else fixed)


# -- dimensions of a pipeline ----------------------------------------------------------------------------
def model_dims(pipe: Any) -> dict[str, int]:
    """Values of the symbolic dimensions for a :class:`~profusion_rt.pipeline.ProFusionPipeline`
    (or anything with the same components). Stored in ``runtime.json`` so a runtime needs no weights."""
    te = pipe.text_encoder.config
    ie = pipe.image_encoder.config
    pn = pipe.promptnet.config
    c, h, w = pipe.latent_shape
    k = int(pn.region_kernel_size)
    ko = int(pn.region_output_kernel_size or k)
    n_side_h, n_side_w = (h // k) // ko, (w // k) // ko
    return {
        "L": int(te.max_position_embeddings),
        "D": int(te.hidden_size),
        "N": int(n_side_h * n_side_w),
        "T": int((ie.image_size // ie.patch_size) ** 2 + 1),
        "V": int(ie.hidden_size),
        "C": int(c),
        "h": int(h),
        "w": int(w),
        "H": int(pipe.resolution),
        "W": int(pipe.resolution),
        "S": 4,
    }


def _dims_of(pipe_or_dims: Any) -> dict[str, int]:
    if isinstance(pipe_or_dims, Mapping):
        return dict(pipe_or_dims)
    return model_dims(pipe_or_dims)


# -- the spec --------------------------------------------------------------------------------------------
_PACKAGE = Path(__file__).resolve().parent.parent


def _source_fingerprint(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode())
        h.update((_PACKAGE / rel).read_bytes())
    return h.hexdigest()


Sampler = Callable[[Any, Mapping[str, int], int, torch.Generator, torch.dtype], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class GraphSpec:
    """Declaration of one exported graph.

    ``build_module(pipe)`` returns the torch module whose ``forward`` takes the inputs in declaration
    order; ``sample_inputs(pipe, batch, seed)`` draws a fresh set of inputs; ``tolerance`` (atol, rtol)
    bounds ``|onnx - torch| <= atol + rtol * |torch|`` elementwise for float32 artifacts,
    ``tolerance_fp16`` for float16 / bfloat16 ones (against the float32 torch reference).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_axes: dict[str, dict[int, str]]
    tolerance: tuple[float, float]
    tolerance_fp16: tuple[float, float]
    builder: Callable[[Any], nn.Module] = field(repr=False, compare=False)
    sampler: Sampler = field(repr=False, compare=False)
    #: source files (relative to the profusion_rt package) whose code the graph runs; part of the hash
    sources: tuple[str, ...] = ()
    description: str = ""
    #: the largest batch a dynamic-batch export allows (diffusers refuses batches >= 64 inside the UNet,
    #: which the stage graphs call with 3B)
    max_batch: int = 16
    #: bumped by hand when the graph's meaning changes in a way the sources do not show
    version: int = 1

    # -- names and shapes ----------------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensors(self, precision: str = "fp32") -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs) with the dtypes of an artifact of ``precision``."""
        return (tuple(t.with_precision(precision) for t in self.inputs),
                tuple(t.with_precision(precision) for t in self.outputs))

    def resolve_shapes(self, pipe_or_dims: Any, batch: int) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output for ``batch`` (``pipe_or_dims``: a pipeline or the
        dims mapping of :func:`model_dims` / ``runtime.json``)."""
        dims = {**_dims_of(pipe_or_dims), "B": int(batch)}
        return {t.name: t.resolve(dims) for t in (*self.inputs, *self.outputs)}

    def batch_axes(self) -> dict[str, int]:
        """name -> index of the batch axis, for every tensor that has one."""
        return {name: axis for name, axes in self.dynamic_axes.items() for axis, sym in axes.items() if sym == "B"}

    def tolerance_for(self, precision: str) -> tuple[float, float]:
        return self.tolerance if precision == "fp32" else self.tolerance_fp16

    # -- torch side ----------------------------------------------------------------------------------
    def build_module(self, pipe: Any) -> nn.Module:
        return self.builder(pipe).eval()

    def sample_inputs(self, pipe: Any, batch: int = 1, seed: int = 0,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A fresh random set of inputs (realistic ranges) on the pipeline's device; model-dtype tensors in
        ``dtype`` (default: the pipeline's)."""
        dtype = dtype or pipe.dtype
        gen = torch.Generator().manual_seed(int(seed))
        feeds = self.sampler(pipe, _dims_of(pipe), int(batch), gen, dtype)
        ordered = {}
        for t in self.inputs:
            value = feeds[t.name]
            if t.fixed or not t.dtype.startswith("float"):
                value = value.to(torch_dtype(t.dtype))
            else:
                value = value.to(dtype)
            ordered[t.name] = value.contiguous().to(pipe.device)
        return ordered

    # -- identity ------------------------------------------------------------------------------------
    def declaration(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in sorted(self.dynamic_axes.items())},
        }

    def spec_hash(self) -> str:
        """sha256 of the declaration and of the source files the graph runs (not of the tolerance)."""
        h = hashlib.sha256(json.dumps(self.declaration(), sort_keys=True).encode())
        h.update(_source_fingerprint(self.sources).encode())
        return h.hexdigest()


def _spec(name, inputs, outputs, tolerance, tolerance_fp16, builder, sampler, sources, description, **kw):
    axes = {t.name: {0: "B"} for t in (*inputs, *outputs) if t.shape and t.shape[0] == "B"}
    common = ("artifacts/graphs.py",)
    return GraphSpec(name, tuple(inputs), tuple(outputs), axes, tolerance, tolerance_fp16, builder, sampler,
                     common + tuple(sources), description, **kw)


# -- samplers: realistic random inputs -----------------------------------------------------------------
def _randn(gen, *shape):
    return torch.randn(shape, generator=gen)


def _rand(gen, *shape):
    return torch.rand(shape, generator=gen)


def _timestep(gen):
    return torch.randint(1, 1000, (1,), generator=gen, dtype=torch.int64)


def _token_ids(pipe, dims, batch, gen):
    """BOS, a random prompt of 3..12 tokens, EOS, then padding: like the tokenizer's output."""
    L = dims["L"]
    vocab = int(pipe.text_encoder.config.vocab_size)
    bos, eos = int(pipe.text_encoder.config.bos_token_id), int(pipe.text_encoder.config.eos_token_id)
    ids = torch.zeros((batch, L), dtype=torch.int64)
    for b in range(batch):
        n = int(torch.randint(3, 13, (1,), generator=gen))
        ids[b, 0] = bos
        ids[b, 1:n + 1] = torch.randint(0, min(vocab, 49400), (n,), generator=gen)
        ids[b, n + 1] = eos
    return ids, torch.randint(1, 4, (batch,), generator=gen)


@torch.no_grad()
def _prompt(pipe, dims, batch, gen):
    """Token embeddings of random prompts and a one-hot placeholder mask on a prompt token."""

    ids, where = _token_ids(pipe, dims, batch, gen)
    embeds = token_embeddings(pipe.text_encoder, ids.to(pipe.device)).float().cpu()
    mask = torch.zeros((batch, dims["L"]))
    mask[torch.arange(batch), where] = 1.0
    return embeds, mask


def _context(dims, batch, gen):
    return _randn(gen, batch, dims["L"], dims["D"])


def _step_scalars(stage: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestep (1,), scalars (4,)) of a random step of a 50-step SD2 schedule with default settings."""

    tables = step_tables(sampling.DDIMSchedule.create(SD2_SCHEDULER, 50), 7.0, 5.0, 7.0, 1.0, 0.6)
    i = int(torch.randint(0, 50, (1,), generator=gen))
    scalars = tables.fusion[i] if stage == "fusion" else tables.refinement[i]
    return tables.timesteps[i:i + 1].clone(), scalars.clone()


def _sample_text(pipe, dims, batch, gen, dtype):
    return {"input_ids": _token_ids(pipe, dims, batch, gen)[0]}


def _sample_text_placeholder(pipe, dims, batch, gen, dtype):
    embeds, mask = _prompt(pipe, dims, batch, gen)
    return {
        "token_embeds": embeds,
        "placeholder_mask": mask,
        "s_star": _randn(gen, batch, dims["N"], dims["D"]),
        "embedding_scale": 0.3 + 0.7 * _rand(gen, 1),
    }


def _sample_pixels(pipe, dims, batch, gen, dtype):
    return {"pixels": _rand(gen, batch, 3, dims["H"], dims["W"])}


def _latent(dims, batch, gen):
    return _randn(gen, batch, dims["C"], dims["h"], dims["w"])


def _sample_vae_decoder(pipe, dims, batch, gen, dtype):
    return {"latents": _latent(dims, batch, gen)}


def _sample_promptnet(pipe, dims, batch, gen, dtype):
    return {
        "sample": _latent(dims, batch, gen),
        "timestep": _timestep(gen),
        "encoder_hidden_states": _randn(gen, batch, dims["T"], dims["V"]),
        "promptnet_cond": _latent(dims, batch, gen),
    }


def _sample_unet(pipe, dims, batch, gen, dtype):
    return {
        "sample": _latent(dims, batch, gen),
        "timestep": _timestep(gen),
        "encoder_hidden_states": _context(dims, batch, gen),
    }


def _sample_stage(stage):
    def sampler(pipe, dims, batch, gen, dtype):
        timestep, scalars = _step_scalars(stage, gen)
        embeds, mask = _prompt(pipe, dims, batch, gen)
        feeds = {
            "x": _latent(dims, batch, gen),
            "timestep": timestep,
            "scalars": scalars,
            "ref_latents": _latent(dims, batch, gen),
            "image_tokens": _randn(gen, batch, dims["T"], dims["V"]),
            "token_embeds": embeds,
            "placeholder_mask": mask,
            "empty_context": _context(dims, batch, gen),
        }
        if stage == "fusion":
            feeds["noise"] = _latent(dims, batch, gen)
        else:
            feeds["class_context"] = _context(dims, batch, gen)
        return feeds

    return sampler


# -- builders ------------------------------------------------------------------------------------------
def _build(kind: str) -> Callable[[Any], nn.Module]:
    def builder(pipe):
        if kind == "text_encoder":
            return graphs.TextEncoderGraph(pipe.text_encoder, pipe.text_skip_layers)
        if kind == "text_encoder_placeholder":
            return graphs.TextEncoderPlaceholderGraph(pipe.text_encoder, pipe.text_skip_layers)
        if kind == "image_encoder":
            return graphs.ImageEncoderGraph(pipe.image_encoder)
        if kind == "vae_encoder":
            return graphs.VaeEncoderGraph(pipe.vae)
        if kind == "vae_decoder":
            return graphs.VaeDecoderGraph(pipe.vae)
        if kind == "promptnet":
            return graphs.PromptNetGraph(pipe.promptnet)
        if kind == "unet":
            return graphs.UNetGraph(pipe.unet)
        # the stages compute the prediction type (ε or v) of the pipeline's scheduler config; that config is
        # part of the model hash naming the artifact folder, so ε and v graphs never share a folder
        if kind == "fusion_stage":
            return graphs.FusionStage.from_pipeline(pipe)
        if kind == "refinement_stage":
            return graphs.RefinementStage.from_pipeline(pipe)
        raise KeyError(kind)

    return builder


_TEXT = ("models/text.py",)
_STAGE_SOURCES = ("models/stages.py", "models/shared_prefix.py", "models/text.py", "models/promptnet.py", "sampling/__init__.py",
                  "sampling/ddim.py", "sampling/fusion.py", "sampling/guidance.py", "sampling/prediction.py")

_LATENT = ("B", "C", "h", "w")
_STAGE_COMMON = {
    "x": _t("x", *_LATENT),
    "timestep": _t("timestep", 1, dtype="int64"),
    "scalars": _t("scalars", "S", fixed=True),
    "ref_latents": _t("ref_latents", *_LATENT),
    "image_tokens": _t("image_tokens", "B", "T", "V"),
    "token_embeds": _t("token_embeds", "B", "L", "D"),
    "placeholder_mask": _t("placeholder_mask", "B", "L"),
    "empty_context": _t("empty_context", "B", "L", "D"),
    "noise": _t("noise", *_LATENT),
    "class_context": _t("class_context", "B", "L", "D"),
}

# Tolerances: float32 graphs match torch to about 1e-6 relative; the stage graphs amplify rounding by the
# guidance scales (7 and 5) and the 1/sqrt(a_t) of x0 prediction, the VAE by its depth. float16 graphs are
# compared with the float32 torch reference, so their bounds cover fp16 rounding of weights and activations.
GRAPHS: dict[str, GraphSpec] = {
    spec.name: spec
    for spec in (
        _spec("text_encoder", [_t("input_ids", "B", "L", dtype="int64")], [_t("context", "B", "L", "D")],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("text_encoder"), _sample_text, _TEXT,
              "prompt ids -> conditioning (penultimate layer + final layer norm)"),
        _spec("text_encoder_placeholder",
              [_t("token_embeds", "B", "L", "D"), _t("placeholder_mask", "B", "L"), _t("s_star", "B", "N", "D"),
               _t("embedding_scale", 1, fixed=True)],
              [_t("context", "B", "L", "D")],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("text_encoder_placeholder"), _sample_text_placeholder, _TEXT,
              "token embeddings with S* inserted -> conditioning with the S* row scaled"),
        _spec("image_encoder", [_t("pixels", "B", 3, "H", "W")], [_t("image_tokens", "B", "T", "V")],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("image_encoder"), _sample_pixels, ("models/vision.py",),
              "[0, 1] reference pixels -> CLIP preprocessing -> vision tokens (before the post-layernorm)"),
        _spec("vae_encoder", [_t("pixels", "B", 3, "H", "W")], [_t("mean", *_LATENT), _t("std", *_LATENT)],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("vae_encoder"), _sample_pixels, (),
              "[0, 1] pixels -> scaled posterior mean and std (z_ref = mean + std * eps)"),
        _spec("vae_decoder", [_t("latents", *_LATENT)], [_t("images", "B", 3, "H", "W")],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("vae_decoder"), _sample_vae_decoder, (),
              "scaled latents -> [0, 1] images"),
        _spec("promptnet",
              [_t("sample", *_LATENT), _t("timestep", 1, dtype="int64"), _t("encoder_hidden_states", "B", "T", "V"),
               _t("promptnet_cond", *_LATENT)],
              [_t("s_star", "B", "N", "D")],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("promptnet"), _sample_promptnet, ("models/promptnet.py",),
              "z_ref, t, image tokens, x_t -> S*"),
        _spec("unet",
              [_t("sample", *_LATENT), _t("timestep", 1, dtype="int64"), _t("encoder_hidden_states", "B", "L", "D")],
              [_t("eps", *_LATENT)],
              (1e-4, 1e-3), (2e-2, 2e-2), _build("unet"), _sample_unet, (),
              "x_t, t, context -> the model output (eps; v for a v-prediction model)", max_batch=32),
        _spec("fusion_stage", [_STAGE_COMMON[n] for n in FUSION_INPUTS], [_t(STAGE_OUTPUT, *_LATENT)],
              (1e-3, 1e-3), (5e-2, 5e-2), _build("fusion_stage"), _sample_stage("fusion"), _STAGE_SOURCES,
              "one fusion-stage iteration: PromptNet -> C[gamma S*] -> UNet on [empty, C] -> guidance -> re-noise"),
        _spec("refinement_stage", [_STAGE_COMMON[n] for n in REFINEMENT_INPUTS], [_t(STAGE_OUTPUT, *_LATENT)],
              (1e-3, 1e-3), (5e-2, 5e-2), _build("refinement_stage"), _sample_stage("refinement"),
              _STAGE_SOURCES,
              "refinement stage: PromptNet -> C[S*] -> UNet on [empty, C, class] -> guidance -> DDIM step"),
    )
}

GRAPH_NAMES: tuple[str, ...] = tuple(GRAPHS)


def get_graph(name: str) -> GraphSpec:
    try:
        return GRAPHS[name]
    except KeyError:
        raise InvalidParameterError(f"unknown graph {name!r}; known graphs: {', '.join(GRAPHS)}") from None
