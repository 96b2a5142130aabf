"""The single-image customization set: the original photo plus seeded random augmentations.

Each augmentation (PROFUSION.md section 2, "Single-image customization"; torchvision's ``RandomAffine``
semantics, implemented here with ``torch.nn.functional.affine_grid``/``grid_sample`` because torchvision
cannot be installed beside our torch build):

1. horizontal flip with probability 0.5;
2. an affine map about the image centre: rotation by an angle uniform in [-10, 10] degrees, translation
   by fractions uniform in [-0.2, 0.2] of the width and of the height, scale uniform in [0.6, 1.0];
   bilinear resampling;
3. the area the moved image no longer covers (a pixel is *uncovered* when less than 99% of its bilinear
   footprint falls inside the source) is filled:

   * by an **inpainting model** when one is given: ``inpainter(image, mask) -> image`` with ``mask`` an
     "L" image, 255 where pixels must be painted (the diffusers ``StableDiffusionInpaintPipeline``
     convention; :func:`diffusers_inpainter` adapts one, as the official notebook used SD2-inpainting
     with 50 steps and guidance 7.5). Its output is resized to the input size if needed, and only the
     uncovered pixels are taken from it;
   * else by a **simple fill**: ``"border"`` (default) repeats the nearest edge pixel of the moved image
     (``grid_sample`` padding mode "border"), ``"reflection"`` mirrors it, ``"mean"`` paints the mean
     colour of the source image (blended at the boundary by the coverage).

All parameters come from ``torch.Generator().manual_seed(seed)`` in a fixed order (per augmentation: flip,
angle, translate x, translate y, scale), so a seed always gives the same set. The official notebook also
cut a face-specific box (rows 30-460, columns 100-400 at 512 px) before the affine map; that is not done
here (it assumes a centred face).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InvalidParameterError
from ..image_io import center_crop_resize, load_image, pil_to_tensor, tensor_to_pil

logger = logging.getLogger(__name__)

#: ``inpainter(image, mask) -> image``: RGB image, "L" mask with 255 where pixels must be painted.
Inpainter = Callable[[Image.Image, Image.Image], Image.Image]

FILL_MODES = ("border", "reflection", "mean")

#: Pixels whose bilinear footprint is covered by less than this fraction of the source are "uncovered".
COVERAGE_THRESHOLD = 0.99


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random augmentation (defaults: the official notebook's)."""

    flip_probability: float = 0.5
    max_degrees: float = 10.0
    max_translate: float = 0.2
    scale_range: tuple[float, float] = (0.6, 1.0)

    def validate(self) -> None:
        lo, hi = self.scale_range
        if not 0.0 <= self.flip_probability <= 1.0:
            raise InvalidParameterError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if not 0.0 <= self.max_degrees <= 180.0:
            raise InvalidParameterError(f"max_degrees must be in [0, 180], got {self.max_degrees}")
        if not 0.0 <= self.max_translate <= 1.0:
            raise InvalidParameterError(f"max_translate must be in [0, 1], got {self.max_translate}")
        if not 0.0 < lo <= hi:
            raise InvalidParameterError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")


@dataclass(frozen=True)
class AugmentParams:
    flip: bool
    degrees: float
    translate: tuple[float, float]  # fractions of width, height; positive = right, down
    scale: float


def sample_params(generator: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> AugmentParams:
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    lo, hi = spec.scale_range
    return AugmentParams(
        flip=u[0] < spec.flip_probability,
        degrees=(2 * u[1] - 1) * spec.max_degrees,
        translate=((2 * u[2] - 1) * spec.max_translate, (2 * u[3] - 1) * spec.max_translate),
        scale=lo + (hi - lo) * u[4],
    )


def _theta(params: AugmentParams) -> torch.Tensor:
    """``affine_grid`` matrix (output -> input, normalised coordinates) of rotate+scale about the centre,
    then translate. Forward map: out = s R x + t, so in = R^-1 (out - t) / s."""
    a = math.radians(params.degrees)
    cos, sin = math.cos(a), math.sin(a)
    inv = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64) / params.scale
    t = torch.tensor([2 * params.translate[0], 2 * params.translate[1]], dtype=torch.float64)
    return torch.cat([inv, (-inv @ t)[:, None]], dim=1)[None].float()


