"""TrtEngine and the runtime's loop against a fake ``tensorrt`` that enforces the library's contract, on CPU.

The fake (``fake_tensorrt.py``, injected into ``sys.modules`` per test; the product never imports it) reads
and writes raw addresses in the dtypes the *engine* declares, refuses addresses not aligned to 256 bytes,
unknown names and shapes outside the profile with False results, and refuses a refit while weights are
missing, like TensorRT 10.0, 10.x and 11. The stages are computed with the pipeline's torch stage modules,
so the loop's result is compared with the eager pipeline on the same seed. Real TensorRT was not executed.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fake_tensorrt import ALIGNMENT, FakePlan, FakeTensorRT, IOTensor, TensorIOMode
from profusion_rt.core.errors import ProFusionError
from profusion_rt.models.stages import FUSION_INPUTS, REFINEMENT_INPUTS, STAGE_OUTPUT
from profusion_rt.runtime.runtime import Runtime

STEPS = 3
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=STEPS, seed=5)
STAGES = {"fusion_stage": FUSION_INPUTS, "refinement_stage": REFINEMENT_INPUTS}


class HostStream:
    """The injectable stream of a CPU test: a non-zero handle, records its use."""

    handle = 0x5EED

    def __init__(self):
        self.begun = self.ended = 0

    def begin(self) -> int:
        self.begun += 1
        return self.handle

    def end(self) -> None:
        self.ended += 1


@pytest.fixture(params=["10.0.1", "10.8.0", "11.0.0"])
def fake_trt(request, monkeypatch):
    """A fake TensorRT of each API generation in ``sys.modules`` for the test."""
    fake = FakeTensorRT(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


@pytest.fixture
def fake_trt10(monkeypatch):
    fake = FakeTensorRT("10.8.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def stage_plan(pipe, graph: str, dtype: torch.dtype = torch.float32, batch=(1, 2), device_memory: int = 4096,
               **plan) -> FakePlan:
    """A fake plan of one stage graph: I/O names, dtypes (float tensors in ``dtype``, timestep int64, scalars
    float32) and profile as the exported graph's spec; computed by the torch stage module in float32."""
    from profusion_rt.artifacts.specs import get_graph
    from profusion_rt.core.dtypes import torch_dtype
    from profusion_rt.runtime.backends import stage_modules

    spec = get_graph(graph)
    module = stage_modules(pipe)[0 if graph == "fusion_stage" else 1]
    names = STAGES[graph]
    inputs, _ = spec.tensors("fp16" if dtype == torch.float16 else "fp32")
    lo, hi = (spec.resolve_shapes(pipe, b) for b in batch)
    tensors = [IOTensor(t.name, TensorIOMode.INPUT, torch_dtype(t.dtype), (lo[t.name], lo[t.name], hi[t.name]))
               for t in inputs]
    tensors.append(IOTensor(STAGE_OUTPUT, TensorIOMode.OUTPUT, dtype, output_shape=lambda shapes: shapes["x"]))

    @torch.no_grad()
    def compute(feeds, weights):
        args = [feeds[n].float() if feeds[n].is_floating_point() else feeds[n] for n in names]
        return {STAGE_OUTPUT: module(*args)}

    return FakePlan(tensors, compute, device_memory=device_memory, **plan)


def plan_file(tmp_path, fake, plan: FakePlan, name: str):
    path = tmp_path / f"{name}.plan"
    path.write_bytes(fake.register_plan(plan))
    return path


@pytest.fixture(scope="module")
def eager_latents(tiny_pipe, astronaut):
    return tiny_pipe(reference_image=astronaut, output_type="latent", **KW).images


def trt_runtime(pipe, fake, tmp_path, dtype=torch.float32, resources=None, memory=(4096, 8192), **engine_kw):
    from profusion_rt.runtime.trt_engine import TrtEngine, TrtResources

    resources = resources or TrtResources("cpu", stream=HostStream())
    engines = [TrtEngine(plan_file(tmp_path, fake, stage_plan(pipe, g, dtype, device_memory=m), g), device="cpu",
                         batch_range=(1, 2), resources=resources, **engine_kw)
               for g, m in zip(STAGES, memory)]
    return Runtime(pipe, *engines, backend="tensorrt")


