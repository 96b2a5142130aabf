"""PromptNet: maps a reference latent, the live chain latent x_t, the timestep and CLIP image tokens to S*.

A ControlNet-like clone of the SD2 UNet's encoder half built from diffusers' own blocks, plus a token head
(strided convs after ``conv_in``, each down block and the mid block -> concat -> conv -> S*). Module and
parameter names follow the released ProFusion checkpoint, so its state dict loads strictly once the unused
``residual*`` keys are dropped (or as is, with ``with_residual_heads=True``). Two ``config.json`` dialects
are read, the official one and ours (:meth:`PromptNetConfig.from_dict` tells them apart), and held in
:class:`PromptNetConfig` in our terms. The layout, the official config rules and our dialect:
docs/checkpoint.md; the network's role: docs/algorithm.md, section 8.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import (
    UNetMidBlock2DCrossAttn,
    get_down_block,
)
from torch import nn

from profusion_rt.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

_DOWN_TYPES = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")


@dataclass
class PromptNetConfig:
    """The configuration keys PromptNet uses; the released ``config.json`` carries more, which are ignored."""

    sample_size: int | None = 64
    in_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    down_block_types: Sequence[str] = _DOWN_TYPES
    layers_per_block: int = 2
    attention_head_dim: Sequence[int] | int = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    prompt_channel: int = 1024
    vision_width: int = 1280
    region_kernel_size: int = 8
    #: Kernel (= stride) of the final token conv. ``None``: ``region_kernel_size`` as in the release. The tiny
    #: preset's 32x32 latent gives 4x4 head maps and needs 4.
    region_output_kernel_size: int | None = None
    region_proj_channel: int = 128
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = True
    upcast_attention: bool = False
    center_input_sample: bool = False
    with_residual_heads: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], vision_width: int | None = None) -> "PromptNetConfig":
        """Our config (it has a ``region_output_kernel_size`` key) or the official one (it has not: read by
        :meth:`from_official`). ``vision_width`` (from the weights) overrides the stored or default width."""
        if is_official_config(cfg):
            return cls.from_official(cfg, vision_width=vision_width)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        if vision_width is not None:
            kwargs["vision_width"] = int(vision_width)
        return cls(**kwargs)._normalised()

    @classmethod
    def from_official(cls, cfg: dict[str, Any], vision_width: int | None = None) -> "PromptNetConfig":
        """Read a ``config.json`` as the official ``PromptNetModel.__init__`` reads it (see the module doc).

        Options the official class supports but ProFusion never uses (other mid blocks, class embeddings,
        Fourier time embedding, ...) raise :class:`~profusion_rt.core.errors.ModelLoadError` naming the key."""

        c = {**OFFICIAL_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
        problems = [f"{key}={c[key]!r}" for key, ok in _OFFICIAL_FIXED.items() if c[key] != ok]
        only_cross = c["only_cross_attention"]
        if (any(only_cross) if isinstance(only_cross, (list, tuple)) else bool(only_cross)):
            problems.append(f"only_cross_attention={only_cross!r}")
        bad_blocks = [b for b in c["down_block_types"] if b not in ("CrossAttnDownBlock2D", "DownBlock2D")]
        if bad_blocks:
            problems.append(f"down_block_types={list(c['down_block_types'])!r}")
        if problems:
            raise ModelLoadError("official PromptNet options that ProFusion does not use and profusion-rt does not "
                                 "implement: " + ", ".join(problems))
        n = len(c["down_block_types"])
        if len(c["block_out_channels"]) != n:
            raise ModelLoadError(f"{len(c['block_out_channels'])} block_out_channels for {n} down_block_types")
        out = cls(
            sample_size=c["sample_size"],
            in_channels=int(c["in_channels"]),
            block_out_channels=c["block_out_channels"],
            down_block_types=c["down_block_types"],
            layers_per_block=int(c["layers_per_block"]),
            attention_head_dim=c["attention_head_dim"],
            cross_attention_dim=int(c["cross_attention_dim"]),
            prompt_channel=int(c["prompt_channel"]),
            # the official class: Linear(1280 if use_clip_vision_embeds else 1024, ...); the weights say better
            vision_width=int(vision_width if vision_width is not None else 1280),
            region_kernel_size=official_head_kernel(n),
            region_output_kernel_size=int(c["region_kernel_size"]),
            region_proj_channel=int(c["region_proj_channel"]),
            norm_num_groups=int(c["norm_num_groups"]),
            norm_eps=float(c["norm_eps"]),
            act_fn=str(c["act_fn"]),
            flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=int(c["freq_shift"]),
            downsample_padding=int(c["downsample_padding"]),
            mid_block_scale_factor=float(c["mid_block_scale_factor"]),
            use_linear_projection=bool(c["use_linear_projection"]),
            upcast_attention=bool(c["upcast_attention"]),
            # not an argument of the official class, but inherited from the UNet config and read by its forward
            center_input_sample=bool(c.get("center_input_sample", False)),
        )
        return out._normalised()

    def _normalised(self) -> "PromptNetConfig":
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        if isinstance(self.attention_head_dim, int):
            self.attention_head_dim = (self.attention_head_dim,) * len(self.block_out_channels)
        self.attention_head_dim = tuple(int(h) for h in self.attention_head_dim)
        return self

    def head_kernels(self) -> tuple[int, ...]:
        """Kernels (= strides) of the token head: ``first_prompt_projection``, ``down_prompt_projections.*``,
        ``mid_prompt_projection``, ``region_prompt_output``."""
        k = self.region_kernel_size
        kernels = [k]
        for i in range(len(self.block_out_channels)):
            if i < len(self.block_out_channels) - 1:  # halve after each non-final (downsampling) block
                k = max(k // 2, 1)
            kernels.append(k)
        kernels.append(k)
        kernels.append(self.region_output_kernel_size or self.region_kernel_size)
        return tuple(kernels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["_class_name"] = "PromptNetModel"
        d["use_clip_vision_embeds"] = True
        d["with_noise"] = True
        return d


class PromptNetCondEmbedding(nn.Module):
    """E(x_t): conv3x3 -> SiLU -> conv3x3 on the noisy latent (names as in the release)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(nn.functional.silu(self.conv_in(x)))


