"""The float16 variant: float16 weights and I/O, float32 norms (and attention where the model upcasts),
validated on onnxruntime against the float32 torch module."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.artifacts.specs import GRAPHS


def test_mixed_fp16_copy_keeps_float32_islands(tiny_pipe):
    from profusion_rt.models.factory import build_unet
    from profusion_rt.core.presets import get_preset

    from profusion_rt.export.fp16 import Fp32GroupNorm, Fp32LayerNorm, UpcastAttnProcessor, to_mixed_fp16

    cfg = dict(get_preset("tiny").unet, upcast_attention=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = build_unet(cfg).eval()
    half = to_mixed_fp16(unet)
    assert next(unet.parameters()).dtype == torch.float32  # the source is untouched
    norms = [m for m in half.modules() if isinstance(m, (Fp32GroupNorm, Fp32LayerNorm))]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert half.conv_in.weight.dtype == torch.float16
    processors = list(half.attn_processors.values())
    assert processors and all(isinstance(p, UpcastAttnProcessor) for p in processors)

    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([500]), torch.randn(2, 77, 64)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        out = half(x.half(), t, encoder_hidden_states=ctx.half()).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("graph", ["text_encoder", "unet"])
def test_fp16_graph_exports_and_validates(tiny_pipe, tmp_path, graph):
    import onnx

    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    builder = ArtifactBuilder(tiny_pipe, tmp_path, ExportOptions(precision="fp16", exporter="legacy", validate=True))
    report = builder.run([graph], progress=False)[0]
    assert report.passed and report.stages["validate"] == "built"
    model = onnx.load(str(report.path / "model.opt.onnx"))
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.input, *model.graph.output)}
    spec = GRAPHS[graph]
    for t in (*spec.inputs, *spec.outputs):
        want = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT,
                "int64": onnx.TensorProto.INT64}[t.with_precision("fp16").dtype]
        assert elem[t.name] == want, t.name
    # conv / linear weights are float16 (folded constants such as the timestep frequencies stay float32)
    weights = [i for i in model.graph.initializer if i.name.endswith(".weight") and len(i.dims) >= 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    # the norms run in float32 (element types from the optimized model's shape inference)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    norm_ops = {"LayerNormalization", "InstanceNormalization", "GroupNormalization"}
    norms = [n for n in model.graph.node if n.op_type in norm_ops]
    assert norms
    for n in norms:
        assert types.get(n.input[0]) == onnx.TensorProto.FLOAT, (n.name, types.get(n.input[0]))
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")]
    assert any(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in matmuls)


def test_fp16_vae_decoder_computes_in_float32(tiny_pipe):
    """Finding 13: the float16 vae_decoder graph keeps float16 I/O but runs the decoder (512-wide attention
    at SD2 sizes) in float32: its weights stay float32 and its result equals the float32 decoder's up to the
    output rounding."""
    from profusion_rt.export.fp16 import Float32Graph, to_mixed_fp16

    module = GRAPHS["vae_decoder"].build_module(tiny_pipe)
    half = to_mixed_fp16(module)
    assert isinstance(half, Float32Graph)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = module(latents)
        out = half(latents.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=1e-3, rtol=0)
    unet_half = to_mixed_fp16(GRAPHS["unet"].build_module(tiny_pipe))
    assert any(p.dtype == torch.float16 for p in unet_half.parameters())  # other graphs stay float16
