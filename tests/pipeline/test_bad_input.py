"""Bad input raises the right typed error with a one-line message, in the API and in the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from profusion_rt.cli import main
from profusion_rt.core.errors import (
    ImageError,
    InvalidParameterError,
    ModelLoadError,
    ProFusionError,
    PromptError,
    UnknownPresetError,
)
from profusion_rt.pipeline import ProFusionPipeline

REPO = Path(__file__).resolve().parents[2]


def _raises(error, fn, *args, **kwargs) -> str:
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


def _gen(pipe, **kw):
    return pipe(**{"num_inference_steps": 1, "output_type": "latent", **kw})


@pytest.fixture(scope="module")
def small_image(astronaut):
    return astronaut[::4, ::4].copy()  # 128x128: decoding and resizing stay cheap


def test_placeholder_rules(tiny_pipe, small_image):
    _raises(PromptError, _gen, tiny_pipe, reference_image=small_image, prompt="a photo of a man")
    _raises(PromptError, _gen, tiny_pipe, prompt="a photo of {S*}")  # no reference
    _raises(PromptError, _gen, tiny_pipe, reference_image=small_image, prompt="{S*} and {S*}")
    _raises(PromptError, _gen, tiny_pipe, reference_image=small_image, prompt=["a {S*}", "a dog"])


def test_prompt_too_long(tiny_pipe, small_image):
    prompt = "a photo of {S*} " + "with a red hat " * 20
    n = len(tiny_pipe.tokenizer(prompt.replace("{S*}", "holder"))["input_ids"])  # start/end included
    assert n > 77
    message = _raises(PromptError, _gen, tiny_pipe, reference_image=small_image, prompt=prompt)
    assert str(n) in message
    message = _raises(PromptError, _gen, tiny_pipe, prompt=prompt.replace("{S*}", "man"))
    assert str(n) in message


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("bad")
    jpg = root / "photo.jpg"
    Image.fromarray(astronaut).save(jpg, quality=90)
    data = jpg.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("this is not an image\n")
    (root / "unreadable.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("source", ["missing.png", "truncated.jpg", "notes.png", "unreadable.png", "folder"])
def test_bad_image_files(tiny_pipe, bad_files, source):
    path = bad_files / source
    if source == "folder":
        path = bad_files
    message = _raises(ImageError, _gen, tiny_pipe, reference_image=str(path), prompt="a {S*}")
    assert path.name in message


def test_zero_size_array(tiny_pipe):
    for array in (np.zeros((0, 10, 3), np.uint8), np.zeros((10, 0), np.uint8)):
        _raises(ImageError, _gen, tiny_pipe, reference_image=array, prompt="a {S*}")


def test_grayscale_and_rgba_accepted(tiny_pipe, small_image):
    gray = small_image.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([small_image, np.full((*small_image.shape[:2], 1), 200, np.uint8)], axis=2)
    for image in (gray, rgba, Image.fromarray(gray), Image.fromarray(rgba, mode="RGBA")):
        out = _gen(tiny_pipe, reference_image=image, prompt="a {S*}")
        assert out.latents.shape == (1, *tiny_pipe.latent_shape) and out.latents.isfinite().all()


@pytest.mark.parametrize("kwargs", [
    dict(num_inference_steps=0),
    dict(num_inference_steps=-3),
    dict(guidance_scale=-1.0),
    dict(fusion_embedding_scale=-0.5),
    dict(fusion_eta=1.5),
    dict(fusion_eta=-0.1),
    dict(fusion_steps=-1),
    dict(reference_guidance_scale=float("nan")),
    dict(num_images_per_prompt=0),
    dict(output_type="jpeg"),
    dict(reference_mode="median"),
    dict(seed=-1),
    dict(seed=True),
    dict(seed=1.5),
])
def test_invalid_parameters(tiny_pipe, small_image, kwargs):
    _raises(InvalidParameterError, _gen, tiny_pipe, **{"reference_image": small_image, "prompt": "a {S*}", **kwargs})


def test_unknown_preset():
    message = _raises(UnknownPresetError, ProFusionPipeline.from_preset, "nosuch")
    assert "nosuch" in message and "tiny" in message
    assert not message.startswith(("'", '"'))


@pytest.fixture(scope="module")
def saved_dir(tiny_pipe, tmp_path_factory):
    return tiny_pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "image_encoder", "promptnet",
                                       "tokenizer", "scheduler"])
def test_model_folder_missing_component(saved_dir, tmp_path, component):
    broken = tmp_path / "model"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / component)
    message = _raises(ModelLoadError, ProFusionPipeline.from_pretrained, broken)
    assert component in message


def test_missing_model_folder(tmp_path):
    _raises(ModelLoadError, ProFusionPipeline.from_pretrained, tmp_path / "nothing-here")


# -- CLI ------------------------------------------------------------------------------------------------


def _cli_error(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_cli_bad_image_path(capsys, tmp_path):
    line = _cli_error(capsys, ["generate", "--image", str(tmp_path / "missing.png"), "--prompt", "a {S*}",
                               "--out", str(tmp_path / "out.png")])
    assert "missing.png" in line
    assert not (tmp_path / "out.png").exists()


def test_cli_prompt_without_placeholder(capsys, tmp_path, small_image, tiny_pipe):
    image = tmp_path / "ref.png"
    Image.fromarray(small_image).save(image)
    line = _cli_error(capsys, ["generate", "--image", str(image), "--prompt", "a photo of a man",
                               "--steps", "1", "--out", str(tmp_path / "out.png")])
    assert "{S*}" in line
    assert not (tmp_path / "out.png").exists()


def test_cli_unknown_preset(capsys, tmp_path):
    line = _cli_error(capsys, ["generate", "--model", "nosuch", "--prompt", "a cat", "--steps", "1",
                               "--out", str(tmp_path / "out.png")])
    assert "nosuch" in line


def test_cli_subprocess_missing_image(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "profusion_rt", "generate", "--image", str(tmp_path / "missing.png"),
         "--prompt", "a {S*}", "--out", str(tmp_path / "out.png")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.png" in lines[0], proc.stderr


def test_errors_share_the_base_class():
    for error in (ImageError, InvalidParameterError, ModelLoadError, PromptError, UnknownPresetError):
        assert issubclass(error, ProFusionError) and error.exit_code == 2
