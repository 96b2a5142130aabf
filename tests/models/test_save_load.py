"""Model folders: our own layout round trip, the released ProFusion layout (``openclip`` CLIPModel, PromptNet
with the unused residual heads, ``.bin`` weights), a plain SD2 folder plus a PromptNet folder, and missing
components."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from profusion_rt.core.errors import ModelLoadError, OutputPathError
from profusion_rt.models.promptnet import PromptNet
from profusion_rt.pipeline import ProFusionPipeline

PROMPT = "a portrait of {S*} in a garden"
STEPS = 3


def _latents(pipe, astronaut):
    pipe.progress_bar = False
    return pipe(reference_image=astronaut, prompt=PROMPT, num_inference_steps=STEPS, seed=4,
                output_type="latent").latents


@pytest.fixture(scope="module")
def original_latents(tiny_pipe, astronaut):
    return _latents(tiny_pipe, astronaut)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def test_round_trip_is_lossless(tiny_pipe, astronaut, original_latents, tmp_path):
    path = tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = ProFusionPipeline.from_pretrained(path)
    for name, net in tiny_pipe.networks().items():
        _assert_same_weights(net, loaded.networks()[name])
    assert loaded.text_skip_layers == tiny_pipe.text_skip_layers
    assert loaded.resolution == tiny_pipe.resolution
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(tiny_pipe.scheduler.config)
    assert torch.equal(_latents(loaded, astronaut), original_latents)


def test_save_refuses_non_empty_folder(tiny_pipe, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(OutputPathError) as info:
        tiny_pipe.save_pretrained(target)
    assert "\n" not in str(info.value)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folder left behind


def _write_common(pipe, folder):
    pipe.unet.save_pretrained(folder / "unet", safe_serialization=False)
    pipe.vae.save_pretrained(folder / "vae", safe_serialization=False)
    pipe.tokenizer.save_pretrained(str(folder / "tokenizer"))
    pipe.scheduler.save_pretrained(folder / "scheduler")


def _write_release_promptnet(pipe, folder):
    """promptnet/ as released: config.json + diffusion_pytorch_model.bin with the residual heads' keys."""
    folder.mkdir(parents=True)
    config = pipe.promptnet.config.to_dict()
    (folder / "config.json").write_text(json.dumps(config, default=list))
    full = PromptNet(dict(config, with_residual_heads=True))
    result = full.load_state_dict(pipe.promptnet.state_dict(), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys
    assert all("residual" in k for k in result.missing_keys)
    torch.save(full.state_dict(), folder / "diffusion_pytorch_model.bin")


@pytest.fixture(scope="module")
def released_dir(tiny_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    _write_common(tiny_pipe, root)
    _write_release_promptnet(tiny_pipe, root / "promptnet")
    te, ie = tiny_pipe.text_encoder, tiny_pipe.image_encoder
    config = CLIPConfig(text_config=te.config.to_dict(), vision_config=ie.config.to_dict(),
                        projection_dim=te.config.hidden_size)
    clip = CLIPModel(config)
    clip.text_model.load_state_dict(te.state_dict())
    clip.vision_model.load_state_dict(ie.state_dict())
    (root / "openclip").mkdir()
    torch.save(clip.state_dict(), root / "openclip" / "pytorch_model.bin")
    (root / "openclip" / "config.json").write_text(clip.config.to_json_string())
    index = {"_class_name": "StableDiffusionPromptNetPipeline", "_diffusers_version": "0.15.0.dev0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "promptnet": ["diffusers", "PromptNetModel"], "openclip": ["transformers", "CLIPModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_load_released_layout(tiny_pipe, astronaut, original_latents, released_dir):
    loaded = ProFusionPipeline.from_pretrained(released_dir)
    assert loaded.text_skip_layers == 1  # the released text tower is read at the penultimate layer
    assert loaded.resolution == tiny_pipe.resolution
    _assert_same_weights(tiny_pipe.promptnet, loaded.promptnet)  # residual heads dropped, rest kept
    assert not any("residual" in k for k in loaded.promptnet.state_dict())
    torch.testing.assert_close(_latents(loaded, astronaut), original_latents, atol=1e-6, rtol=0)


def _write_plain_sd2(pipe, sd2):
    """A diffusers SD2 folder: its text_encoder stops at the penultimate layer of the tower (read at its last
    layer), so it is our tower truncated by text_skip_layers layers."""
    _write_common(pipe, sd2)
    te = pipe.text_encoder
    cfg = te.config.to_dict()
    cfg["num_hidden_layers"] -= pipe.text_skip_layers
    short = CLIPTextModel(type(te.config).from_dict(cfg))
    result = short.load_state_dict(te.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys
    short.save_pretrained(sd2 / "text_encoder")
    (sd2 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def test_load_plain_sd2_plus_promptnet(tiny_pipe, astronaut, original_latents, tmp_path):
    sd2, pn = tmp_path / "sd2", tmp_path / "pn"
    _write_plain_sd2(tiny_pipe, sd2)
    _write_release_promptnet(tiny_pipe, pn / "promptnet")
    tiny_pipe.image_encoder.save_pretrained(pn / "image_encoder")

    loaded = ProFusionPipeline.from_pretrained(sd2, promptnet_path=pn)
    assert loaded.text_skip_layers == 0
    assert len(loaded.text_encoder.encoder.layers) == tiny_pipe.text_encoder.config.num_hidden_layers - 1
    torch.testing.assert_close(_latents(loaded, astronaut), original_latents, atol=1e-6, rtol=0)


def test_load_plain_sd2_plus_released_promptnet_with_openclip(tiny_pipe, astronaut, original_latents,
                                                             released_dir, tmp_path):
    """The PromptNet folder of a release (promptnet/ and openclip/) next to a plain SD2 folder: the SD2
    text_encoder (already truncated) must be read at its last layer, the image tokens come from openclip."""
    sd2, pn = tmp_path / "sd2", tmp_path / "pn"
    _write_plain_sd2(tiny_pipe, sd2)
    pn.mkdir()
    for name in ("promptnet", "openclip"):
        shutil.copytree(released_dir / name, pn / name)
    loaded = ProFusionPipeline.from_pretrained(sd2, promptnet_path=pn)
    n_layers = len(loaded.text_encoder.encoder.layers) - loaded.text_skip_layers
    assert n_layers == tiny_pipe.text_encoder.config.num_hidden_layers - tiny_pipe.text_skip_layers
    torch.testing.assert_close(_latents(loaded, astronaut), original_latents, atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", ["vae", "unet", "promptnet", "openclip", "tokenizer", "scheduler"])
def test_missing_component_is_named(released_dir, tmp_path, component):
    broken = tmp_path / "broken"
    shutil.copytree(released_dir, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(ModelLoadError) as info:
        ProFusionPipeline.from_pretrained(broken)
    message = str(info.value)
    assert "\n" not in message
    # without openclip, the loader asks for the separate encoders it would need instead
    names = ("text_encoder", "image_encoder") if component == "openclip" else (component,)
    assert any(name in message for name in names), message
