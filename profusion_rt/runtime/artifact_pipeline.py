"""A :class:`~.runtime.Runtime` built from an artifact folder alone: no model weights, no model loading.

``profusion-rt export`` writes, per model hash, ``runtime.json`` (dims, resolution, scheduler config, ...),
the ``tokenizer/`` copy, the text encoder's token embedding table (``token_embedding.safetensors``) and one
folder per graph. From these, :func:`create_runtime_from_artifacts` builds:

* an :class:`ArtifactPipeline`: the reference pipeline's request preparation and decoding
  (:class:`~profusion_rt.pipeline.RequestPreparation`: prompt rules, reference preprocessing and posterior
  draw, noise, DDIM tables) with its networks behind :class:`GraphEncoders`, i.e. the exported
  ``text_encoder``, ``text_encoder_placeholder``, ``image_encoder``, ``vae_encoder`` and ``vae_decoder``
  graphs on onnxruntime (CPU, or the CUDA provider on a CUDA device) and a table lookup for the token
  embeddings;
* the two stage engines of the loop (``fusion_stage`` and ``refinement_stage``) on onnxruntime (the
  attention-fused ``model.ort.onnx`` when there is one) or TensorRT plans.

The result has the pipeline's call signature and, on the same seeds, the reference's results up to the
engines' rounding. Customization deltas need the weights: :meth:`ArtifactRuntime.apply_delta` raises.

Nothing here imports ``export/``, onnx or polygraphy (a serving install needs neither).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from profusion_rt.artifacts.specs import get_graph, precision_dtype
from profusion_rt.artifacts.store import (
    RUNTIME_JSON,
    ArtifactStore,
    RuntimeMetadata,
    load_runtime_metadata,
    verify_files,
)
from profusion_rt.core.dtypes import torch_dtype
from profusion_rt.core.errors import InvalidParameterError, ModelLoadError
from profusion_rt.models.vision import posterior_latents
from profusion_rt.pipeline import RequestPreparation
from profusion_rt.runtime.backends import (
    STAGE_GRAPHS,
    check_onnxruntime_precision,
    onnxruntime_engine,
    pick_artifact,
    tensorrt_engine,
)
from profusion_rt.runtime.engine import Engine
from profusion_rt.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

__all__ = ["ArtifactPipeline", "ArtifactRuntime", "GraphEncoders", "GraphRunner", "REQUIRED_GRAPHS",
           "create_runtime_from_artifacts"]

#: the graphs of request preparation and decoding (always on onnxruntime)
ENCODER_GRAPHS = ("text_encoder", "text_encoder_placeholder", "image_encoder", "vae_encoder", "vae_decoder")
#: every graph an artifact-only runtime loads
REQUIRED_GRAPHS = ENCODER_GRAPHS + STAGE_GRAPHS

#: backend name -> engine of one stage artifact (the encoders always run on onnxruntime)
STAGE_ENGINES = {
    "onnxruntime": onnxruntime_engine,
    "tensorrt": tensorrt_engine,
}


def export_command(root: Path, precision: str, preset: str | None = None, backend: str = "onnxruntime") -> str:
    """The ``profusion-rt export`` command that writes what an artifact-only runtime needs."""
    model = preset or "MODEL"
    extra = " --backend tensorrt" if backend == "tensorrt" else ""
    return (f"profusion-rt export --model {model} --out {root} --graphs {','.join(REQUIRED_GRAPHS)} "
            f"--precision {precision}{extra}")


# -- graphs behind whole-tensor calls ------------------------------------------------------------------------
class GraphRunner:
    """One exported graph on an engine, called with whole tensors: inputs are moved to the device and cast
    to the artifact's dtypes, outputs are allocated per call from the graph's spec, and a batch outside the
    engine's range runs in chunks (the last one padded up to the engine's smallest batch)."""

    def __init__(self, engine: Engine, graph: str, dtypes: Mapping[str, str], dims: Mapping[str, int],
                 device: torch.device):
        self.engine = engine
        self.spec = get_graph(graph)
        self.dtypes = {name: torch_dtype(d) for name, d in dtypes.items()}
        self.dims = dict(dims)
        self.device = device
        self.batched = set(self.spec.batch_axes())

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {n: inputs[n].to(self.device, self.dtypes[n]).contiguous() for n in self.spec.input_names}
        batch = next(int(feeds[n].shape[0]) for n in self.spec.input_names if n in self.batched)
        lo, hi = self.engine.batch_range or (batch, batch)
        parts = []
        for start in range(0, batch, hi):
            n = min(hi, batch - start)
            chunk = {k: self._rows(v, start, n, lo) if k in self.batched else v for k, v in feeds.items()}
            parts.append({k: v[:n] for k, v in self._run(chunk, max(n, lo)).items()})
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in self.spec.output_names}

    @staticmethod
    def _rows(t: torch.Tensor, start: int, n: int, lo: int) -> torch.Tensor:
        rows = t[start:start + n]
        if n < lo:  # a static or narrower engine: repeat the last row, dropped from the outputs
            rows = torch.cat([rows, rows[-1:].expand(lo - n, *rows.shape[1:])])
        return rows.contiguous()

    def _run(self, feeds: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        shapes = self.spec.resolve_shapes(self.dims, batch)
        outputs = {n: torch.empty(shapes[n], device=self.device, dtype=self.dtypes[n])
                   for n in self.spec.output_names}
        self.engine.run(feeds, outputs)
        return outputs


class GraphEncoders:
    """:class:`~profusion_rt.pipeline.Encoders` over exported graphs and the token embedding table."""

    def __init__(self, graphs: Mapping[str, GraphRunner], token_embedding: torch.Tensor,
                 position_embedding: torch.Tensor, dims: Mapping[str, int], dtype: torch.dtype):
        self.graphs = dict(graphs)
        self.token_embedding = token_embedding
        self.position_embedding = position_embedding
        self.dims = dict(dims)
        self.dtype = dtype

    def token_embeddings(self, input_ids):
        # as CLIPTextEmbeddings: token_embedding(ids) + position_embedding(positions), in float32
        embeds = torch.nn.functional.embedding(input_ids, self.token_embedding)
        return (embeds + self.position_embedding[: input_ids.shape[1]]).to(self.dtype)

    def encode_ids(self, input_ids):
        return self.graphs["text_encoder"](input_ids=input_ids)["context"]

    def encode_embeddings(self, embeds):
        # C[S*] with no placeholder row (mask 0, scale 1) is the plain conditioning of the embeddings
        b = embeds.shape[0]
        return self.graphs["text_encoder_placeholder"](
            token_embeds=embeds,
            placeholder_mask=embeds.new_zeros((b, embeds.shape[1])),
            s_star=embeds.new_zeros((b, self.dims["N"], embeds.shape[2])),
            embedding_scale=torch.ones(1),
        )["context"]

    def reference_latents(self, pixels, mode, generator):
        out = self.graphs["vae_encoder"](pixels=pixels)
        # mean and std are already multiplied by the VAE scaling factor
        return posterior_latents(out["mean"], out["std"], mode, generator)

    def image_tokens(self, pixels):
        return self.graphs["image_encoder"](pixels=pixels)["image_tokens"]

    def decode_latents(self, latents):
        return self.graphs["vae_decoder"](latents=latents)["images"]


# -- the pipeline and the runtime ------------------------------------------------------------------------------
class ArtifactPipeline(RequestPreparation):
    """The reference pipeline's request preparation and decoding over exported graphs: what a
    :class:`~.runtime.Runtime` needs from its ``pipe`` (``prepare``, ``decode``, ``encode_reference``,
    ``device``, ``dtype``), without weights. It has no sampling loop of its own (that is the runtime's)."""

    def __init__(self, meta: RuntimeMetadata, tokenizer, encoders: GraphEncoders, device: torch.device,
                 dtype: torch.dtype):
        self.meta = meta
        self.model_hash = meta.model_hash
        self.preset = meta.preset
        self.tokenizer = tokenizer
        self.encoders = encoders
        self.scheduler_config = dict(meta.scheduler)
        self.resolution = meta.resolution
        self.latent_shape = tuple(meta.latent_shape)
        self.text_skip_layers = meta.text_skip_layers
        self.dims = dict(meta.dims)
        self.device = device
        self.dtype = dtype

    def image_tokens_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.dims["T"], self.dims["V"])


