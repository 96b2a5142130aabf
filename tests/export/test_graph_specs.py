"""The graph specs and their torch modules: names, shapes, dtypes, hashes, and agreement with the eager
pipeline's own functions."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.artifacts.specs import GRAPHS, get_graph, model_dims, precision_dtype
from profusion_rt.core.errors import InvalidParameterError, ProFusionError
from profusion_rt.models.stages import FUSION_INPUTS, REFINEMENT_INPUTS


def test_graph_names_and_stage_inputs():
    assert list(GRAPHS) == ["text_encoder", "text_encoder_placeholder", "image_encoder", "vae_encoder",
                            "vae_decoder", "promptnet", "unet", "fusion_stage", "refinement_stage"]
    assert GRAPHS["fusion_stage"].input_names == FUSION_INPUTS
    assert GRAPHS["refinement_stage"].input_names == REFINEMENT_INPUTS
    assert GRAPHS["fusion_stage"].output_names == ("x_out",)
    assert GRAPHS["vae_encoder"].output_names == ("mean", "std")
    with pytest.raises(InvalidParameterError, match="unknown graph"):
        get_graph("nope")


def test_dims_and_resolved_shapes(tiny_pipe):
    dims = model_dims(tiny_pipe)
    assert dims == {"L": 77, "D": 64, "N": 1, "T": 17, "V": 64, "C": 4, "h": 32, "w": 32, "H": 256, "W": 256, "S": 4}
    shapes = GRAPHS["fusion_stage"].resolve_shapes(tiny_pipe, 3)
    assert shapes["x"] == (3, 4, 32, 32) and shapes["timestep"] == (1,) and shapes["scalars"] == (4,)
    assert shapes["token_embeds"] == (3, 77, 64) and shapes["x_out"] == (3, 4, 32, 32)
    # from the dims alone (what a runtime without weights has)
    assert GRAPHS["fusion_stage"].resolve_shapes(dims, 3) == shapes
    assert GRAPHS["image_encoder"].resolve_shapes(dims, 2)["pixels"] == (2, 3, 256, 256)


def test_dtypes_follow_precision_except_fixed_tensors():
    ins, outs = GRAPHS["fusion_stage"].tensors("fp16")
    dtypes = {t.name: t.dtype for t in (*ins, *outs)}
    assert dtypes["timestep"] == "int64" and dtypes["scalars"] == "float32"
    assert dtypes["x"] == dtypes["x_out"] == dtypes["token_embeds"] == "float16"
    ins, _ = GRAPHS["text_encoder_placeholder"].tensors("fp16")
    assert {t.name: t.dtype for t in ins}["embedding_scale"] == "float32"
    assert precision_dtype("bf16") == "float32"
    with pytest.raises(ProFusionError):
        precision_dtype("int8")


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_sample_inputs_match_the_declared_shapes(tiny_pipe, graph):
    spec = GRAPHS[graph]
    feeds = spec.sample_inputs(tiny_pipe, batch=2, seed=1)
    shapes = spec.resolve_shapes(tiny_pipe, 2)
    assert list(feeds) == list(spec.input_names)
    for t in spec.inputs:
        assert tuple(feeds[t.name].shape) == shapes[t.name]
        assert str(feeds[t.name].dtype) == f"torch.{t.dtype}"
    again = spec.sample_inputs(tiny_pipe, batch=2, seed=1)
    assert all(torch.equal(feeds[k], again[k]) for k in feeds)
    other = spec.sample_inputs(tiny_pipe, batch=2, seed=2)
    assert any(not torch.equal(feeds[k], other[k]) for k in feeds)


def test_spec_hash_is_stable_and_distinct():
    hashes = {name: spec.spec_hash() for name, spec in GRAPHS.items()}
    assert len(set(hashes.values())) == len(hashes)
    assert hashes == {name: spec.spec_hash() for name, spec in GRAPHS.items()}
    import dataclasses

    bumped = dataclasses.replace(GRAPHS["unet"], version=GRAPHS["unet"].version + 1)
    assert bumped.spec_hash() != hashes["unet"]


@torch.no_grad()
def test_wrapper_modules_equal_the_pipeline_functions(tiny_pipe):
    from profusion_rt.models import text as textenc
    from profusion_rt.models.vision import image_tokens

    pipe = tiny_pipe
    feeds = GRAPHS["text_encoder"].sample_inputs(pipe, 2, 0)
    out = GRAPHS["text_encoder"].build_module(pipe)(**feeds)
    torch.testing.assert_close(out, textenc.encode_plain(pipe.text_encoder, feeds["input_ids"], pipe.text_skip_layers))

    feeds = GRAPHS["text_encoder_placeholder"].sample_inputs(pipe, 2, 0)
    out = GRAPHS["text_encoder_placeholder"].build_module(pipe)(**feeds)
    ref = textenc.encode_with_placeholder(pipe.text_encoder, feeds["token_embeds"], feeds["placeholder_mask"],
                                          feeds["s_star"], feeds["embedding_scale"][0], pipe.text_skip_layers)
    torch.testing.assert_close(out, ref)

    pixels = GRAPHS["image_encoder"].sample_inputs(pipe, 1, 0)["pixels"]
    torch.testing.assert_close(GRAPHS["image_encoder"].build_module(pipe)(pixels), image_tokens(pipe.image_encoder, pixels))

    mean, std = GRAPHS["vae_encoder"].build_module(pipe)(pixels)
    dist = pipe.vae.encode(pixels * 2 - 1).latent_dist
    sf = pipe.vae.config.scaling_factor
    torch.testing.assert_close(mean, dist.mean * sf)
    torch.testing.assert_close(std, dist.std * sf)

    latents = torch.randn(1, 4, 32, 32)
    images = GRAPHS["vae_decoder"].build_module(pipe)(latents)
    torch.testing.assert_close(images.permute(0, 2, 3, 1), torch.from_numpy(pipe.decode(latents, "np")))
