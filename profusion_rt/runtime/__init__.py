"""The lean ProFusion runtime: stage engines (torch, onnxruntime, tensorrt) behind one protocol, static
buffers, CUDA graphs. ``create_runtime(pipe, backend)`` builds one over a loaded pipeline,
``create_runtime_from_artifacts(root)`` (= ``Runtime.from_artifacts``) from exported artifacts alone."""

from profusion_rt.runtime.artifact_pipeline import create_runtime_from_artifacts
from profusion_rt.runtime.backends import BACKENDS, available_backends, create_runtime
from profusion_rt.runtime.engine import Engine
from profusion_rt.runtime.runtime import Runtime, concat_requests


__all__ = ["BACKENDS", "Engine", "Runtime", "available_backends", "concat_requests", "create_runtime",
           "create_runtime_from_artifacts"]
