"""A tiny random SD2-style inpainting model (diffusers ``StableDiffusionInpaintPipeline`` folder), for tests and
for trying ``profusion-rt customize --inpaint-model`` without the real SD2-inpainting weights.

UNet with 9 input channels (4 noisy latent + 1 mask + 4 masked-image latent), a small VAE, a small CLIP text
encoder, the real CLIP tokenizer, a DDIM scheduler; random weights from a seed. It paints noise-like
content: it exercises the code path, not the quality.

    python -m profusion_rt.training.tiny_inpaint OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from profusion_rt.core.presets import SD2_SCHEDULER
from profusion_rt.models.tokenizer import load_default_tokenizer


def build_tiny_inpainting_pipeline(seed: int = 0):
    """The pipeline object (CPU, float32, no safety checker)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, norm_num_groups=32, sample_size=256)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=1))
    scheduler = DDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_default_tokenizer(),
                                          unet=unet, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_inpainting_model(folder: str | Path, seed: int = 0) -> Path:
    """Write :func:`build_tiny_inpainting_pipeline` to ``folder`` (safetensors); loadable with
    ``StableDiffusionInpaintPipeline.from_pretrained(folder)``."""
    folder = Path(folder)
    build_tiny_inpainting_pipeline(seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


if __name__ == "__main__":  # pragma: no cover - a convenience for the README's example
    if len(sys.argv) != 2:
        sys.exit("usage: python -m profusion_rt.training.tiny_inpaint OUT_DIR")
    print(f"wrote {save_tiny_inpainting_model(sys.argv[1])}")
