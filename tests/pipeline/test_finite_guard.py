"""The finite-value guard: a NaN/Inf latent or image is a NonFiniteError naming the stage, never an image.

Each test forces a non-finite value into one place of the tiny preset (a stage's update, the runtime's
stage engine, the VAE decoder) and checks the typed error, its stage and its one-line message; the CLI
test checks that `generate` exits 2 with one line and writes nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from profusion_rt import sampling
from profusion_rt.cli import main
from profusion_rt.core.errors import NonFiniteError, ProFusionError
from profusion_rt.core.finite import FiniteGuard, advice, check_finite

KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=3, fusion_steps=1, seed=0)


@pytest.fixture(scope="module")
def reference(tiny_pipe, astronaut):
    return tiny_pipe.encode_reference(astronaut, seed=0)


def _inf_at(fn, call: int, value=float("inf")):
    """``fn`` whose ``call``-th call (0-based) returns a tensor full of ``value``."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        count["n"] += 1
        return torch.full_like(out, value) if count["n"] - 1 == call else out
    return wrapped


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    return message


def test_check_finite_passes_finite_and_names_stage():
    x = torch.randn(2, 4, 8, 8)
    assert check_finite(x, "latents after the loop") is x
    x[1, 2, 3, 4] = float("nan")
    x[0, 0, 0, 0] = float("-inf")
    with pytest.raises(NonFiniteError) as info:
        check_finite(x, "latents after the loop", torch.float32, " (torch backend)")
    message = _one_line(info.value)
    assert info.value.stage == "latents after the loop"
    assert isinstance(info.value, ProFusionError) and info.value.exit_code == 2
    assert message.startswith("latents after the loop (torch backend) produced non-finite values (2 of 512")


def test_advice_names_fp32_for_reduced_precision():
    assert "fp32 VAE" in advice("VAE decode", torch.float16)
    assert "--precision fp32" in advice("refinement stage", torch.bfloat16)
    assert "fp32 VAE" not in advice("VAE decode", torch.float32)
    with pytest.raises(NonFiniteError, match="fp16 overflowed in the VAE decoder: decode with an fp32 VAE"):
        check_finite(torch.tensor([float("inf")], dtype=torch.float16), "VAE decode", "fp16")


def test_guard_names_the_first_bad_stage_call():
    guard = FiniteGuard(torch.float16)
    for step in range(4):
        guard.watch(torch.ones(3), "fusion stage", step)
        guard.watch(torch.full((3,), float("nan")) if step >= 2 else torch.ones(3), "refinement stage", step)
    with pytest.raises(NonFiniteError, match=r"^refinement stage at step 3 of 4 .*fp16 overflowed") as info:
        guard.check()
    assert info.value.stage == "refinement stage"
    FiniteGuard().check()  # nothing watched: nothing to say


def test_eager_fusion_stage_inf(tiny_pipe, reference, monkeypatch):
    monkeypatch.setattr(sampling, "fusion_update", _inf_at(sampling.fusion_update, 1))
    with pytest.raises(NonFiniteError) as info:
        tiny_pipe(reference=reference, output_type="np", **KW)
    assert info.value.stage == "fusion stage"
    assert _one_line(info.value).startswith("fusion stage at step 2 of 3 produced non-finite values")


def test_eager_refinement_stage_nan(tiny_pipe, reference, monkeypatch):
    monkeypatch.setattr(sampling, "ddim_step", _inf_at(sampling.ddim_step, 0, float("nan")))
    with pytest.raises(NonFiniteError) as info:
        tiny_pipe(reference=reference, output_type="latent", **KW)
    assert info.value.stage == "refinement stage"
    assert "step 1 of 3" in _one_line(info.value)


def test_vae_decode_inf_is_caught_before_the_clamp(tiny_pipe, reference, monkeypatch):
    # the clamp to [0, 1] would turn +Inf into a white pixel: the guard must look before it
    decode = tiny_pipe.vae.decode
    monkeypatch.setattr(tiny_pipe.vae, "decode",
                        lambda z: SimpleNamespace(sample=torch.full_like(decode(z).sample, float("inf"))))
    with pytest.raises(NonFiniteError) as info:
        tiny_pipe(reference=reference, output_type="pil", **KW)
    assert info.value.stage == "VAE decode"
    assert "VAE decode produced non-finite values" in _one_line(info.value)


def test_decode_nan_from_any_encoders(tiny_pipe, monkeypatch):
    # the graph-backed encoders (artifact runtime) clamp inside the graph: NaN still reaches decode's check
    encoders = SimpleNamespace(decode_latents=lambda z: torch.full((z.shape[0], 3, 8, 8), float("nan")))
    monkeypatch.setattr(type(tiny_pipe), "encoders", property(lambda self: encoders))
    with pytest.raises(NonFiniteError, match="^VAE decode produced"):
        tiny_pipe.decode(torch.zeros(1, 4, 32, 32), "pil")


def test_runtime_latents_after_the_loop(tiny_pipe, reference, monkeypatch):
    from profusion_rt.runtime import create_runtime

    runtime = create_runtime(tiny_pipe, "torch")
    good = runtime(reference=reference, output_type="latent", **KW).latents
    assert torch.isfinite(good).all()
    run = runtime.refinement_engine.run

    def broken(feeds, outputs):
        run(feeds, outputs)
        outputs["x_out"].fill_(float("inf"))
    monkeypatch.setattr(runtime.refinement_engine, "run", broken)
    with pytest.raises(NonFiniteError) as info:
        runtime(reference=reference, output_type="np", **KW)
    assert info.value.stage == "latents after the loop"
    assert "(torch backend)" in _one_line(info.value)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_generate_cli_exits_2_and_writes_nothing(backend, tmp_path, monkeypatch, capsys, astronaut):
    from PIL import Image

    image = tmp_path / "face.png"
    Image.fromarray(astronaut).save(image)
    monkeypatch.setattr(sampling, "ddim_step", _inf_at(sampling.ddim_step, 1, float("nan")))
    out = tmp_path / "out" / "img.png"
    code = main(["generate", "--model", "tiny", "--image", str(image), "--prompt", "a {S*}", "--steps", "2",
                 "--backend", backend, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err + captured.out
    # the eager pipeline's progress bar (tqdm, carriage returns) aside, stderr is the one error line
    lines = [ln for ln in captured.err.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("sampling:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    stage = "refinement stage" if backend == "eager" else "latents after the loop"
    assert stage in lines[0]
    assert not out.exists() and not any(tmp_path.glob("out*/*"))