class PromptNet(nn.Module):
    """PromptNet with the released checkpoint's names.

    ``forward(sample, timestep, encoder_hidden_states, promptnet_cond) -> (B, N, prompt_channel)`` with
    ``sample`` = reference latent z_ref, ``encoder_hidden_states`` = CLIP image tokens,
    ``promptnet_cond`` = the current chain latent x_t.
    """

    def __init__(self, config: PromptNetConfig | dict[str, Any]):
        super().__init__()
        if isinstance(config, dict):
            config = PromptNetConfig.from_dict(config)
        else:
            config = config._normalised()
        self.config = config
        ch = tuple(config.block_out_channels)
        heads = tuple(config.attention_head_dim)
        time_dim = ch[0] * 4

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], time_dim, act_fn=config.act_fn)
        self.promptnet_cond_embedding = PromptNetCondEmbedding(config.in_channels, ch[0])
        self.vision_embedding = nn.Linear(config.vision_width, config.cross_attention_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            # As in diffusers' UNet2DConditionModel, SD2's ``attention_head_dim`` is the number of heads.
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=config.layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_dim,
                    add_downsample=i < len(ch) - 1,
                    resnet_eps=config.norm_eps,
                    resnet_act_fn=config.act_fn,
                    resnet_groups=config.norm_num_groups,
                    cross_attention_dim=config.cross_attention_dim,
                    num_attention_heads=heads[i],
                    downsample_padding=config.downsample_padding,
                    use_linear_projection=config.use_linear_projection,
                    upcast_attention=config.upcast_attention,
                    attention_head_dim=heads[i],
                )
            )
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=ch[-1],
            temb_channels=time_dim,
            resnet_eps=config.norm_eps,
            resnet_act_fn=config.act_fn,
            output_scale_factor=config.mid_block_scale_factor,
            cross_attention_dim=config.cross_attention_dim,
            num_attention_heads=heads[-1],
            resnet_groups=config.norm_num_groups,
            use_linear_projection=config.use_linear_projection,
            upcast_attention=config.upcast_attention,
        )

        # Token head: kernel = stride starts at region_kernel_size (ours; the official rule gives
        # max(2 ** (n_blocks - 1), 8)) and halves after every block that downsamples, so every feature map
        # lands on the same grid; the final conv has its own kernel (the official ``region_kernel_size``).
        kernels = config.head_kernels()
        p = config.region_proj_channel
        self.first_prompt_projection = nn.Conv2d(ch[0], p, kernels[0], stride=kernels[0])
        self.down_prompt_projections = nn.ModuleList(
            nn.Conv2d(c, p, k, stride=k) for c, k in zip(ch, kernels[1:1 + len(ch)]))
        k = kernels[-2]
        self.mid_prompt_projection = nn.Conv2d(ch[-1], p, k, stride=k)
        ko = kernels[-1]
        self.region_prompt_output = nn.Conv2d(p * (len(ch) + 2), config.prompt_channel, ko, stride=ko)

        if config.with_residual_heads:
            self._build_residual_heads()

    def _build_residual_heads(self) -> None:
        """The release's unused ControlNet-style heads, built only so a checkpoint can load strictly."""
        chans = [self.config.block_out_channels[0]]
        for blk in self.down_blocks:
            chans += [r.out_channels for r in blk.resnets]
            if blk.downsamplers is not None:
                chans.append(blk.downsamplers[0].out_channels)
        self.residual_projections = nn.ModuleList(nn.Conv2d(c, c, 1) for c in chans)
        self.residual_projections_2 = nn.ModuleList(nn.Conv2d(c, c, 1, bias=False) for c in chans)
        c = self.config.block_out_channels[-1]
        self.mid_residual_projection = nn.Conv2d(c, c, 1)
        self.mid_residual_projection_2 = nn.Conv2d(c, c, 1, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        promptnet_cond: torch.Tensor,
    ) -> torch.Tensor:
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.reshape(-1).expand(batch)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.time_proj(timestep).to(dtype=sample.dtype)
        temb = self.time_embedding(temb)
        context = self.vision_embedding(encoder_hidden_states)

        h = self.conv_in(sample) + self.promptnet_cond_embedding(promptnet_cond)
        maps = [self.first_prompt_projection(h)]
        for block, proj in zip(self.down_blocks, self.down_prompt_projections):
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=temb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=temb)
            maps.append(proj(h))
        h = self.mid_block(h, temb, encoder_hidden_states=context)
        maps.append(self.mid_prompt_projection(h))
        tokens = self.region_prompt_output(torch.cat(maps, dim=1))  # (B, C, n_h, n_w)
        return tokens.flatten(2).transpose(1, 2)

    # -- persistence ---------------------------------------------------------------------------------
    def save_config(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, default=list))


