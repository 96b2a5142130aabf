"""diffusers' StableDiffusionPipeline over a ProFusion pipeline's components, for plain-mode parity tests.
diffusers reads its text encoder's last layer, so it gets a copy of ours truncated by ``text_skip_layers``."""

from __future__ import annotations

import copy

import numpy as np
import torch


def sd_pipeline(pipe):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    ours = pipe.text_encoder
    cfg = copy.deepcopy(ours.config)
    cfg.num_hidden_layers = cfg.num_hidden_layers - pipe.text_skip_layers
    text = CLIPTextModel(cfg).eval()
    result = text.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == []
    sd = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=text, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def latents(pipe, n, seed):
    return torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(seed))


def max_abs(a, b) -> float:
    a, b = (np.asarray(v.numpy() if torch.is_tensor(v) else v, dtype=np.float64) for v in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())
