"""The anchor: without a reference image the pipeline is plain SD2 classifier-free guidance with DDIM, so it
must match diffusers' StableDiffusionPipeline built from the same components. diffusers reads its text
encoder's last layer, so it gets a copy of ours truncated by ``text_skip_layers`` layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

STEPS, GUIDANCE = 10, 7.0


@pytest.fixture(scope="module")
def sd_pipe(tiny_pipe):
    ours = tiny_pipe.text_encoder
    skip = tiny_pipe.text_skip_layers
    assert skip == 1
    cfg = copy.deepcopy(ours.config)
    layers = cfg.num_hidden_layers
    cfg.num_hidden_layers = layers - skip
    text = CLIPTextModel(cfg).eval()
    result = text.load_state_dict(ours.state_dict(), strict=False)
    dropped = {k for k in ours.state_dict() if k.startswith(f"encoder.layers.{layers - 1}.")}
    assert dropped and set(result.unexpected_keys) == dropped
    assert result.missing_keys == []
    sd = StableDiffusionPipeline(
        vae=tiny_pipe.vae, text_encoder=text, tokenizer=tiny_pipe.tokenizer, unet=tiny_pipe.unet,
        scheduler=tiny_pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def _latents(tiny_pipe, n, seed):
    return torch.randn((n, *tiny_pipe.latent_shape), generator=torch.Generator().manual_seed(seed))


def _max_abs(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_single_prompt(tiny_pipe, sd_pipe, output_type):
    lat = _latents(tiny_pipe, 1, 0)
    ours = tiny_pipe(prompt="a photo of a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     latents=lat, output_type=output_type).images
    with torch.no_grad():
        ref = sd_pipe("a photo of a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=lat.clone(), output_type=output_type, eta=0.0).images
    ours, ref = (np.asarray(v.numpy() if torch.is_tensor(v) else v) for v in (ours, ref))
    assert ours.shape == ref.shape
    assert _max_abs(ours, ref) < 1e-5
    if output_type == "latent":  # the comparison is not vacuous: sampling moved far from x_T
        assert _max_abs(ours, lat.numpy()) > 0.1


def test_two_prompts_two_images_each(tiny_pipe, sd_pipe):
    prompts = ["a photo of a cat", "an oil painting of a lighthouse"]
    lat = _latents(tiny_pipe, 4, 1)
    steps = 5  # batch of 4: fewer steps keep the run short
    ours = tiny_pipe(prompt=prompts, num_images_per_prompt=2, num_inference_steps=steps,
                     guidance_scale=GUIDANCE, latents=lat, output_type="latent")
    with torch.no_grad():  # latents only: the VAE decode is compared in test_single_prompt
        ref = sd_pipe(prompts, num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      latents=lat.clone(), output_type="latent", eta=0.0).images
    assert ours.latents.shape == ref.shape == (4, *tiny_pipe.latent_shape)
    assert _max_abs(ours.latents, ref) < 1e-5
    # different prompts gave different results
    assert _max_abs(ours.latents[0], ours.latents[2]) > 1e-3
