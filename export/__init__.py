"""torch -> ONNX -> optimized ONNX -> TensorRT plan, validated against torch, written to the artifact cache.

The runtime never imports this package: it reads what this package writes through
:mod:`profusion_rt.artifacts`. Heavy imports (onnx, onnxruntime, polygraphy, tensorrt) happen inside
functions.
"""
