"""``negative_prompt``: it replaces the empty prompt ∅ in every guidance term (fusion stage, refinement stage,
plain CFG) as in diffusers; "" is ∅ bit for bit; one string for all prompts or one per prompt; typed errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers_reference import latents, max_abs, sd_pipeline

from profusion_rt.core.errors import InvalidParameterError, PromptError
from profusion_rt.core.presets import SD2_SCHEDULER

PROMPT = "a {S*} wearing sunglasses"
NEGATIVE = "blurry, low quality, cartoon"
KW = dict(prompt=PROMPT, num_inference_steps=3, seed=4, output_type="latent")


@pytest.fixture(scope="module")
def sd(tiny_pipe):
    return sd_pipeline(tiny_pipe)


def test_empty_negative_prompt_is_bit_identical(tiny_pipe, astronaut):
    base = tiny_pipe(reference_image=astronaut, **KW).latents
    assert torch.equal(tiny_pipe(reference_image=astronaut, negative_prompt="", **KW).latents, base)
    assert torch.equal(tiny_pipe(reference_image=astronaut, negative_prompt=[""], **KW).latents, base)
    plain = dict(KW, prompt="a photo of a cat")
    assert torch.equal(tiny_pipe(negative_prompt="", **plain).latents, tiny_pipe(**plain).latents)


def test_negative_prompt_changes_the_image(tiny_pipe, astronaut):
    base = tiny_pipe(reference_image=astronaut, **KW).latents
    neg = tiny_pipe(reference_image=astronaut, negative_prompt=NEGATIVE, **KW).latents
    assert max_abs(neg, base) > 1e-2
    # the fusion stage uses it too: with R = 0 the result differs from R = 1
    assert max_abs(tiny_pipe(reference_image=astronaut, negative_prompt=NEGATIVE, fusion_steps=0, **KW).latents,
                   neg) > 1e-3


def test_one_for_all_and_one_per_prompt(tiny_pipe, astronaut):
    prompts = ["a {S*} in the snow", "a {S*} as a knight"]
    kw = dict(KW, prompt=prompts, num_inference_steps=2, fusion_steps=0)
    ref = tiny_pipe.encode_reference(astronaut, seed=KW["seed"])
    one = tiny_pipe(reference=ref, negative_prompt=NEGATIVE, **kw).latents
    same = tiny_pipe(reference=ref, negative_prompt=[NEGATIVE, NEGATIVE], **kw).latents
    assert torch.equal(one, same)
    mixed = tiny_pipe(reference=ref, negative_prompt=[NEGATIVE, ""], **kw).latents
    none = tiny_pipe(reference=ref, **kw).latents
    # the image of prompt 0 follows the negative prompt, that of prompt 1 the empty one
    tol = dict(atol=1e-5 * float(none.abs().max()), rtol=0)
    torch.testing.assert_close(mixed[:1], one[:1], **tol)
    torch.testing.assert_close(mixed[1:], none[1:], **tol)
    assert max_abs(mixed[1:], one[1:]) > 1e-2


def test_encoded_negative_context(tiny_pipe):
    from profusion_rt.models import text as textenc
    from profusion_rt.models.tokenizer import tokenize_prompt

    enc = tiny_pipe.encode_prompts(["a {S*}", "a {S*} smiling"], "person", True, [2, 1],
                                   negative_prompt=["ugly", NEGATIVE])
    with torch.no_grad():
        want = [textenc.encode_plain(tiny_pipe.text_encoder, tokenize_prompt(tiny_pipe.tokenizer, n)[0][None],
                                     tiny_pipe.text_skip_layers) for n in ("ugly", "ugly", NEGATIVE)]
    torch.testing.assert_close(enc.empty, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_one_step_by_hand_with_a_negative_prompt(tiny_pipe, astronaut):
    """∅ is replaced in the fusion-stage guidance and in both terms of the refinement guidance."""
    from profusion_rt.models import text as textenc
    from profusion_rt.models.tokenizer import tokenize_prompt

    pipe = tiny_pipe
    s1, s2, w_r, eta, gamma = 7.0, 5.0, 6.0, 0.9, 0.6
    ref = pipe.encode_reference(astronaut, seed=0)
    g = torch.Generator().manual_seed(42)
    x_T = torch.randn((1, *pipe.latent_shape), generator=g)
    z = torch.randn((1, 1, 1, *pipe.latent_shape), generator=g)
    got = pipe(reference=ref, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, guidance_scale=s1,
               reference_guidance_scale=s2, fusion_steps=1, fusion_guidance_scale=w_r, fusion_eta=eta,
               fusion_embedding_scale=gamma, latents=x_T, noise=z, output_type="latent").latents

    sched = DDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if not k.startswith("_")})
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    acp = sched.alphas_cumprod.double()
    a, ap = acp[int(t)].item(), acp[0].item()
    sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
    k = sigma2 / (1 - ap)
    te, unet, pn, skip = pipe.text_encoder, pipe.unet, pipe.promptnet, pipe.text_skip_layers
    ids, p = tokenize_prompt(pipe.tokenizer, PROMPT)
    mask = torch.zeros(1, ids.shape[0])
    mask[0, p] = 1
    with torch.no_grad():
        embeds = te.embeddings(input_ids=ids[None])
        negative = textenc.encode_plain(te, tokenize_prompt(pipe.tokenizer, NEGATIVE)[0][None], skip)
        klass = textenc.encode_plain(te, tokenize_prompt(pipe.tokenizer, PROMPT.replace("{S*}", "person"))[0][None],
                                     skip)

        def eps(x, ctx):
            return unet(x, t, encoder_hidden_states=ctx).sample

        def conditioning(x, scale):
            return textenc.encode_with_placeholder(te, embeds, mask, pn(ref.latents, t, ref.image_tokens, x), scale,
                                                   skip)

        x = x_T.clone()
        e_u, e_f = eps(x, negative), eps(x, conditioning(x, gamma))
        e_hat = e_u + w_r * (e_f - e_u)
        x0 = (x - math.sqrt(1 - a) * e_hat) / math.sqrt(a)
        x = math.sqrt(a) * x0 + math.sqrt(1 - a) * ((1 - k) * e_hat + math.sqrt(2 * k - k * k) * z[0, 0])
        e_u, e_c, e_r = eps(x, negative), eps(x, conditioning(x, 1.0)), eps(x, klass)
        e = e_u + s1 * (e_c - e_u) + s2 * (e_r - e_u)
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e
    torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_plain_mode_matches_diffusers_with_a_negative_prompt(tiny_pipe, sd):
    lat = latents(tiny_pipe, 1, 2)
    kw = dict(num_inference_steps=6, guidance_scale=7.0, output_type="latent")
    ours = tiny_pipe(prompt="a photo of a cat", negative_prompt=NEGATIVE, latents=lat, **kw).images
    with torch.no_grad():
        ref = sd("a photo of a cat", negative_prompt=NEGATIVE, latents=lat.clone(), eta=0.0, **kw).images
    assert max_abs(ours, ref) < 1e-5
    assert max_abs(ours, tiny_pipe(prompt="a photo of a cat", latents=lat, **kw).images) > 1e-2


def test_plain_mode_matches_diffusers_one_negative_per_prompt(tiny_pipe, sd):
    prompts, negatives = ["a photo of a cat", "a lighthouse"], [NEGATIVE, "ugly"]
    lat = latents(tiny_pipe, 4, 3)
    kw = dict(num_images_per_prompt=2, num_inference_steps=3, guidance_scale=7.0, output_type="latent")
    ours = tiny_pipe(prompt=prompts, negative_prompt=negatives, latents=lat, **kw).images
    with torch.no_grad():
        ref = sd(prompts, negative_prompt=negatives, latents=lat.clone(), eta=0.0, **kw).images
    assert max_abs(ours, ref) < 1e-5


@pytest.mark.parametrize("negative, error, match", [
    (["a", "b"], InvalidParameterError, "2 negative prompts for 1 prompts"),
    (3, InvalidParameterError, "negative_prompt must be a string"),
    ([None], InvalidParameterError, "must be a string"),
    ("very " * 80, PromptError, "negative_prompt: prompt is 82 tokens long"),
    ("a {S*}", PromptError, "negative_prompt"),
])
def test_bad_negative_prompts(tiny_pipe, negative, error, match):
    with pytest.raises(error, match=match) as info:
        tiny_pipe.prepare(prompt="a photo of a cat", negative_prompt=negative, num_inference_steps=1)
    assert "\n" not in str(info.value)


def test_cli_negative_prompt(capsys, tmp_path):
    from profusion_rt.cli import main

    code = main(["generate", "--prompt", "a photo of a cat", "--negative-prompt", "very " * 80, "--steps", "1",
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: negative_prompt:") and "77" in err[0]
    assert not (tmp_path / "x.png").exists()
    assert main(["generate", "--prompt", "a photo of a cat", "--negative-prompt", NEGATIVE, "--steps", "1",
                 "--out", str(tmp_path / "y.png")]) == 0
    assert (tmp_path / "y.png").is_file()
