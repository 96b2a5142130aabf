"""Behaviour of the eager pipeline: seeds, overrides, output types, options, and one full step rebuilt by hand
from the components with the formulas of docs/algorithm.md, "The loop"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from profusion_rt.models import text as textenc
from profusion_rt.models.tokenizer import tokenize_prompt
from profusion_rt.core.presets import SD2_SCHEDULER

PROMPT = "a photo of {S*} wearing sunglasses"
STEPS = 2


def _run(pipe, img, **kw):
    kw = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "latent", **kw}
    if "reference" not in kw:
        kw.setdefault("reference_image", img)
    return pipe(**kw)


def test_determinism_by_seed(tiny_pipe, astronaut):
    a = _run(tiny_pipe, astronaut, seed=7).latents
    b = _run(tiny_pipe, astronaut, seed=7).latents
    c = _run(tiny_pipe, astronaut, seed=8).latents
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_batch_seed_rule(tiny_pipe, astronaut):
    """Image j of a batch uses seed + j (x_T and fusion noise). The reference is fixed (posterior mean): in
    "sample" mode its draw belongs to the batch's first seed. One step: batched and single runs then differ
    by float32 rounding only (~5e-7; the guidance scales amplify it over later steps)."""
    ref = tiny_pipe.encode_reference(astronaut, mode="mean")
    kw = dict(num_inference_steps=1, reference=ref)
    batch = _run(tiny_pipe, None, seed=5, num_images_per_prompt=2, **kw)
    assert batch.seeds == [5, 6]
    for j in range(2):
        single = _run(tiny_pipe, None, seed=5 + j, **kw)
        torch.testing.assert_close(batch.latents[j : j + 1], single.latents, atol=1e-5, rtol=0)
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 1e-2
    # an explicit seed list follows the same rule
    listed = _run(tiny_pipe, None, seed=[6, 5], num_images_per_prompt=2, **kw)
    torch.testing.assert_close(listed.latents.flip(0), batch.latents, atol=1e-5, rtol=0)


def test_reference_image_equals_encoded_reference(tiny_pipe, astronaut):
    s = 21
    direct = _run(tiny_pipe, astronaut, seed=s).latents
    ref = tiny_pipe.encode_reference(astronaut, seed=s)
    assert torch.equal(_run(tiny_pipe, None, reference=ref, seed=s).latents, direct)
    other = tiny_pipe.encode_reference(astronaut, seed=s + 1)
    assert not torch.equal(other.latents, ref.latents)
    assert torch.equal(other.image_tokens, ref.image_tokens)


def test_latents_and_noise_overrides(tiny_pipe, astronaut):
    s = 3
    default = _run(tiny_pipe, astronaut, seed=s).latents
    x_t, z = tiny_pipe.draw_noise([s], STEPS, 1)
    assert x_t.shape == (1, *tiny_pipe.latent_shape) and z.shape == (STEPS, 1, 1, *tiny_pipe.latent_shape)
    # the drawn tensors passed explicitly reproduce the default
    assert torch.equal(_run(tiny_pipe, astronaut, seed=s, latents=x_t, noise=z).latents, default)
    # other latents are used
    other = _run(tiny_pipe, astronaut, seed=s, latents=torch.randn_like(x_t)).latents
    assert (other - default).abs().max() > 1e-3
    # zero fusion noise with fusion_eta > 0 changes the result
    zero = _run(tiny_pipe, astronaut, seed=s, noise=torch.zeros_like(z)).latents
    assert (zero - default).abs().max() > 1e-4
    # fusion_eta = 0: the fusion noise has no effect
    e0 = _run(tiny_pipe, astronaut, seed=s, fusion_eta=0.0).latents
    assert torch.equal(_run(tiny_pipe, astronaut, seed=s, fusion_eta=0.0, noise=torch.zeros_like(z)).latents, e0)


def test_output_types(tiny_pipe, astronaut):
    kw = dict(seed=1, num_images_per_prompt=2, num_inference_steps=1)
    lat = _run(tiny_pipe, astronaut, output_type="latent", **kw)
    arr = _run(tiny_pipe, astronaut, output_type="np", **kw)
    pil = _run(tiny_pipe, astronaut, output_type="pil", **kw)
    assert torch.is_tensor(lat.images) and tuple(lat.images.shape) == (2, *tiny_pipe.latent_shape)
    assert torch.equal(lat.images, lat.latents) and torch.equal(arr.latents, lat.latents)
    assert isinstance(arr.images, np.ndarray) and arr.images.shape == (2, 256, 256, 3)
    assert arr.images.dtype == np.float32 and arr.images.min() >= 0 and arr.images.max() <= 1
    assert isinstance(pil.images, list) and len(pil.images) == 2
    for im, a in zip(pil.images, arr.images):
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (256, 256)
        assert np.abs(np.asarray(im).astype(np.int16) - np.rint(a * 255).astype(np.int16)).max() <= 1
    # np = VAE decode of x / scaling_factor, (y + 1) / 2 clamped
    with torch.no_grad():
        y = tiny_pipe.vae.decode(lat.latents / 0.18215).sample
    expected = ((y + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(arr.images, expected, atol=1e-5, rtol=0)


def test_reference_mode_mean(tiny_pipe, astronaut):
    a = tiny_pipe.encode_reference(astronaut, mode="mean", seed=1)
    b = tiny_pipe.encode_reference(astronaut, mode="mean", seed=2)
    assert torch.equal(a.latents, b.latents)
    # independent computation: LANCZOS resize of the (square) photo, posterior mean, times 0.18215
    pixels = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.LANCZOS))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = tiny_pipe.vae.encode(2 * x - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(a.latents, expected, atol=1e-5, rtol=0)
    sampled = tiny_pipe.encode_reference(astronaut, mode="sample", seed=1)
    assert (sampled.latents - a.latents).abs().max() > 1e-4
    r1 = _run(tiny_pipe, astronaut, seed=4, reference_mode="mean").latents
    r2 = _run(tiny_pipe, None, reference=a, seed=4).latents
    assert torch.equal(r1, r2)


def test_fusion_steps_zero_and_reference_guidance_zero(tiny_pipe, astronaut):
    # fusion_steps 0: no fusion stage, so fusion_* parameters do not matter
    a = _run(tiny_pipe, astronaut, seed=2, fusion_steps=0).latents
    b = _run(tiny_pipe, astronaut, seed=2, fusion_steps=0, fusion_eta=0.3, fusion_guidance_scale=2.0).latents
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a - _run(tiny_pipe, astronaut, seed=2).latents).abs().max() > 1e-4
    # reference_guidance_scale 0: C~ does not matter
    c = _run(tiny_pipe, astronaut, seed=2, reference_guidance_scale=0.0).latents
    d = _run(tiny_pipe, astronaut, seed=2, reference_guidance_scale=0.0, class_word="dog").latents
    assert torch.equal(c, d) and torch.isfinite(c).all()
    e = _run(tiny_pipe, astronaut, seed=2, class_word="dog").latents
    assert (e - _run(tiny_pipe, astronaut, seed=2).latents).abs().max() > 1e-4
    # both at once
    f = _run(tiny_pipe, astronaut, seed=2, fusion_steps=0, reference_guidance_scale=0.0).latents
    assert f.shape == a.shape and torch.isfinite(f).all()


@pytest.mark.parametrize("fusion_steps", [1, 2])
def test_one_step_by_hand(tiny_pipe, astronaut, fusion_steps):
    pipe = tiny_pipe
    s1, s2, w_r, eta, gamma = 7.0, 5.0, 6.0, 0.9, 0.6
    ref = pipe.encode_reference(astronaut, seed=0)
    g = torch.Generator().manual_seed(42)
    x_T = torch.randn((1, *pipe.latent_shape), generator=g)
    z = torch.randn((1, fusion_steps, 1, *pipe.latent_shape), generator=g)
    got = pipe(reference=ref, prompt=PROMPT, num_inference_steps=1, guidance_scale=s1,
               reference_guidance_scale=s2, fusion_steps=fusion_steps, fusion_guidance_scale=w_r,
               fusion_eta=eta, fusion_embedding_scale=gamma, latents=x_T, noise=z,
               output_type="latent").latents

    te, unet, pn, skip = pipe.text_encoder, pipe.unet, pipe.promptnet, pipe.text_skip_layers
    sched = DDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if not k.startswith("_")})
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    acp = sched.alphas_cumprod.double()
    prev = int(t) - 1000
    a, ap = acp[int(t)].item(), (acp[prev] if prev >= 0 else acp[0]).item()  # set_alpha_to_one=False
    sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
    k = sigma2 / (1 - ap)

    ids, p = tokenize_prompt(pipe.tokenizer, PROMPT)
    mask = torch.zeros(1, ids.shape[0])
    mask[0, p] = 1
    empty_ids, _ = tokenize_prompt(pipe.tokenizer, "")
    class_ids, _ = tokenize_prompt(pipe.tokenizer, PROMPT.replace("{S*}", "person"))
    with torch.no_grad():
        embeds = te.embeddings(input_ids=ids[None])
        empty = textenc.encode_plain(te, empty_ids[None], skip)
        klass = textenc.encode_plain(te, class_ids[None], skip)

        def eps(x, ctx):
            return unet(x, t, encoder_hidden_states=ctx).sample

        def conditioning(x, scale):
            s_star = pn(ref.latents, t, ref.image_tokens, x)
            return textenc.encode_with_placeholder(te, embeds, mask, s_star, scale, skip)

        x = x_T.clone()
        for r in range(fusion_steps):  # fusion stage
            e_u, e_f = eps(x, empty), eps(x, conditioning(x, gamma))
            e_hat = e_u + w_r * (e_f - e_u)
            x0 = (x - math.sqrt(1 - a) * e_hat) / math.sqrt(a)
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * ((1 - k) * e_hat + math.sqrt(2 * k - k * k) * z[0, r])
        # refinement stage
        e_u, e_c, e_r = eps(x, empty), eps(x, conditioning(x, 1.0)), eps(x, klass)
        e = e_u + s1 * (e_c - e_u) + s2 * (e_r - e_u)
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - x_T).abs().max() > 0.1
