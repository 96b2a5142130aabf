"""``callback_on_step_end`` on the eager pipeline, with diffusers' signature and semantics (returned tensors
replace the loop's), checked against diffusers' StableDiffusionPipeline in plain mode; and the pipeline's
``progress_callback``."""

from __future__ import annotations

import pytest
import torch
from diffusers_reference import latents, max_abs, sd_pipeline

from profusion_rt.core.errors import InvalidParameterError

KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=3, seed=2, output_type="latent",
          fusion_steps=0)


def test_callback_sees_every_step_and_changes_nothing_by_itself(tiny_pipe, astronaut):
    ref = tiny_pipe.encode_reference(astronaut, seed=2)
    base = tiny_pipe(reference=ref, **KW).latents
    calls = []

    def callback(pipe, i, t, kwargs):
        assert pipe is tiny_pipe and set(kwargs) == {"latents"}
        calls.append((i, int(t), kwargs["latents"].clone()))
        return kwargs

    out = tiny_pipe(reference=ref, callback_on_step_end=callback, **KW).latents
    assert torch.equal(out, base)
    assert [c[:2] for c in calls] == [(0, 667), (1, 334), (2, 1)]
    assert torch.equal(calls[-1][2], base)  # called after the step's update


def test_returned_latents_replace_the_loops(tiny_pipe, astronaut):
    ref = tiny_pipe.encode_reference(astronaut, seed=2)

    def zero_at_last(pipe, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    assert tiny_pipe(reference=ref, callback_on_step_end=zero_at_last, **KW).latents.abs().max() == 0


def test_plain_mode_callback_matches_diffusers(tiny_pipe):
    sd = sd_pipeline(tiny_pipe)
    lat = latents(tiny_pipe, 1, 5)
    seen = {}

    def halve_at_step_1(pipe, i, t, kwargs):
        seen.setdefault(type(pipe).__name__, []).append(i)
        return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}

    kw = dict(num_inference_steps=4, guidance_scale=7.0, output_type="latent")
    ours = tiny_pipe(prompt="a photo of a cat", latents=lat, callback_on_step_end=halve_at_step_1, **kw).images
    with torch.no_grad():
        ref = sd("a photo of a cat", latents=lat.clone(), eta=0.0, callback_on_step_end=halve_at_step_1,
                 callback_on_step_end_tensor_inputs=["latents"], **kw).images
    assert max_abs(ours, ref) < 1e-5
    assert max_abs(ours, tiny_pipe(prompt="a photo of a cat", latents=lat, **kw).images) > 1e-2
    assert seen == {"ProFusionPipeline": [0, 1, 2, 3], "StableDiffusionPipeline": [0, 1, 2, 3]}


def test_tensor_inputs_and_callback_objects(tiny_pipe, astronaut):
    ref = tiny_pipe.encode_reference(astronaut, seed=2)
    got = {}

    class Recorder:  # like diffusers' PipelineCallback: names its own inputs
        tensor_inputs = ["latents", "negative_prompt_embeds"]

        def __call__(self, pipe, i, t, kwargs):
            got[i] = sorted(kwargs)
            return {}

    tiny_pipe(reference=ref, callback_on_step_end=Recorder(), **KW)
    assert got == {i: ["latents", "negative_prompt_embeds"] for i in range(3)}
    plain = dict(KW, prompt="a photo of a cat")
    shapes = {}
    tiny_pipe(callback_on_step_end=lambda p, i, t, kw: shapes.update({k: tuple(v.shape) for k, v in kw.items()}),
              callback_on_step_end_tensor_inputs=["prompt_embeds", "negative_prompt_embeds"], **plain)
    assert shapes == {"prompt_embeds": (1, 77, 64), "negative_prompt_embeds": (1, 77, 64)}
    # replacing ∅'s context at step 0 with the conditioning of "a photo of a cat" changes the result
    swap = tiny_pipe(callback_on_step_end=lambda p, i, t, kw: {"negative_prompt_embeds": kw["prompt_embeds"]},
                     callback_on_step_end_tensor_inputs=["prompt_embeds"], **plain).latents
    assert max_abs(swap, tiny_pipe(**plain).latents) > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(callback_on_step_end=42), "must be callable"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]), "'noise' not among"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"]), "plain mode"),
    (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(2, 4, 8, 8)}), "shape"),
    (dict(callback_on_step_end=lambda p, i, t, kw: [1]), "must return a dict"),
    (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": 1.0}), "not a tensor"),
    (dict(progress_callback="yes"), "progress_callback"),
])
def test_bad_callbacks_are_typed_errors(tiny_pipe, astronaut, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match) as info:
        tiny_pipe(reference_image=astronaut, **dict(KW, num_inference_steps=1), **kwargs)
    assert "\n" not in str(info.value)


def test_progress_callback(tiny_pipe):
    seen = []
    tiny_pipe(**dict(KW, prompt="a cat"), progress_callback=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