#: Arguments of the official ``PromptNetModel.__init__`` and their defaults (read, not copied, from
#: drboog/ProFusion ``diffusers/src/diffusers/models/promptnet.py``); a key missing from an official
#: ``config.json`` takes these values, exactly as the official class would.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "region_kernel_size": 8,
    "region_proj_channel": 128,
    "prompt_channel": 1024,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": _DOWN_TYPES,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "block_out_channels": (160, 320, 640, 640),
    "res_block_out_channels": (160, 320, 640, 640),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": 8,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "use_clip_vision_embeds": False,
    "use_res": True,
    "with_noise": False,
}

#: Official options that must keep these values: the others change the network or its inputs in ways
#: ProFusion's release never uses (``with_noise`` false would feed z_ref instead of x_t as the condition;
#: ``use_clip_vision_embeds`` false expects other image features).
_OFFICIAL_FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "use_clip_vision_embeds": True,
    "with_noise": True,
}


def official_head_kernel(n_blocks: int) -> int:
    """The official first head kernel: ``max(2 ** (n_blocks - 1), 8)`` (8 for SD2's four down blocks)."""
    return max(2 ** (int(n_blocks) - 1), 8)


def is_official_config(cfg: dict[str, Any]) -> bool:
    """An official ``PromptNetModel`` config (ours always carries ``region_output_kernel_size``)."""
    return "region_output_kernel_size" not in cfg


def drop_unused_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the release's unused ``residual*`` heads from a PromptNet state dict."""
    return {k: v for k, v in state_dict.items() if "residual" not in k}
