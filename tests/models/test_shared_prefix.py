"""The shared-prefix UNet call equals the reference batched call element by element."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from profusion_rt.models.factory import build_components
from profusion_rt.models.shared_prefix import shared_prefix_eps, supports_shared_prefix
from profusion_rt.models.stages import guided_eps
from profusion_rt.core.presets import get_preset


def _reference(unet, x, t, contexts):
    k = len(contexts)
    return unet(torch.cat([x] * k), t, encoder_hidden_states=torch.cat(contexts)).sample


def _close(a, b):
    assert a.shape == b.shape
    err = ((a - b).abs() / (b.abs().max() + 1e-12)).max().item()
    assert err < 1e-5, err


def _unet(seed=0, **overrides):
    cfg = dict(get_preset("tiny").unet)
    cfg.update(overrides)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():  # default init leaves norms at 1/0 and zero-inits some convs: randomise all
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.mark.parametrize("batch,k", [(1, 2), (1, 3), (2, 3)])
def test_tiny_unet_matches_reference(tiny_pipe, batch, k):
    unet = tiny_pipe.unet
    assert supports_shared_prefix(unet)
    gen = torch.Generator().manual_seed(batch * 10 + k)
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    contexts = [torch.randn(batch, 77, 64, generator=gen) for _ in range(k)]
    for t in (torch.tensor([981]), torch.tensor(1)):  # one t for the batch, as the stages pass it
        with torch.no_grad():
            _close(shared_prefix_eps(unet, x, t, contexts), _reference(unet, x, t, contexts))


def test_guided_eps_split_is_conditioning_major(tiny_pipe):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    t = torch.tensor([400])
    contexts = [torch.randn(2, 77, 64, generator=gen) for _ in range(3)]
    with torch.no_grad():
        plain = guided_eps(tiny_pipe.unet, x, t, contexts)
        shared = guided_eps(tiny_pipe.unet, x, t, contexts, shared_prefix=True)
    for a, b in zip(shared, plain):
        _close(a, b)


def test_two_layers_per_block_and_odd_latent_size():
    """More ResNets/transformers per block than tiny (SD2 has 2), and a latent size that is not a
    multiple of the UNet's up factor (the upsample_size path)."""
    unet = _unet(layers_per_block=2, sample_size=20)
    assert supports_shared_prefix(unet)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 20, 20, generator=gen)
    contexts = [torch.randn(1, 77, 64, generator=gen) for _ in range(3)]
    with torch.no_grad():
        _close(shared_prefix_eps(unet, x, torch.tensor([250]), contexts),
               _reference(unet, x, torch.tensor([250]), contexts))


def test_unsupported_layout_falls_back_to_the_plain_call():
    unet = _unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    assert not supports_shared_prefix(unet)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 32, 32, generator=gen)
    contexts = [torch.randn(1, 77, 64, generator=gen) for _ in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(shared_prefix_eps(unet, x, torch.tensor([10]), contexts),
                                   _reference(unet, x, torch.tensor([10]), contexts), rtol=0, atol=0)


def test_sd2_base_layout_is_supported():
    comps = build_components(get_preset("sd2-base"), device="meta")
    assert supports_shared_prefix(comps.unet)
