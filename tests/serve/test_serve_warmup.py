"""Start-up warm-up: with CUDA graphs the served default step count is captured before serving (a capture is
per shape, and a later one could run while a customization thread uses the GPU)."""

from types import SimpleNamespace

from profusion_rt.serve import ServeConfig, Server


class _Runtime:
    def __init__(self, use_cuda_graph: bool):
        self.use_cuda_graph = use_cuda_graph
        self.calls: list[int] = []

    def warmup(self, num_inference_steps: int) -> None:
        self.calls.append(num_inference_steps)


def _start(runtime, tmp_path, **config):
    service = SimpleNamespace(config=ServeConfig(data_dir=tmp_path, **config), runtime=runtime,
                              scheduler=SimpleNamespace(start=lambda: None), ready=False)
    Server.start(service)
    assert service.ready
    return runtime.calls


def test_cuda_graph_runtime_warms_up_the_served_step_count(tmp_path):
    assert _start(_Runtime(True), tmp_path, warmup_steps=2, default_steps=30) == [2, 30]


def test_without_cuda_graphs_one_short_warmup(tmp_path):
    assert _start(_Runtime(False), tmp_path, warmup_steps=2, default_steps=30) == [2]


def test_warmup_off(tmp_path):
    assert _start(_Runtime(True), tmp_path, warmup_steps=0, default_steps=30) == []
