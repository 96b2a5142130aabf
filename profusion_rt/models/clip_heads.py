"""CLIP's contrastive projection heads, kept beside the towers for evaluation (CLIP-T, CLIP-I).

Sampling never reads them: PromptNet takes the vision tower's tokens and the UNet the text tower's hidden
states. ``profusion-rt eval`` projects the towers' pooled outputs with them, as CLIP does, so its CLIP-T and
CLIP-I are the paper's. A released ``openclip`` folder (a transformers ``CLIPModel``) carries them; our layout
stores them in ``clip_projections/`` (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from profusion_rt.core.errors import ModelLoadError

FOLDER = "clip_projections"


class ClipProjections(nn.Module):
    """``text_projection`` (text width -> D) and ``visual_projection`` (vision width -> D), no bias."""

    def __init__(self, text_width: int, vision_width: int, projection_dim: int):
        super().__init__()
        self.text_projection = nn.Linear(text_width, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_width, projection_dim, bias=False)

    @property
    def config(self) -> dict[str, int]:
        return {"text_width": self.text_projection.in_features, "vision_width": self.visual_projection.in_features,
                "projection_dim": self.text_projection.out_features}

    @classmethod
    def from_clip(cls, clip) -> "ClipProjections":
        """The heads of a transformers ``CLIPModel`` (copied)."""
        text, visual = clip.text_projection.weight, clip.visual_projection.weight
        heads = cls(text.shape[1], visual.shape[1], text.shape[0])
        with torch.no_grad():
            heads.text_projection.weight.copy_(text)
            heads.visual_projection.weight.copy_(visual)
        return heads.to(text.dtype)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> "ClipProjections":
        from safetensors.torch import load_file

        try:
            config = json.loads((folder / "config.json").read_text())
            heads = cls(int(config["text_width"]), int(config["vision_width"]), int(config["projection_dim"]))
            state = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"component '{FOLDER}': cannot read {folder}: {exc}") from exc
        expected = {k: v.shape for k, v in heads.state_dict().items()}
        for key, shape in expected.items():
            if key not in state:
                raise ModelLoadError(f"component '{FOLDER}': missing tensor {key}")
            if state[key].shape != shape:
                raise ModelLoadError(f"component '{FOLDER}': tensor {key} has shape {tuple(state[key].shape)}, "
                                     f"config says {tuple(shape)}")
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ModelLoadError(f"component '{FOLDER}': unexpected tensor {extra[0]}")
        heads.load_state_dict({k: state[k].to(torch.float32) for k in expected})
        return heads
