"""``profusion-rt export``: the command end to end on the tiny preset, and its one-line user errors."""

from __future__ import annotations

import pytest

from profusion_rt.cli import main


def test_export_command_replays_the_shared_export_from_the_cache(tiny_export, capsys):
    root, builder, _ = tiny_export
    rc = main(["export", "--model", "tiny", "--out", str(root), "--exporter", "legacy", "--dynamic-batch",
               "--max-batch", "4", "--validate", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert builder.model_hash in out
    for graph in ("text_encoder", "image_encoder", "vae_decoder", "unet"):
        assert f"{graph}: onnx cached, optimize cached, validate cached" in out
    for graph in ("fusion_stage", "refinement_stage"):  # + model.ort.onnx, attention fused for onnxruntime
        assert f"{graph}: onnx cached, optimize cached, ort_fusion cached (28 attention fused" in out
    # 9 graphs x 2 batches, vae_encoder has 2 outputs, the stage graphs' model.ort.onnx x 2 batches
    assert out.count("ok (cached)") == 24
    assert "| graph | precision | backend | batch | output |" in out


def test_export_command_default_exporter_static(tmp_path, capsys):
    rc = main(["export", "--model", "tiny", "--out", str(tmp_path), "--graphs", "text_encoder_placeholder",
               "--validate", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "dynamo exporter" in out and "text_encoder_placeholder: onnx built" in out
    assert "| text_encoder_placeholder | fp32 | onnxruntime (model.opt.onnx) | 1 | context |" in out
    assert list(tmp_path.glob("*/text_encoder_placeholder/fp32-r256-b1/model.opt.onnx"))
    assert list(tmp_path.glob("*/runtime.json")) and list(tmp_path.glob("*/tokenizer"))


@pytest.mark.parametrize("args, message", [
    (["--graphs", "nope"], "unknown graph 'nope'"),
    (["--precision", "bf16"], "bf16 is a TensorRT build precision"),
    (["--opset", "17"], "opset must be an integer >= 18"),
    (["--max-batch", "4"], "--max-batch needs --dynamic-batch"),
    (["--dynamic-batch", "--batch", "8", "--max-batch", "4"], "must contain the batch 8"),
    (["--model", "no/such/folder"], "does not exist"),
])
def test_export_command_user_errors(tmp_path, capsys, args, message):
    rc = main(["export", "--out", str(tmp_path), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_export_command_without_tensorrt(tmp_path, capsys):
    from profusion_rt.runtime.trt_engine import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    rc = main(["export", "--out", str(tmp_path), "--backend", "tensorrt", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "TensorRT is not installed" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("PROFUSION_EXPORT_FULL"),
                    reason="the exact default command (dynamo exporter, every graph) takes about 100 s on 2 cores; "
                           "set PROFUSION_EXPORT_FULL=1 to run it")
def test_the_done_when_command(tmp_path, capsys):
    """``profusion-rt export --model tiny --validate`` with every default."""
    rc = main(["export", "--model", "tiny", "--out", str(tmp_path), "--validate", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # 9 graphs (vae_encoder has 2 outputs), and the two stages' attention-fused model.ort.onnx checked too
    assert out.count("| ok |") == 12
