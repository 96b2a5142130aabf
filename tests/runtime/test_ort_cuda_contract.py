"""onnxruntime contract on CPU: the CUDA provider's options (device index, torch's stream), the session's
stream discipline (a fake onnxruntime module records the order of synchronisation and runs), and the fp16
weight map (a real float16 ONNX graph exported by the project's export code). No CUDA was executed."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from profusion_rt.core.errors import ProFusionError

pytest.importorskip("onnx")


class _Stream:
    def __init__(self, handle: int, log: list):
        self.cuda_stream = handle
        self.log = log

    def synchronize(self):
        self.log.append(("synchronize", self.cuda_stream))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with a current stream whose handle a test sets (``state["handle"]``) and device 1 current."""
    state = {"handle": 0xBEEF, "log": [], "devices": []}

    def current_stream(device=None):
        state["devices"].append(device)
        return _Stream(state["handle"], state["log"])

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return state


def _cuda_options(providers):
    first = providers[0]
    assert isinstance(first, tuple) and first[0] == "CUDAExecutionProvider", first
    return first[1]


def test_cuda_provider_gets_the_device_index_and_torchs_stream(fake_cuda):
    """Findings 6 and 14."""
    from profusion_rt.runtime.ort_engine import providers_for

    options = _cuda_options(providers_for(torch.device("cuda", 2)))
    assert options["device_id"] == "2"
    assert options["user_compute_stream"] == str(0xBEEF)
    assert fake_cuda["devices"][-1] == torch.device("cuda", 2)  # the stream of that device
    assert _cuda_options(providers_for(torch.device("cuda")))["device_id"] == "1"  # the current device
    assert providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]


def _fake_ort(log: list):
    """The subset of onnxruntime OrtEngine uses, recording sessions' providers and runs."""

    class SessionOptions:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, k, v):
            self.entries[k] = v

        def add_initializer(self, name, value):
            pass

    class Arg:
        def __init__(self, name, type_):
            self.name, self.type = name, type_

    class Binding:
        def __init__(self):
            self.bound = []

        def bind_input(self, *args):
            self.bound.append(("in", *args))

        def bind_output(self, *args):
            self.bound.append(("out", *args))

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None):
            self.providers = providers
            log.append(("session", providers))

        def get_providers(self):
            return [p if isinstance(p, str) else p[0] for p in self.providers]

        def get_inputs(self):
            return [Arg("x", "tensor(float16)")]

        def get_outputs(self):
            return [Arg("y", "tensor(float16)")]

        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            log.append(("run", len(binding.bound)))

    return types.SimpleNamespace(SessionOptions=SessionOptions, InferenceSession=InferenceSession,
                                 GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99, ORT_ENABLE_EXTENDED=2))


def test_session_runs_on_torchs_stream_and_waits_for_another(fake_cuda, monkeypatch, tmp_path):
    """Finding 6: the session is created on torch's current stream; a run from another torch stream first
    waits for it (inputs copied there must be complete before onnxruntime reads them)."""
    from profusion_rt.runtime import ort_engine

    log = fake_cuda["log"]
    monkeypatch.setattr(ort_engine, "import_onnxruntime", lambda: _fake_ort(log))
    engine = ort_engine.OrtEngine(tmp_path / "g.onnx", device="cuda:0")
    options = _cuda_options(log[0][1])
    assert options["user_compute_stream"] == str(0xBEEF) and options["device_id"] == "0"
    assert engine.tensor_dtype("x") == torch.float16  # the runtime's buffers take the graph's dtypes
    x, y = torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16)
    log.clear()
    engine.run({"x": x}, {"y": y})
    assert [e[0] for e in log] == ["run"]  # same stream: ordered by the stream, no host wait
    fake_cuda["handle"] = 0xCAFE  # torch now queues on another stream
    log.clear()
    engine.run({"x": x}, {"y": y})
    assert [e[0] for e in log] == ["synchronize", "run"] and log[0][1] == 0xCAFE


# -- finding 7: the weight map of a float16 graph ----------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_fusion_graph(tiny_pipe, tmp_path_factory):
    """The tiny pipeline's fusion stage exported at fp16 (float16 weights, float32 norms), once."""
    from profusion_rt.export.cache import export_artifacts
    from profusion_rt.artifacts.store import model_hash
    from profusion_rt.runtime.backends import select_artifact

    root = tmp_path_factory.mktemp("fp16-stage")
    export_artifacts(tiny_pipe, root, graphs=["fusion_stage"], precision="fp16", validate=False, batch=1,
                     exporter="legacy")
    return select_artifact(root, model_hash(tiny_pipe), "fusion_stage", "fp16")


def test_fp16_weight_map_finds_every_delta_weight(tiny_pipe, fp16_fusion_graph):
    """Finding 7: float32 base values are rounded to the initializer's dtype before the content match, so q,
    k and v of every attention layer (and all of PromptNet) are located in the float16 graph."""
    from profusion_rt.runtime.ort_engine import weight_map
    from profusion_rt.models.delta import delta_parameters

    base = {k: p.detach() for k, p in delta_parameters(tiny_pipe).items()}
    for path in {fp16_fusion_graph.opt_onnx_path, fp16_fusion_graph.onnx_path}:
        located = weight_map(path, base)
        assert set(located) == set(base)
        qkv = [k for k in base if k.startswith("unet.") and k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v")]
        assert qkv and all(k in located for k in qkv)
        layers = {k.rsplit(".", 2)[0] for k in qkv}
        for layer in layers:
            assert {f"{layer}.to_q.weight", f"{layer}.to_k.weight", f"{layer}.to_v.weight"} <= set(located), layer
        assert any(dtype == np.float16 for _, _, dtype, _ in located.values())


def test_a_delta_weight_not_in_the_graph_is_a_typed_error(tiny_pipe, fp16_fusion_graph):
    from profusion_rt.runtime.ort_engine import weight_map
    from profusion_rt.models.delta import delta_parameters

    base = {k: p.detach() for k, p in delta_parameters(tiny_pipe).items()}
    key = next(k for k in base if k.endswith("to_k.weight"))
    base[key] = base[key] + 1.0  # values the graph does not hold
    with pytest.raises(ProFusionError, match="not found"):
        weight_map(fp16_fusion_graph.opt_onnx_path, base)