class ArtifactRuntime(Runtime):
    """A :class:`~.runtime.Runtime` whose ``pipe`` is an :class:`ArtifactPipeline` (see
    :func:`create_runtime_from_artifacts`)."""

    pipe: ArtifactPipeline

    def apply_delta(self, delta) -> float:
        raise InvalidParameterError(
            "a customization delta changes model weights, which a runtime built from artifacts alone does not "
            "have: build the runtime from the model (create_runtime(pipe, ...) or `generate --model`), or export "
            "the customized model folder (`profusion-rt export --model OUT/model ...`) and serve its artifacts")


def _model_root(root: str | Path, model_hash: str | None) -> tuple[Path, str]:
    """(artifact root, model hash): the only exported model of ``root``, or ``model_hash``; ``root`` may
    also be a model folder ``<root>/<hash>`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"artifact folder {root} does not exist")
    if (root / RUNTIME_JSON).is_file() and model_hash in (None, root.name):
        return root.parent, root.name
    models = ArtifactStore(root).models()
    if model_hash is None:
        if len(models) == 1:
            return root, models[0]
        if not models:
            raise ModelLoadError(f"{root} holds no exported model (no <hash>/{RUNTIME_JSON}); "
                                 f"run `profusion-rt export --model MODEL --out {root}`")
        raise ModelLoadError(f"{root} holds {len(models)} exported models ({', '.join(models)}); "
                             "choose one with model_hash= (--model-hash)")
    if model_hash not in models:
        raise ModelLoadError(f"no exported model {model_hash} in {root}; it holds: {', '.join(models) or 'none'}")
    return root, model_hash


def load_token_embedding(meta: RuntimeMetadata, root: Path, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_embedding (vocab, D), position_embedding (L, D)) float32 from the model folder, after checking
    the file against the sha256 and size recorded in ``runtime.json``."""
    from safetensors.torch import load_file

    record = meta.extra.get("token_embedding")
    redo = f"re-run `{export_command(root, precision, meta.preset)}` to write it"
    if not isinstance(record, dict) or "file" not in record:
        raise ModelLoadError(f"{meta.path} has no token embedding table (exported before the artifact-only "
                             f"runtime existed); {redo}")
    status = verify_files(meta.path, {record["file"]: record}, verify="hash")[record["file"]]
    if status != "ok":
        raise ModelLoadError(f"the token embedding table {meta.path / record['file']} is {status}; {redo}")
    tables = load_file(str(meta.path / record["file"]))
    tokens, positions = tables.get("token_embedding"), tables.get("position_embedding")
    d, length = meta.dims["D"], meta.dims["L"]
    if (tokens is None or positions is None or tokens.ndim != 2 or tokens.shape[1] != d
            or tuple(positions.shape) != (length, d)):
        raise ModelLoadError(f"the token embedding table {meta.path / record['file']} does not match the "
                             f"model's dims (D={d}, L={length}); {redo}")
    return tokens.float(), positions.float()


