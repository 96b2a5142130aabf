"""The lean ProFusion loop over engines, static buffers and (on CUDA) CUDA graphs.

``Runtime`` has the reference pipeline's call signature. Per request it:

1. ``prepare``: the pipeline computes the constants once (reference latent and image tokens, token
   embeddings and placeholder mask, ∅ and C~ contexts, x_T and all fusion noise, per-step tables);
2. copies them into static buffers allocated once per shape (batch, steps, fusion steps);
3. runs the loop: per step, ``fusion_steps`` calls of the fusion-stage engine and one call of the
   refinement-stage engine, ping-ponging between two latent buffers. Every per-step input is a view into a
   table already on the device, so the loop has no host synchronisation; the call list is built once per
   shape. Each buffer takes the dtype its engine declares (a float16 TensorRT plan gets float16 buffers
   under a float32 pipeline) and every buffer and per-step row starts on a 256-byte boundary (TensorRT's
   address alignment). On CUDA with capturable engines the whole loop is captured as one CUDA graph per
   shape (``capture_error_mode="thread_local"``: a customization thread may use the GPU meanwhile) and
   replayed for later requests; a weight swap in an engine that does not share the pipeline's modules
   (a TensorRT refit) drops the captured graphs;
4. decodes with the VAE.

Requests of the same shape and sampling parameters batch together (:meth:`Runtime.generate_batch`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.core.finite import check_finite
from profusion_rt.core.samples import synthetic_reference_image
from profusion_rt.models.delta import apply_delta, delta_parameters, load_delta
from profusion_rt.models.stages import STAGE_OUTPUT
from profusion_rt.pipeline import (
    OUTPUT_TYPES,
    EncodedPrompts,
    PreparedRequest,
    ProFusionOutput,
    ProFusionPipeline,
    ReferenceEncoding,
)
from profusion_rt.runtime.engine import (
    Engine,
    aligned_empty,
    aligned_rows,
    engine_tensor_dtype,
)

logger = logging.getLogger(__name__)

Call = tuple[Engine, dict[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class StaticBuffers:
    """Everything the loop reads or writes, allocated once per shape key."""

    key: tuple
    tensors: dict[str, torch.Tensor]
    calls: list[Call]
    final: torch.Tensor  # the buffer holding x after the last call
    graph: Any = None  # torch.cuda.CUDAGraph once captured


@dataclass
class Timings:
    prepare_s: float = 0.0
    loop_s: float = 0.0
    decode_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.loop_s + self.decode_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runtime:
    """ProFusion over two stage engines. Build with :func:`~.backends.create_runtime` (from a loaded pipeline)
    or :meth:`from_artifacts` (from an exported artifact folder alone, no weights).

    Thread safety: one runtime serialises its requests with a lock (the static buffers are shared);
    use one runtime per worker thread for parallelism, or batch requests with :meth:`generate_batch`.
    """

    def __init__(self, pipe: ProFusionPipeline, fusion_engine: Engine, refinement_engine: Engine,
                 backend: str, use_cuda_graph: bool | None = None):
        self.pipe = pipe
        self.fusion_engine = fusion_engine
        self.refinement_engine = refinement_engine
        self.backend = backend
        self.device = pipe.device
        self.dtype = pipe.dtype
        capturable = fusion_engine.graph_capturable and refinement_engine.graph_capturable
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda" and capturable
        if use_cuda_graph and (self.device.type != "cuda" or not capturable):
            raise InvalidParameterError("CUDA graphs need a CUDA device and capturable engines")
        self.use_cuda_graph = use_cuda_graph
        self._buffers: dict[tuple, StaticBuffers] = {}
        self._lock = threading.Lock()
        self.last_timings = Timings()

    #: ``create_runtime_from_artifacts``, set by :mod:`profusion_rt.runtime.artifact_pipeline` on import
    _artifact_factory: Callable[..., "Runtime"]

    @classmethod
    def from_artifacts(cls, root, backend: str = "onnxruntime", device: str | torch.device = "cpu",
                       precision: str = "fp32", model_hash: str | None = None, threads: int | None = None,
                       use_cuda_graph: bool | None = None) -> "Runtime":
        """A runtime from an artifact folder alone: every network runs from the exported graphs (no model
        weights, no model loading). See :func:`~.artifact_pipeline.create_runtime_from_artifacts`, which the
        package installs here when it is imported (it builds on this module, so this module cannot import it)."""
        return cls._artifact_factory(root, backend, device=device, precision=precision, model_hash=model_hash,
                                     threads=threads, use_cuda_graph=use_cuda_graph)

    # -- public API --------------------------------------------------------------------------------------
    def __call__(self, output_type: str = "pil", **kwargs) -> ProFusionOutput:
        """Same keyword arguments as :meth:`ProFusionPipeline.__call__` (``negative_prompt`` included), except
        ``callback_on_step_end``: a typed error, as the loop has no per-step hook; ``progress_callback`` instead
        (see :func:`pop_progress_callback`)."""
        return self.generate_batch([dict(kwargs, output_type=output_type)])[0]

    def generate_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[ProFusionOutput]:
        """Run several requests; those of the same shape and parameters share one batched loop."""

        with self._lock:
            start = time.perf_counter()
            prepared, output_types, progress = [], [], []
            for kw in requests:
                kw = dict(kw)
                output_type = kw.pop("output_type", "pil")
                if output_type not in OUTPUT_TYPES:
                    raise InvalidParameterError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
                progress.append(pop_progress_callback(kw))
                prepared.append(self.pipe.prepare(**kw))
                output_types.append(output_type)
            t_prep = time.perf_counter() - start
            groups: dict[tuple, list[int]] = {}
            for idx, req in enumerate(prepared):
                groups.setdefault(self._group_key(req), []).append(idx)
            results: list[ProFusionOutput | None] = [None] * len(prepared)
            t_loop = t_dec = 0.0
            for indices in self._chunks(groups.values(), prepared):
                merged = concat_requests([prepared[i] for i in indices])
                t0 = time.perf_counter()
                x = self.denoise(merged, [progress[i] for i in indices if progress[i] is not None])
                _sync(self.device)
                t1 = time.perf_counter()
                offset = 0
                for i in indices:
                    b = prepared[i].batch
                    xi = x[offset:offset + b].clone()
                    offset += b
                    results[i] = ProFusionOutput(images=self.decode(xi, output_types[i]), latents=xi,
                                                 seeds=prepared[i].seeds)
                t_loop += t1 - t0
                t_dec += time.perf_counter() - t1
            self.last_timings = Timings(t_prep, t_loop, t_dec)
            return results  # type: ignore[return-value]

    def apply_delta(self, delta) -> float:
        """Hot-swap a customization delta (a path or a loaded ``Delta``) without rebuilding engines.

        The pipeline's weights are updated in place (the torch engines share them, so compiled code and
        captured CUDA graphs stay valid); every other engine gets the new values through
        ``update_weights`` (TensorRT refit, onnxruntime session re-creation with overridden initializers).
        Returns the seconds the swap took."""
        with self._lock:
            start = time.perf_counter()
            if not hasattr(delta, "tensors"):
                delta = load_delta(delta)
            params = delta_parameters(self.pipe)
            base = {k: p.detach().clone() for k, p in params.items()} if self._needs_base_values() else None
            apply_delta(self.pipe, delta.to(self.device))
            new_values = {k: p.detach() for k, p in params.items()}
            engines = {id(e): e for e in (self.fusion_engine, self.refinement_engine)}.values()
            for engine in engines:
                engine.update_weights(new_values, base)
            if not all(getattr(e, "weights_in_place", False) for e in engines):
                self._drop_graphs()  # a captured graph may hold the engine's old weights (TensorRT refit)
            _sync(self.device)
            elapsed = time.perf_counter() - start
            logger.info("delta applied to the %s runtime in %.1f ms", self.backend, elapsed * 1000)
            return elapsed

    def _drop_graphs(self) -> None:
        for buf in self._buffers.values():
            if buf.graph is not None:
                logger.info("dropping the captured CUDA graph of shape %s (engine weights changed)", buf.key)
            buf.graph = None

    def _needs_base_values(self) -> bool:
        return any(getattr(e, "needs_base_values", False) for e in (self.fusion_engine, self.refinement_engine))

    def decode(self, latents: torch.Tensor, output_type: str):
        return self.pipe.decode(latents, output_type)

    def warmup(self, **kwargs) -> None:
        """Run one request so compilation, engine set-up and CUDA-graph capture happen before serving.
        Capture is per shape (batch, steps, fusion steps): warm up with the served ``num_inference_steps``
        so that no capture happens later, while a customization thread may be using the GPU."""
        kwargs.setdefault("reference_image", synthetic_reference_image())
        kwargs.setdefault("prompt", "a {S*}")
        self(output_type="latent", **kwargs)

    # -- the loop ------------------------------------------------------------------------------------------
    @property
    def batch_range(self) -> tuple[int, int] | None:
        ranges = [r for r in (self.fusion_engine.batch_range, self.refinement_engine.batch_range) if r]
        if not ranges:
            return None
        return max(r[0] for r in ranges), min(r[1] for r in ranges)

    def _chunks(self, groups, prepared: Sequence[PreparedRequest]) -> list[list[int]]:
        """Split each group of compatible requests into batches the engines accept."""
        limits = self.batch_range
        out: list[list[int]] = []
        for indices in groups:
            chunk, size = [], 0
            for i in indices:
                b = prepared[i].batch
                if limits is not None and not limits[0] <= b <= limits[1]:
                    raise InvalidParameterError(
                        f"the {self.backend} engines accept batches of {limits[0]} to {limits[1]} images, "
                        f"a request asked for {b}; export with a wider --dynamic-batch range")
                if chunk and limits is not None and size + b > limits[1]:
                    out.append(chunk)
                    chunk, size = [], 0
                chunk.append(i)
                size += b
            out.append(chunk)
        return out

    @staticmethod
    def _group_key(req: PreparedRequest) -> tuple:
        return (req.params, req.fusion_steps, req.reference is not None)

    def _shape_key(self, req: PreparedRequest) -> tuple:
        return (req.batch, len(req.tables.timesteps), req.fusion_steps)

    def _dtype(self, name: str, default: torch.dtype, engines=None) -> torch.dtype:
        """The dtype of the buffer fed as ``name``: what the engines declare for it (they must agree),
        else ``default``."""
        declared = {d for e in (engines or (self.fusion_engine, self.refinement_engine))
                    if (d := engine_tensor_dtype(e, name)) is not None}
        if len(declared) > 1:
            raise InvalidParameterError(f"the stage engines disagree on the dtype of {name}: {sorted(map(str, declared))}")
        return declared.pop() if declared else default

    def _allocate(self, req: PreparedRequest) -> StaticBuffers:
        b, steps, fusion = self._shape_key(req)
        dev, dt = self.device, self.dtype
        emb = req.prompts.embeds
        latent = tuple(req.latents.shape)
        x_dt = self._dtype("x", dt)
        if self._dtype(STAGE_OUTPUT, x_dt) != x_dt:
            raise InvalidParameterError("the stage engines read x and write x_out in different dtypes")

        def buf(name, shape, default=dt):
            return aligned_empty(shape, self._dtype(name, default), dev)

        t = {
            "x_a": aligned_empty(latent, x_dt, dev),
            "x_b": aligned_empty(latent, x_dt, dev),
            "ref_latents": buf("ref_latents", latent),
            "image_tokens": buf("image_tokens", self.pipe.image_tokens_shape(b)),
            "token_embeds": buf("token_embeds", emb.shape, emb.dtype),
            "placeholder_mask": buf("placeholder_mask", req.prompts.placeholder_mask.shape,
                                    req.prompts.placeholder_mask.dtype),
            "empty_context": buf("empty_context", emb.shape, emb.dtype),
            "class_context": buf("class_context", emb.shape, emb.dtype),
            # per-step tables: one 256-byte-aligned row per step (and per fusion step for the noise)
            "noise": aligned_rows(steps * max(fusion, 1), latent, self._dtype("noise", dt), dev).view(
                steps, max(fusion, 1), *latent),
            "timesteps": aligned_rows(steps, (1,), self._dtype("timestep", torch.int64), dev),
            "fusion_scalars": aligned_rows(steps, (4,), self._dtype("scalars", torch.float32, [self.fusion_engine]),
                                           dev),
            "refinement_scalars": aligned_rows(steps, (4,), self._dtype("scalars", torch.float32,
                                                                        [self.refinement_engine]), dev),
        }
        const = {k: t[k] for k in ("ref_latents", "image_tokens", "token_embeds", "placeholder_mask", "empty_context")}
        calls: list[Call] = []
        cur, nxt = t["x_a"], t["x_b"]
        for i in range(steps):
            for r in range(fusion):
                feeds = dict(const, x=cur, timestep=t["timesteps"][i], scalars=t["fusion_scalars"][i],
                             noise=t["noise"][i, r])
                calls.append((self.fusion_engine, feeds, {STAGE_OUTPUT: nxt}))
                cur, nxt = nxt, cur
            feeds = dict(const, x=cur, timestep=t["timesteps"][i], scalars=t["refinement_scalars"][i],
                         class_context=t["class_context"])
            calls.append((self.refinement_engine, feeds, {STAGE_OUTPUT: nxt}))
            cur, nxt = nxt, cur
        return StaticBuffers(key=self._shape_key(req), tensors=t, calls=calls, final=cur)

    def _load(self, buf: StaticBuffers, req: PreparedRequest) -> None:
        """Copy one request's constants into the static buffers (no reallocation)."""
        t = buf.tensors
        enc: EncodedPrompts = req.prompts
        t["x_a"].copy_(req.latents)
        if req.reference is not None:
            t["ref_latents"].copy_(req.reference.latents)
            t["image_tokens"].copy_(req.reference.image_tokens)
        else:
            # Plain SD2 request: the placeholder mask is all zeros, so S* (and PromptNet's inputs) are unused.
            t["ref_latents"].zero_()
            t["image_tokens"].zero_()
        t["token_embeds"].copy_(enc.embeds)
        t["placeholder_mask"].copy_(enc.placeholder_mask)
        t["empty_context"].copy_(enc.empty)
        # Without C~ (reference_guidance_scale 0, or no reference) its term is s2 * (e_u - e_u) = 0.
        t["class_context"].copy_(enc.class_context if req.use_class else enc.empty)
        if req.fusion_steps:
            t["noise"].copy_(req.noise)
        t["timesteps"].copy_(req.tables.timesteps.view(-1, 1))
        t["fusion_scalars"].copy_(req.tables.fusion)
        refinement = req.tables.refinement.clone()
        if not req.use_class:
            refinement[:, 3] = 0.0
        t["refinement_scalars"].copy_(refinement)

    def _run_calls(self, buf: StaticBuffers, progress: Sequence[Any] = ()) -> None:
        per_step, steps = buf.key[2] + 1, buf.key[1]  # fusion calls + one refinement call per step
        for k, (engine, feeds, outputs) in enumerate(buf.calls):
            engine.run(feeds, outputs)
            if progress and (k + 1) % per_step == 0:  # a Python call, no device synchronisation
                for callback in progress:
                    callback((k + 1) // per_step, steps)

    def _capture(self, buf: StaticBuffers) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init, autotuning)
            self._run_calls(buf)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's unsafe CUDA calls break the capture (the server customizes
        # subjects on another thread, on the same GPU)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._run_calls(buf)
        buf.graph = graph
        logger.info("captured a CUDA graph of %d stage calls for shape %s", len(buf.calls), buf.key)

    @torch.no_grad()
    def denoise(self, req: PreparedRequest, progress: Sequence[Any] = ()) -> torch.Tensor:
        """The loop over the static buffers. ``progress``: the requests' progress callbacks (see
        :func:`pop_progress_callback`): per step on the plain loop, once after a CUDA-graph replay."""
        key = self._shape_key(req)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self._allocate(req)
        self._load(buf, req)
        if self.use_cuda_graph:
            if buf.graph is None:
                self._capture(buf)
                self._load(buf, req)  # capture ran the loop: restore x_T
            buf.graph.replay()
            if progress:  # one replay is the whole loop: report it once it has finished
                _sync(self.device)
                for callback in progress:
                    callback(key[1], key[1])
        else:
            self._run_calls(buf, progress)
        # once after the loop (no synchronisation inside it): a NaN/Inf latent is an error, not an image
        return check_finite(buf.final.to(self.dtype, copy=True), "latents after the loop", self.dtype, f" ({self.backend} backend)")


