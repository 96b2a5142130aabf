"""v-prediction (SD2-768 checkpoints): the v -> ε / x̂0 conversions against their definition, the DDIM step
against diffusers' v-prediction DDIMScheduler, plain mode against diffusers' StableDiffusionPipeline, one
fusion step worked by hand, and the presets and loader that set the prediction type."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers_reference import latents, max_abs, sd_pipeline

from profusion_rt import sampling
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.core.presets import SD2_V_SCHEDULER, get_preset

STEPS, GUIDANCE = 10, 7.0
PROMPT = "a {S*} wearing sunglasses"


@pytest.fixture(scope="module")
def sd_v(tiny_v):
    assert tiny_v.scheduler.config.prediction_type == "v_prediction"
    return sd_pipeline(tiny_v)


def test_v_to_epsilon_and_x0_against_the_definition():
    # x_t = √a x0 + √(1−a) ε and v = √a ε − √(1−a) x0: the conversions must give back ε and x0.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    for a in (0.9991, 0.5, 0.0047):
        alpha = torch.tensor(a, dtype=torch.float64)
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        torch.testing.assert_close(sampling.v_to_epsilon(v, x_t, alpha), eps, atol=1e-12, rtol=0)
        torch.testing.assert_close(sampling.v_to_x0(v, x_t, alpha), x0, atol=1e-12, rtol=0)
        torch.testing.assert_close(sampling.to_epsilon(v, x_t, alpha, "v_prediction"), eps, atol=1e-12, rtol=0)
        assert sampling.to_epsilon(eps, x_t, alpha, "epsilon") is eps  # ε models: untouched, bit for bit


def test_prediction_type_is_validated():
    assert sampling.prediction_type({}) == "epsilon"
    assert sampling.prediction_type(SD2_V_SCHEDULER) == "v_prediction"
    with pytest.raises(InvalidParameterError, match="sample"):
        sampling.prediction_type({"prediction_type": "sample"})
    with pytest.raises(InvalidParameterError, match="prediction_type"):
        sampling.DDIMSchedule.create({"prediction_type": "x0"}, 10)
    assert sampling.DDIMSchedule.create(SD2_V_SCHEDULER, 10).prediction_type == "v_prediction"


def test_ddim_step_matches_diffusers_v_prediction():
    ref = DDIMScheduler.from_config({k: v for k, v in SD2_V_SCHEDULER.items() if not k.startswith("_")})
    ref.set_timesteps(10)
    ours = sampling.DDIMSchedule.create(SD2_V_SCHEDULER, 10)
    g = torch.Generator().manual_seed(1)
    for i in (0, 4, 9):
        x = torch.randn(2, 4, 8, 8, generator=g)
        v = torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(v, ref.timesteps[i], x, eta=0.0).prev_sample
        got = sampling.ddim_step(x, v, ours.alpha[i], ours.alpha_prev[i], "v_prediction")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        # not the ε step: the comparison can fail
        assert (sampling.ddim_step(x, v, ours.alpha[i], ours.alpha_prev[i]) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_plain_mode_matches_diffusers_v_prediction(tiny_v, sd_v, output_type):
    lat = latents(tiny_v, 1, 0)
    ours = tiny_v(prompt="a photo of a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat,
                  output_type=output_type).images
    with torch.no_grad():
        ref = sd_v("a photo of a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat.clone(),
                   output_type=output_type, eta=0.0).images
    assert max_abs(ours, ref) < 1e-5
    if output_type == "latent":
        assert max_abs(ours, lat) > 0.1


def test_plain_mode_v_batch_matches_diffusers(tiny_v, sd_v):
    prompts = ["a photo of a cat", "an oil painting of a lighthouse"]
    lat = latents(tiny_v, 4, 1)
    ours = tiny_v(prompt=prompts, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=GUIDANCE,
                  latents=lat, output_type="latent").latents
    with torch.no_grad():
        ref = sd_v(prompts, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=GUIDANCE,
                   latents=lat.clone(), output_type="latent", eta=0.0).images
    assert max_abs(ours, ref) < 1e-5


def test_v_and_epsilon_models_differ(tiny_pipe, tiny_v):
    # same weights (same preset shapes and seed), only the scheduler's prediction type differs
    kw = dict(prompt="a photo of a cat", num_inference_steps=3, seed=0, output_type="latent")
    assert max_abs(tiny_pipe(**kw).latents, tiny_v(**kw).latents) > 1e-2


def test_one_fusion_step_by_hand_v(tiny_v, astronaut):
    """1 step, R = 1: the fusion update and the DDIM step with ε = √a v + √(1−a) x_t, written out."""
    from profusion_rt.models import text as textenc
    from profusion_rt.models.tokenizer import tokenize_prompt

    pipe = tiny_v
    s1, s2, w_r, eta, gamma = 7.0, 5.0, 6.0, 0.9, 0.6
    ref = pipe.encode_reference(astronaut, seed=0)
    g = torch.Generator().manual_seed(42)
    x_T = torch.randn((1, *pipe.latent_shape), generator=g)
    z = torch.randn((1, 1, 1, *pipe.latent_shape), generator=g)
    got = pipe(reference=ref, prompt=PROMPT, num_inference_steps=1, guidance_scale=s1, reference_guidance_scale=s2,
               fusion_steps=1, fusion_guidance_scale=w_r, fusion_eta=eta, fusion_embedding_scale=gamma, latents=x_T,
               noise=z, output_type="latent").latents

    sched = DDIMScheduler.from_config({k: v for k, v in SD2_V_SCHEDULER.items() if not k.startswith("_")})
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    acp = sched.alphas_cumprod.double()
    a, ap = acp[int(t)].item(), acp[0].item()  # t' < 0: set_alpha_to_one=False
    sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
    k = sigma2 / (1 - ap)
    te, unet, pn, skip = pipe.text_encoder, pipe.unet, pipe.promptnet, pipe.text_skip_layers
    ids, p = tokenize_prompt(pipe.tokenizer, PROMPT)
    mask = torch.zeros(1, ids.shape[0])
    mask[0, p] = 1
    with torch.no_grad():
        embeds = te.embeddings(input_ids=ids[None])
        empty = textenc.encode_plain(te, tokenize_prompt(pipe.tokenizer, "")[0][None], skip)
        klass = textenc.encode_plain(te, tokenize_prompt(pipe.tokenizer, PROMPT.replace("{S*}", "person"))[0][None],
                                     skip)

        def eps(x, ctx):  # the model predicts v
            v = unet(x, t, encoder_hidden_states=ctx).sample
            return math.sqrt(a) * v + math.sqrt(1 - a) * x

        def conditioning(x, scale):
            return textenc.encode_with_placeholder(te, embeds, mask, pn(ref.latents, t, ref.image_tokens, x), scale,
                                                   skip)

        x = x_T.clone()
        e_u, e_f = eps(x, empty), eps(x, conditioning(x, gamma))
        e_hat = e_u + w_r * (e_f - e_u)
        x0 = (x - math.sqrt(1 - a) * e_hat) / math.sqrt(a)
        x = math.sqrt(a) * x0 + math.sqrt(1 - a) * ((1 - k) * e_hat + math.sqrt(2 * k - k * k) * z[0, 0])
        e_u, e_c, e_r = eps(x, empty), eps(x, conditioning(x, 1.0)), eps(x, klass)
        e = e_u + s1 * (e_c - e_u) + s2 * (e_r - e_u)
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e
    # x̂0 by division by √a (a ≈ 0.0047 at t = 1) amplifies float32 rounding: compare relative to the scale
    torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    assert (expected - x_T).abs().max() > 0.1


def test_presets_and_loading_keep_the_prediction_type(tiny_v, tmp_path):
    from profusion_rt.pipeline import ProFusionPipeline

    assert get_preset("tiny-v").scheduler["prediction_type"] == "v_prediction"
    assert get_preset("sd2-768").scheduler["prediction_type"] == "v_prediction"
    assert get_preset("sd2-base").scheduler["prediction_type"] == "epsilon"
    assert get_preset("tiny").scheduler["prediction_type"] == "epsilon"
    tiny_v.save_pretrained(tmp_path / "model")
    loaded = ProFusionPipeline.from_pretrained(tmp_path / "model")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    # a model folder whose scheduler config says epsilon is read as epsilon
    import json

    cfg_file = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "epsilon"
    cfg_file.write_text(json.dumps(cfg))
    assert ProFusionPipeline.from_pretrained(tmp_path / "model").scheduler.config.prediction_type == "epsilon"


def test_stage_modules_take_the_pipelines_prediction_type(tiny_pipe, tiny_v):
    from profusion_rt.artifacts.specs import get_graph
    from profusion_rt.models.stages import FusionStage, RefinementStage

    assert FusionStage.from_pipeline(tiny_v).prediction_type == "v_prediction"
    assert RefinementStage.from_pipeline(tiny_v).prediction_type == "v_prediction"
    assert FusionStage.from_pipeline(tiny_pipe).prediction_type == "epsilon"
    assert get_graph("fusion_stage").build_module(tiny_v).prediction_type == "v_prediction"
    assert get_graph("refinement_stage").build_module(tiny_pipe).prediction_type == "epsilon"