def create_runtime_from_artifacts(root: str | Path, backend: str = "onnxruntime", device: str | torch.device = "cpu",
                                  precision: str = "fp32", model_hash: str | None = None, threads: int | None = None,
                                  use_cuda_graph: bool | None = None) -> ArtifactRuntime:
    """A runtime from an artifact folder alone (see the module docstring).

    ``root``: an artifact root (``profusion-rt export --out``) holding one exported model, or any number
    with ``model_hash`` naming one, or a model folder ``<root>/<hash>``. ``backend``: what runs the two
    stages, ``"onnxruntime"`` or ``"tensorrt"`` (plans built with ``export --backend tensorrt``, CUDA only);
    the encoders and the decoder always run on onnxruntime, with the CUDA provider when ``device`` is CUDA.
    ``precision``: of the artifacts to load ("fp32", "fp16", "bf16"); the runtime's tensors take its dtype.
    ``threads``: onnxruntime intra-op threads per session (default: all cores).

    Raises :class:`~profusion_rt.core.errors.ModelLoadError` when the model folder is missing or ambiguous, or a
    graph or the token table is missing or damaged (the message gives the export command that writes it),
    :class:`~profusion_rt.core.errors.InvalidParameterError` for an unknown backend or precision, and
    :class:`~profusion_rt.core.errors.BackendUnavailableError` when onnxruntime, its CUDA provider or TensorRT is
    not available.
    """
    if backend not in STAGE_ENGINES:
        raise InvalidParameterError(
            f"a runtime from artifacts alone runs its stages on {' or '.join(STAGE_ENGINES)}, got {backend!r}; "
            "the torch backends need the model weights (create_runtime(pipe, backend))")
    if backend == "onnxruntime":

        check_onnxruntime_precision(precision)  # bf16: a refusal naming what runs it
    dtype = torch_dtype(precision_dtype(precision))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend == "tensorrt" and device.type != "cuda":
        raise InvalidParameterError("the tensorrt backend needs a CUDA device (device='cuda')")
    store_root, digest = _model_root(root, model_hash)
    meta = load_runtime_metadata(store_root, digest)
    tokens, positions = load_token_embedding(meta, store_root, precision)
    tokenizer = meta.load_tokenizer()

    entries = ArtifactStore(store_root).entries(digest, verify="hash")
    chosen = {graph: pick_artifact(entries, graph, precision) for graph in REQUIRED_GRAPHS}
    missing = [graph for graph, entry in chosen.items() if entry is None]
    if missing:
        raise ModelLoadError(
            f"model {digest} in {store_root} has no intact {precision} {', '.join(missing)} graph"
            f"{'s' if len(missing) > 1 else ''} (a runtime from artifacts alone needs {len(REQUIRED_GRAPHS)}); "
            f"run `{export_command(store_root, precision, meta.preset, backend)}`")

    runners = {graph: GraphRunner(onnxruntime_engine(chosen[graph], device, threads), graph, chosen[graph].dtypes,
                                  meta.dims, device)
               for graph in ENCODER_GRAPHS}
    encoders = GraphEncoders(runners, tokens.to(device), positions.to(device), meta.dims, dtype)
    pipe = ArtifactPipeline(meta, tokenizer, encoders, device, dtype)
    make_stage = STAGE_ENGINES[backend]
    fusion, refinement = (make_stage(chosen[graph], device, threads=threads) for graph in STAGE_GRAPHS)
    logger.info("artifact-only %s runtime for model %s from %s (%s, %s)", backend, digest, store_root,
                precision, device)
    return ArtifactRuntime(pipe, fusion, refinement, backend=backend, use_cuda_graph=use_cuda_graph)


Runtime._artifact_factory = staticmethod(create_runtime_from_artifacts)  # Runtime.from_artifacts
