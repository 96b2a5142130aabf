"""Customization augmentation through diffusers' StableDiffusionInpaintPipeline (a tiny random model built from
configs: 9-channel UNet, small VAE, small CLIP text encoder, the real CLIP tokenizer), the notebook's
inpainting settings, and the border-fill fallback (announced, recorded in the subject's metadata)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from profusion_rt.cli import main
from profusion_rt.training import load_delta
from profusion_rt.training.augment import (
    INPAINT_NEGATIVE_PROMPT,
    INPAINT_PROMPT,
    diffusers_inpainter,
    load_inpainter,
)
from profusion_rt.training.tiny_inpaint import save_tiny_inpainting_model


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    return save_tiny_inpainting_model(tmp_path_factory.mktemp("inpaint") / "tiny-inpaint")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(path)
    return path


def test_diffusers_inpainter_uses_the_notebook_settings():
    calls = []

    def fake_pipeline(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]))])

    inpaint = diffusers_inpainter(fake_pipeline, seed=7)
    mask = Image.new("L", (64, 48), 255)
    inpaint(Image.new("RGB", (64, 48)), mask)
    inpaint(Image.new("RGB", (64, 48)), mask)
    first = calls[0]
    assert (first["prompt"], first["negative_prompt"]) == (INPAINT_PROMPT, INPAINT_NEGATIVE_PROMPT)
    assert (first["num_inference_steps"], first["guidance_scale"], first["width"], first["height"]) == (50, 7.5, 64, 48)
    assert first["mask_image"] is mask
    assert first["generator"].initial_seed() == 7 and calls[1]["generator"].initial_seed() == 8
    assert inpaint.settings["steps"] == 50 and inpaint.settings["prompt"] == INPAINT_PROMPT


def test_tiny_inpainting_model_loads_and_runs_reproducibly(inpaint_dir):
    """The real diffusers pipeline from the folder: output size, seeded draws, and the mask is used (random
    weights: nothing is asserted about what it paints)."""
    image = Image.fromarray(skdata.astronaut()[::8, ::8].copy())  # 64 x 64
    right = np.zeros((64, 64), np.uint8)
    right[:, 32:] = 255
    left = right[:, ::-1].copy()

    def run(mask):
        return np.asarray(load_inpainter(str(inpaint_dir), num_inference_steps=2, seed=3)(image, Image.fromarray(mask, "L")))

    a, b, c = run(right), run(right), run(left)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_customize_cli_with_an_inpainting_model_and_the_fallback(inpaint_dir, photo, tmp_path, capsys, caplog):
    out = tmp_path / "inpainted"
    args = ["customize", "--model", "tiny", "--image", str(photo), "--steps", "1", "--batch-size", "1",
            "--num-augmentations", "2", "--no-model", "--no-progress"]
    assert main(args + ["--out", str(out), "--inpaint-model", str(inpaint_dir), "--inpaint-steps", "2"]) == 0
    assert "wrote delta" in capsys.readouterr().out
    training = json.loads(load_delta(out / "subject.delta.safetensors").metadata["training"])
    aug = training["augmentation"]
    assert training["fill"] == "inpainting" and aug["face_box_at_512"] == [30, 460, 100, 400]
    assert aug["resampling"] == "nearest" and aug["scale"] == [0.6, 1.0] and aug["degrees"] == 10.0
    assert aug["inpainting"]["steps"] == 2 and aug["inpainting"]["guidance_scale"] == 7.5
    assert aug["inpainting"]["prompt"] == INPAINT_PROMPT and aug["inpainting"]["model"] == str(inpaint_dir)

    caplog.clear()
    fallback = tmp_path / "border"
    with caplog.at_level(logging.WARNING, logger="profusion_rt"):
        assert main(args + ["--out", str(fallback)]) == 0
    announced = [r.getMessage() for r in caplog.records if "no inpainting model" in r.getMessage()]
    assert len(announced) == 1 and "\n" not in announced[0] and "--inpaint-model" in announced[0]
    training = json.loads(load_delta(fallback / "subject.delta.safetensors").metadata["training"])
    assert training["fill"] == "border" and training["augmentation"]["inpainting"] is None
    assert training["augmentation"]["face_box"] is None
    assert training["config"]["max_grad_norm"] is None  # customization does not clip (official)

    caplog.clear()  # without augmentations there is nothing to fill: no warning
    i = args.index("--num-augmentations")
    plain = [*args[:i], "--num-augmentations", "0", *args[i + 2:]]
    with caplog.at_level(logging.WARNING, logger="profusion_rt"):
        assert main(plain + ["--out", str(tmp_path / "plain")]) == 0
    assert not [r for r in caplog.records if "no inpainting model" in r.getMessage()]