def test_loop_through_tensorrt_matches_eager(tiny_pipe, astronaut, fake_trt, tmp_path, eager_latents):
    """Every address aligned and accepted, every call's result checked, on the dedicated stream; the loop
    equals the eager pipeline (TensorRT 10.0, 10.x and 11 device-memory APIs)."""
    runtime = trt_runtime(tiny_pipe, fake_trt, tmp_path)
    out = runtime(reference_image=astronaut, output_type="latent", **KW).images
    ref = eager_latents
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    contexts = [c for e in fake_trt.engines for c in e.contexts]
    assert sum(c.executions for c in contexts) == STEPS * 2  # one fusion + one refinement call per step
    assert all(s == HostStream.handle for c in contexts for s in c.streams)  # never the legacy default stream
    refused = [c for c in fake_trt.calls if c[0] == "set_tensor_address" and c[2] % ALIGNMENT]
    assert not refused


def test_fp16_plan_gets_fp16_buffers_under_an_fp32_pipeline(tiny_pipe, astronaut, fake_trt10, tmp_path,
                                                            eager_latents):
    """Finding 1: the buffers take each tensor's dtype from the engine; reading float32 bytes as float16
    (what TensorRT does with a float32 buffer) would give garbage."""
    runtime = trt_runtime(tiny_pipe, fake_trt10, tmp_path, dtype=torch.float16)
    out = runtime(reference_image=astronaut, output_type="latent", **KW).images
    ref = eager_latents
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 2e-2, rel  # float16 rounding of the latents between stage calls only
    buffers = next(iter(runtime._buffers.values())).tensors
    assert buffers["x_a"].dtype == buffers["noise"].dtype == buffers["token_embeds"].dtype == torch.float16
    assert buffers["timesteps"].dtype == torch.int64 and buffers["fusion_scalars"].dtype == torch.float32


def _engine(pipe, fake, tmp_path, graph="fusion_stage", dtype=torch.float32, **plan):
    from profusion_rt.runtime.trt_engine import TrtEngine, TrtResources

    return TrtEngine(plan_file(tmp_path, fake, stage_plan(pipe, graph, dtype, **plan), graph), device="cpu",
                     resources=TrtResources("cpu", stream=HostStream()))


def _feeds(pipe, graph="fusion_stage", dtype=torch.float32, batch=1):
    from profusion_rt.artifacts.specs import get_graph
    from profusion_rt.runtime.engine import aligned_empty

    spec = get_graph(graph)
    sample = spec.sample_inputs(pipe, batch=batch, seed=0)
    feeds = {}
    for name, value in sample.items():
        t = aligned_empty(value.shape, dtype if value.is_floating_point() and name != "scalars" else value.dtype, "cpu")
        feeds[name] = t.copy_(value)
    out = {STAGE_OUTPUT: aligned_empty(sample["x"].shape, dtype, "cpu")}
    return feeds, out


def test_engine_refuses_a_tensor_of_another_dtype(tiny_pipe, fake_trt10, tmp_path):
    engine = _engine(tiny_pipe, fake_trt10, tmp_path, dtype=torch.float16)
    assert engine.tensor_dtype("x") == torch.float16 and engine.tensor_dtype("timestep") == torch.int64
    feeds, out = _feeds(tiny_pipe, dtype=torch.float32)  # float32 buffers for a float16 engine
    with pytest.raises(ProFusionError, match="x"):
        engine.run(feeds, out)
    assert not any(c[0] == "execute_async_v3" for c in fake_trt10.calls)
    feeds, out = _feeds(tiny_pipe, dtype=torch.float16)
    engine.run(feeds, out)
    assert torch.isfinite(out[STAGE_OUTPUT]).all()


def test_engine_refuses_a_misaligned_address(tiny_pipe, fake_trt10, tmp_path):
    """Finding 3: a per-step view 8 bytes into a table (as ``timesteps[i]`` was) is refused with a typed error."""
    engine = _engine(tiny_pipe, fake_trt10, tmp_path)
    feeds, out = _feeds(tiny_pipe)
    table = torch.zeros((4, 1), dtype=torch.int64)
    table[1] = feeds["timestep"]
    feeds["timestep"] = table[1]  # address base + 8
    assert feeds["timestep"].data_ptr() % ALIGNMENT
    with pytest.raises(ProFusionError, match="timestep"):
        engine.run(feeds, out)
    assert not any(c[0] == "execute_async_v3" for c in fake_trt10.calls)