def pop_progress_callback(kw: dict[str, Any]):
    """Take a request's ``progress_callback(done_steps, total_steps)`` out of its keyword arguments; refuse
    diffusers' ``callback_on_step_end``, which a captured loop cannot call.

    The runtime calls ``progress_callback`` on the host after the stage calls of each step were issued: on
    CPU engines, after the step ran; on CUDA without CUDA graphs, after its kernels were queued (the loop
    never waits for the device); with a CUDA graph the loop is one replay, so it is called once, with
    (total, total), after the replay finished."""
    for name in ("callback_on_step_end", "callback_on_step_end_tensor_inputs"):
        if kw.get(name) is not None:
            raise InvalidParameterError(
                f"the runtime does not take {name}: its loop is captured (static buffers, CUDA graphs) and has no "
                "per-step hook; pass progress_callback=fn(done_steps, total_steps) for progress, or use the eager "
                "ProFusionPipeline for step callbacks")
        kw.pop(name, None)
    callback = kw.pop("progress_callback", None)
    if callback is not None and not callable(callback):
        raise InvalidParameterError("progress_callback must be callable (done_steps, total_steps)")
    return callback


def concat_requests(reqs: Sequence[PreparedRequest]) -> PreparedRequest:
    """One batched request from several with identical parameters (the tables are shared)."""
    if len(reqs) == 1:
        return reqs[0]
    first = reqs[0]

    def cat(name_fn):
        return torch.cat([name_fn(r) for r in reqs], 0)

    ref = None
    if first.reference is not None:
        ref = ReferenceEncoding(cat(lambda r: r.reference.latents), cat(lambda r: r.reference.image_tokens))
    enc = EncodedPrompts(
        embeds=cat(lambda r: r.prompts.embeds),
        placeholder_mask=cat(lambda r: r.prompts.placeholder_mask),
        empty=cat(lambda r: r.prompts.empty),
        class_context=cat(lambda r: r.prompts.class_context) if first.prompts.class_context is not None else None,
    )
    plain = cat(lambda r: r.plain_context) if first.plain_context is not None else None
    return PreparedRequest(
        params=first.params, seeds=[s for r in reqs for s in r.seeds], fusion_steps=first.fusion_steps,
        use_class=first.use_class, reference=ref, prompts=enc, plain_context=plain,
        latents=cat(lambda r: r.latents), noise=torch.cat([r.noise for r in reqs], 2), tables=first.tables,
    )