def affine_augment(image: torch.Tensor, params: AugmentParams, fill: str = "border") -> tuple[torch.Tensor, torch.Tensor]:
    """Flip and move a (3, H, W) [0, 1] image. Returns the image with the uncovered area filled by the
    simple ``fill`` and the uncovered mask (1, H, W) as float (1.0 = uncovered)."""
    if fill not in FILL_MODES:
        raise InvalidParameterError(f"fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
    x = image.flip(-1) if params.flip else image
    x = x[None]
    grid = F.affine_grid(_theta(params), list(x.shape), align_corners=False)
    coverage = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
    if fill == "mean":
        moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved = moved + (1.0 - coverage) * x.mean(dim=(2, 3), keepdim=True)
    else:
        moved = F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)
    uncovered = (coverage < COVERAGE_THRESHOLD).float()
    return moved[0].clamp(0, 1), uncovered[0]


def _mask_image(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask[0].numpy() > 0.5).astype(np.uint8) * 255, mode="L")


def augment_image(image: torch.Tensor, params: AugmentParams, fill: str = "border",
                  inpainter: Inpainter | None = None) -> torch.Tensor:
    """One augmentation of a (3, H, W) [0, 1] image (see the module docstring)."""
    moved, uncovered = affine_augment(image, params, fill)
    if inpainter is None or not bool(uncovered.any()):
        return moved
    painted = load_image(inpainter(tensor_to_pil(moved), _mask_image(uncovered)))
    if painted.size != (moved.shape[2], moved.shape[1]):
        painted = painted.resize((moved.shape[2], moved.shape[1]), Image.Resampling.LANCZOS)
    return moved * (1.0 - uncovered) + pil_to_tensor(painted) * uncovered


def customization_images(image, resolution: int, count: int = 31, seed: int = 0, fill: str = "border",
                         inpainter: Inpainter | None = None, spec: AugmentSpec = AugmentSpec()) -> list[Image.Image]:
    """The customization set: the prepared original (centre crop, resized to ``resolution``) followed by
    ``count`` augmentations of it, as RGB PIL images of ``resolution``²."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidParameterError(f"the number of augmentations must be an integer >= 0, got {count!r}")
    if fill not in FILL_MODES:
        raise InvalidParameterError(f"fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
    spec.validate()
    original = center_crop_resize(load_image(image), int(resolution))
    base = pil_to_tensor(original)
    generator = torch.Generator().manual_seed(int(seed))
    out = [original]
    for _ in range(count):
        params = sample_params(generator, spec)
        out.append(tensor_to_pil(augment_image(base, params, fill, inpainter)))
    logger.info("customization set: original + %d augmentations (%s)", count,
                "inpainted" if inpainter is not None else f"{fill} fill")
    return out


def diffusers_inpainter(pipeline, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        seed: int = 0) -> Inpainter:
    """Adapt a diffusers ``StableDiffusionInpaintPipeline`` (e.g. SD2-inpainting) to :data:`Inpainter`.

    Each call draws from ``torch.Generator().manual_seed(seed + call index)``, so a set is reproducible.
    """
    calls = [0]

    def inpaint(image: Image.Image, mask: Image.Image) -> Image.Image:
        generator = torch.Generator().manual_seed(int(seed) + calls[0])
        calls[0] += 1
        result = pipeline(prompt=prompt, image=image, mask_image=mask, height=image.height, width=image.width,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=generator)
        return result.images[0]

    return inpaint


def load_inpainter(model_dir: str, device: str = "cpu", prompt: str = "", seed: int = 0) -> Inpainter:
    """An SD2-inpainting diffusers folder as an :data:`Inpainter` (no download: the folder must exist)."""
    from ..errors import ModelLoadError

    try:
        from diffusers import StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - library errors become one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the inpainting model {model_dir}: {first}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return diffusers_inpainter(pipe, prompt=prompt, seed=seed)