def test_engine_refuses_a_shape_outside_the_profile(tiny_pipe, fake_trt10, tmp_path):
    engine = _engine(tiny_pipe, fake_trt10, tmp_path, batch=(1, 1))
    feeds, out = _feeds(tiny_pipe, batch=2)
    with pytest.raises(ProFusionError, match="profile"):
        engine.run(feeds, out)


def test_output_buffer_of_another_shape_is_refused(tiny_pipe, fake_trt10, tmp_path):
    engine = _engine(tiny_pipe, fake_trt10, tmp_path)
    feeds, out = _feeds(tiny_pipe)
    out[STAGE_OUTPUT] = out[STAGE_OUTPUT][:, :2]  # would be overrun by the engine
    with pytest.raises(ProFusionError, match="x_out"):
        engine.run(feeds, out)


def test_failed_execution_is_a_typed_error(tiny_pipe, fake_trt10, tmp_path):
    engine = _engine(tiny_pipe, fake_trt10, tmp_path)
    engine.context.execute_async_v3 = lambda handle: False
    feeds, out = _feeds(tiny_pipe)
    with pytest.raises(ProFusionError, match="execution"):
        engine.run(feeds, out)


def test_activation_memory_is_shared_within_a_runtime_not_across(tiny_pipe, fake_trt10, tmp_path):
    """Finding 11: one allocation per runtime, large enough for both stages, every context pointed at it
    even after it grew; two runtimes never share it."""
    first = trt_runtime(tiny_pipe, fake_trt10, tmp_path, memory=(4096, 8192))
    second = trt_runtime(tiny_pipe, fake_trt10, tmp_path, memory=(4096, 8192))
    mem = []
    for runtime in (first, second):
        ctxs = [runtime.fusion_engine.context, runtime.refinement_engine.context]
        assert ctxs[0].memory == ctxs[1].memory  # the same allocation, the current one
        address, size = ctxs[0].memory
        assert size >= 8192 and address % ALIGNMENT == 0
        mem.append(address)
    assert mem[0] != mem[1]


