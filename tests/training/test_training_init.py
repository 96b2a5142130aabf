"""PromptNet initialised from an SD2 UNet (the official pre-training start), and ``profusion-rt pretrain`` on a
plain SD2 folder (the tiny preset's components written in the diffusers layout, no PromptNet)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import CLIPConfig, CLIPModel

from profusion_rt.cli import main
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training.init import (
    COPIED_MODULES,
    FRESH_MODULES,
    copied_parameter_names,
    pipeline_from_sd2,
    promptnet_config_from_unet,
    promptnet_from_unet,
)


def test_copied_tensors_equal_the_unets_and_the_new_ones_are_fresh(tiny_pipe):
    unet = tiny_pipe.unet
    net = promptnet_from_unet(unet, vision_width=64, prompt_channel=64, seed=3)
    state, source = net.state_dict(), unet.state_dict()
    copied = copied_parameter_names(net)
    assert {k.split(".")[0] for k in state} == set(COPIED_MODULES) | set(FRESH_MODULES)
    assert len(copied) > 50 and all(torch.equal(state[k], source[k]) for k in copied)
    assert any(k.startswith("down_blocks.3.") for k in copied) and any(k.startswith("mid_block.") for k in copied)
    assert not any(k.startswith("up_blocks") for k in state)

    fresh = [k for k in state if k not in copied]
    same_shape = {}
    for k, v in source.items():
        same_shape.setdefault(tuple(v.shape), []).append(v)
    for k in fresh:
        v = state[k]
        assert v.abs().sum() > 0, k  # not zero-initialised
        assert not any(torch.equal(v, u) for u in same_shape.get(tuple(v.shape), [])), k  # not a copy
        # PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
        fan_in = state[k.replace(".bias", ".weight")][0].numel()
        bound = 1 / math.sqrt(fan_in)
        assert float(v.abs().max()) <= bound * (1 + 1e-6), k
        if v.numel() >= 1000:
            assert abs(float(v.std()) / (bound / math.sqrt(3)) - 1) < 0.15, k

    again = promptnet_from_unet(unet, vision_width=64, prompt_channel=64, seed=3).state_dict()
    other = promptnet_from_unet(unet, vision_width=64, prompt_channel=64, seed=4).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert all(torch.equal(state[k], other[k]) == (k in copied) for k in state)

    # the config follows the UNet's; the head gives one token for the 32x32 latents (output kernel 4)
    cfg = net.config
    assert (cfg.block_out_channels, cfg.attention_head_dim, cfg.layers_per_block, cfg.cross_attention_dim) == (
        tuple(unet.config.block_out_channels), tuple(unet.config.attention_head_dim), 1, 64)
    assert (cfg.region_kernel_size, cfg.region_output_kernel_size, cfg.region_proj_channel) == (8, 4, 128)
    z = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        assert net(z, torch.tensor([3, 700]), torch.randn(2, 17, 64), z).shape == (2, 1, 64)


def test_sd2_base_shapes_give_the_released_config():
    sd2 = {"sample_size": 64, "in_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "attention_head_dim": [5, 10, 20, 20],
           "cross_attention_dim": 1024, "use_linear_projection": True}
    cfg = promptnet_config_from_unet(SimpleNamespace(config=sd2), vision_width=1280)
    assert (cfg.prompt_channel, cfg.region_kernel_size, cfg.region_output_kernel_size, cfg.region_proj_channel) == (
        1024, 8, None, 128)
    with pytest.raises(InvalidParameterError, match="class_embed_type"):
        promptnet_config_from_unet(SimpleNamespace(config={**sd2, "class_embed_type": "timestep"}), 1280)
    with pytest.raises(InvalidParameterError, match="down blocks"):
        promptnet_config_from_unet(SimpleNamespace(config={**sd2, "down_block_types": ["DownBlock2D"] * 4}), 1280)


@pytest.fixture(scope="module")
def sd2_folders(tiny_pipe, tmp_path_factory):
    """A plain SD2 folder (diffusers layout, no PromptNet, no image encoder), a CLIPModel folder holding the
    tiny text and vision towers (as the official ``openclip``), and a photo folder."""
    root = tmp_path_factory.mktemp("sd2")
    sd2 = root / "sd2"
    tiny_pipe.unet.save_pretrained(sd2 / "unet")
    tiny_pipe.vae.save_pretrained(sd2 / "vae")
    tiny_pipe.text_encoder.save_pretrained(sd2 / "text_encoder")
    tiny_pipe.tokenizer.save_pretrained(str(sd2 / "tokenizer"))
    tiny_pipe.scheduler.save_pretrained(sd2 / "scheduler")
    (sd2 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    te, ie = tiny_pipe.text_encoder, tiny_pipe.image_encoder
    clip = CLIPModel(CLIPConfig(text_config=te.config.to_dict(), vision_config=ie.config.to_dict(),
                                projection_dim=te.config.hidden_size))
    clip.text_model.load_state_dict(te.state_dict())
    clip.vision_model.load_state_dict(ie.state_dict())
    clip.save_pretrained(root / "openclip")
    ie.save_pretrained(root / "vision")
    photos = root / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(photos / f"{name}.png")
    return SimpleNamespace(sd2=sd2, openclip=root / "openclip", vision=root / "vision", photos=photos)


def test_pipeline_from_sd2_text_tower(tiny_pipe, sd2_folders):
    with_clip = pipeline_from_sd2(sd2_folders.sd2, sd2_folders.openclip)
    assert with_clip.text_skip_layers == 1 and with_clip.resolution == tiny_pipe.resolution
    vision_only = pipeline_from_sd2(sd2_folders.sd2, sd2_folders.vision)
    assert vision_only.text_skip_layers == 0  # the SD2 text_encoder: already cut at the penultimate layer
    for pipe in (with_clip, vision_only):
        copied = copied_parameter_names(pipe.promptnet)
        source, state = tiny_pipe.unet.state_dict(), pipe.promptnet.state_dict()
        assert all(torch.equal(state[k], source[k]) for k in copied)


def test_pretrain_cli_on_a_plain_sd2_folder(tiny_pipe, sd2_folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pretrain", "--model", str(sd2_folders.sd2), "--data", str(sd2_folders.photos), "--out", str(out),
                 "--image-encoder", str(sd2_folders.openclip), "--steps", "1", "--batch-size", "1",
                 "--no-progress"]) == 0
    assert f"wrote model {out / 'model'}" in capsys.readouterr().out
    trained = ProFusionPipeline.from_pretrained(out / "model")
    assert trained.text_skip_layers == 1
    unet, pn = tiny_pipe.unet.state_dict(), trained.promptnet.state_dict()
    assert all(torch.equal(v, trained.unet.state_dict()[k]) for k, v in unet.items())  # frozen
    # one AdamW step at 2e-5 from the UNet's weights
    conv = pn["conv_in.weight"] - unet["conv_in.weight"]
    assert 0 < float(conv.abs().max()) < 1e-4

    # without an image encoder: one line, exit 2, nothing written
    capsys.readouterr()
    assert main(["pretrain", "--model", str(sd2_folders.sd2), "--data", str(sd2_folders.photos),
                 "--out", str(tmp_path / "o2"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--image-encoder" in err and "\n" not in err
    assert not (tmp_path / "o2").exists()
