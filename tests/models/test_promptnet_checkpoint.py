"""PromptNet's state dict against the released checkpoint's interface (docs/checkpoint.md), built on the
meta device at SD2-base size, and its forward output shape."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.models.promptnet import PromptNet, drop_unused_keys
from profusion_rt.core.presets import get_preset

# docs/checkpoint.md: "357 tensors, 431,285,504 params, no buffers" (fork's class, SD2-base config).
RELEASE_TENSORS = 357
RELEASE_PARAMS = 431_285_504
# Channels of the 12 UNet skip features the residual heads act on (doc, section 1).
RESIDUAL_CHANNELS = [320] * 4 + [640] * 3 + [1280] * 5


def _meta_promptnet(with_residual_heads: bool) -> PromptNet:
    cfg = dict(get_preset("sd2-base").promptnet, with_residual_heads=with_residual_heads)
    with torch.device("meta"):
        return PromptNet(cfg)


@pytest.fixture(scope="module")
def full():
    return _meta_promptnet(True)


@pytest.fixture(scope="module")
def full_sd(full):
    return full.state_dict()


def test_counts_match_release(full, full_sd):
    assert len(full_sd) == RELEASE_TENSORS
    assert sum(v.numel() for v in full_sd.values()) == RELEASE_PARAMS
    assert sum(p.numel() for p in full.parameters()) == RELEASE_PARAMS
    assert list(full.buffers()) == []


def _conv_shape(cout, cin, k):
    return (cout, cin, k, k)


def test_named_shapes(full_sd):
    s = {k: tuple(v.shape) for k, v in full_sd.items()}
    expected = {
        "conv_in.weight": (320, 4, 3, 3),
        "conv_in.bias": (320,),
        "time_embedding.linear_1.weight": (1280, 320),
        "time_embedding.linear_2.weight": (1280, 1280),
        "promptnet_cond_embedding.conv_in.weight": (320, 4, 3, 3),
        "promptnet_cond_embedding.conv_out.weight": (320, 320, 3, 3),
        "vision_embedding.weight": (1024, 1280),
        "vision_embedding.bias": (1024,),
        "first_prompt_projection.weight": (128, 320, 8, 8),
        "mid_prompt_projection.weight": (128, 1280, 1, 1),
        "region_prompt_output.weight": (1024, 768, 8, 8),
        "region_prompt_output.bias": (1024,),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
        "down_blocks.2.resnets.0.conv_shortcut.weight": (1280, 640, 1, 1),
        "down_blocks.0.downsamplers.0.conv.weight": (320, 320, 3, 3),
        "mid_block.attentions.0.proj_in.weight": (1280, 1280),  # linear projection
    }
    # down_prompt_projections.0..3: 320/640/1280/1280 -> 128, kernel = stride 4, 2, 1, 1
    for i, (cin, k) in enumerate(zip((320, 640, 1280, 1280), (4, 2, 1, 1))):
        expected[f"down_prompt_projections.{i}.weight"] = _conv_shape(128, cin, k)
    # attention layers: attn2.to_k/to_v (C, 1024) no bias, attn1 (C, C), GEGLU ff.net.0.proj (8C, C), ff.net.2 (C, 4C)
    for prefix, c in (("down_blocks.0.attentions.0", 320), ("down_blocks.1.attentions.1", 640),
                      ("down_blocks.2.attentions.0", 1280), ("mid_block.attentions.0", 1280)):
        tb = f"{prefix}.transformer_blocks.0"
        expected[f"{tb}.attn2.to_k.weight"] = (c, 1024)
        expected[f"{tb}.attn2.to_v.weight"] = (c, 1024)
        expected[f"{tb}.attn2.to_q.weight"] = (c, c)
        expected[f"{tb}.attn1.to_k.weight"] = (c, c)
        expected[f"{tb}.ff.net.0.proj.weight"] = (8 * c, c)
        expected[f"{tb}.ff.net.2.weight"] = (c, 4 * c)
        assert f"{tb}.attn2.to_k.bias" not in s and f"{tb}.attn1.to_q.bias" not in s
        assert f"{tb}.attn1.to_out.0.bias" in s
    for key, shape in expected.items():
        assert key in s, key
        assert s[key] == shape, (key, s[key], shape)
    # no conv_shortcut where in == out channels; DownBlock2D (down_blocks.3) has no attentions or downsampler
    assert "down_blocks.0.resnets.0.conv_shortcut.weight" not in s
    assert not any(k.startswith(("down_blocks.3.attentions", "down_blocks.3.downsamplers")) for k in s)
    assert not any(k.startswith(("up_blocks", "conv_out", "conv_norm_out", "class_embedding")) for k in s)


def test_residual_heads(full, full_sd):
    assert len(full.residual_projections) == 12
    assert len(full.residual_projections_2) == 12
    res = {k: v for k, v in full_sd.items() if "residual" in k}
    assert len(res) == 39
    # independent count: per head conv C->C 1x1 with bias, plus one without bias; the mid pair at 1280
    expected = sum(2 * c * c + c for c in RESIDUAL_CHANNELS) + 2 * 1280 * 1280 + 1280
    n = sum(v.numel() for v in res.values())
    assert n == expected
    assert round(n / 1e6, 2) == 22.95
    for i, c in enumerate(RESIDUAL_CHANNELS):
        assert tuple(full_sd[f"residual_projections.{i}.weight"].shape) == (c, c, 1, 1)
        assert f"residual_projections.{i}.bias" in full_sd
        assert tuple(full_sd[f"residual_projections_2.{i}.weight"].shape) == (c, c, 1, 1)
        assert f"residual_projections_2.{i}.bias" not in full_sd
    assert "mid_residual_projection.bias" in full_sd and "mid_residual_projection_2.bias" not in full_sd


def test_without_residual_heads_is_filtered_full(full_sd):
    lean = _meta_promptnet(False)
    lean_sd = lean.state_dict()
    filtered = {k: v for k, v in full_sd.items() if "residual" not in k}
    assert set(lean_sd) == set(filtered)
    assert len(lean_sd) == RELEASE_TENSORS - 39
    for k, v in lean_sd.items():
        assert v.shape == filtered[k].shape, k
    # a strict load of the filtered release dict (and of drop_unused_keys' result) works
    lean.load_state_dict(filtered, strict=True, assign=True)
    lean.load_state_dict(drop_unused_keys(dict(full_sd)), strict=True, assign=True)
    with pytest.raises(RuntimeError):
        _meta_promptnet(False).load_state_dict(dict(full_sd), strict=True, assign=True)


@pytest.mark.parametrize("batch", [1, 2])
def test_forward_shape_meta_sd2(full, batch):
    with torch.device("meta"):
        z = torch.empty(batch, 4, 64, 64)
        tokens = torch.empty(batch, 257, 1280)
        out = full(z, torch.tensor(981), tokens, torch.empty(batch, 4, 64, 64))
    assert tuple(out.shape) == (batch, 1, 1024)


def test_forward_shape_tiny(tiny_pipe):
    pn = tiny_pipe.promptnet
    b = 2
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = pn(torch.randn(b, 4, 32, 32, generator=g), torch.tensor(501),
                 torch.randn(b, 17, 64, generator=g), torch.randn(b, 4, 32, 32, generator=g))
    assert tuple(out.shape) == (b, 1, 64)
    assert torch.isfinite(out).all()
