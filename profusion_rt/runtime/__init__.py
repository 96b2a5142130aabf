"""The lean ProFusion runtime: stage engines (torch, onnxruntime, tensorrt) behind one protocol, static
buffers, CUDA graphs."""

from .backends import BACKENDS, available_backends, create_runtime
from .engine import Engine
from .runtime import Runtime, concat_requests

__all__ = ["BACKENDS", "Engine", "Runtime", "available_backends", "concat_requests", "create_runtime"]