# -- refit -----------------------------------------------------------------------------------------------------
def _initializers(onnx_path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    used = {n for node in model.graph.node for n in node.input}
    return {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer if i.name in used}


def _fused_groups(onnx_path) -> list[frozenset[str]]:
    """Weights the fake builder 'fused': all initializers consumed by nodes of one op type form a group, so
    changing one weight makes every other weight of that kind missing until supplied."""
    import onnx

    model = onnx.load(str(onnx_path))
    inits = {i.name for i in model.graph.initializer}
    groups: dict[str, set[str]] = {}
    for node in model.graph.node:
        groups.setdefault(node.op_type, set()).update(n for n in node.input if n in inits)
    return [frozenset(g) for g in groups.values() if g]


def _refit_runtime(base, fake, tmp_path, stage_artifacts, drop=None):
    from profusion_rt.artifacts.store import model_hash
    from profusion_rt.runtime.backends import select_artifact
    from profusion_rt.runtime.trt_engine import TrtEngine, TrtResources

    resources = TrtResources("cpu", stream=HostStream())
    engines, plans = [], []
    for graph in STAGES:
        onnx_path = select_artifact(stage_artifacts, model_hash(base), graph, "fp32").opt_onnx_path
        weights = _initializers(onnx_path)
        if drop:
            weights = {k: v for k, v in weights.items() if k not in drop}
        plan = stage_plan(base, graph, refittable=True, weights=weights, groups=_fused_groups(onnx_path))
        plans.append(plan)
        engines.append(TrtEngine(plan_file(tmp_path, fake, plan, graph), device="cpu", batch_range=(1, 4),
                                 onnx_path=onnx_path, resources=resources))
    return Runtime(base, *engines, backend="tensorrt"), plans


def test_refit_supplies_missing_weights_and_equals_the_customized_export(stage_artifacts, perturbed_delta,
                                                                         fake_trt10, tmp_path):
    """Finding 8: after a delta, the plan's weights equal those of the customized model exported afresh; the
    weights TensorRT reports missing (fused with a changed one) were supplied; a refit that still misses
    weights fails."""
    from profusion_rt.export.cache import export_artifacts
    from profusion_rt.artifacts.store import model_hash
    from profusion_rt.runtime.backends import select_artifact

    base, custom, delta = perturbed_delta(3)
    runtime, plans = _refit_runtime(base, fake_trt10, tmp_path, stage_artifacts)
    before = {k: v.copy() for k, v in plans[0].weights.items()}
    runtime.apply_delta(delta)
    export_artifacts(custom, tmp_path / "custom", graphs=["fusion_stage"], validate=False, batch=1,
                     dynamic_batch=(1, 4), exporter="legacy")
    expected = _initializers(select_artifact(tmp_path / "custom", model_hash(custom), "fusion_stage",
                                             "fp32").opt_onnx_path)
    after = plans[0].weights
    assert set(after) == set(expected)
    changed = [k for k in after if not np.array_equal(after[k], before[k])]
    assert changed, "the refit changed nothing"
    for name, value in expected.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    supplied = {c[1] for c in fake_trt10.calls if c[0] == "set_named_weights"}
    assert len(supplied) > len(changed)  # the fused partners were supplied too
    assert all(not r.pending and not r.get_missing_weights() for r in fake_trt10.refitters)


def test_refit_refusal_is_a_typed_error(stage_artifacts, perturbed_delta, fake_trt10, tmp_path):
    """``set_named_weights`` returns False for a name the plan cannot refit: that is an error, not a skip."""
    from profusion_rt.artifacts.store import model_hash
    from profusion_rt.runtime.backends import select_artifact
    from profusion_rt.runtime.ort_engine import weight_map
    from profusion_rt.models.delta import delta_parameters

    base, _, delta = perturbed_delta(4)
    onnx_path = select_artifact(stage_artifacts, model_hash(base), "fusion_stage", "fp32").opt_onnx_path
    located = weight_map(onnx_path, {k: p.detach() for k, p in delta_parameters(base).items()})
    victim = next(name for key, (name, *_) in located.items() if "to_k" in key)
    runtime, _ = _refit_runtime(base, fake_trt10, tmp_path, stage_artifacts, drop={victim})
    with pytest.raises(ProFusionError, match="refit"):
        runtime.apply_delta(delta)


# -- CUDA graphs around engines (no GPU: the graph objects are stand-ins) ----------------------------------
class _StubEngine:
    graph_capturable = True
    batch_range = None
    name = "stub"

    def __init__(self, in_place: bool):
        self.weights_in_place = in_place
        self.updates = 0

    def run(self, feeds, outputs):
        outputs[STAGE_OUTPUT].copy_(feeds["x"])

    def update_weights(self, named_tensors, base=None):
        self.updates += 1


@pytest.mark.parametrize("in_place", [False, True])
def test_weight_swap_drops_captured_graphs_unless_in_place(tiny_pipe, perturbed_delta, in_place, astronaut):
    """Finding 9: after a refit of an engine that holds its own weights, a captured CUDA graph would replay
    the old weights; it is dropped (re-captured on the next request). Torch engines keep theirs."""
    base, _, delta = perturbed_delta(5)
    runtime = Runtime(base, _StubEngine(in_place), _StubEngine(in_place), backend="stub")
    runtime(reference_image=astronaut, output_type="latent", **KW)
    buf = next(iter(runtime._buffers.values()))
    buf.graph = sentinel = object()
    runtime.apply_delta(delta)
    assert (buf.graph is sentinel) == in_place


def test_capture_uses_thread_local_error_mode(tiny_pipe, monkeypatch, astronaut):
    """Finding 10: the capture must not break (or be broken by) the server's customization thread."""
    seen = {}

    class FakeGraph:
        def replay(self):
            seen["replayed"] = True

    class FakeCapture:
        def __init__(self, graph, **kwargs):
            seen.update(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeStream:
        def wait_stream(self, other):
            pass

    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    runtime = Runtime(tiny_pipe, _StubEngine(True), _StubEngine(True), backend="stub")
    runtime.use_cuda_graph = True
    runtime(reference_image=astronaut, output_type="latent", **KW)
    assert seen.get("capture_error_mode") == "thread_local" and seen.get("replayed")
