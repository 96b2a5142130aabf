"""The toy-faces data: scikit-image's bundled ``lfw_subset()`` (no download), its split, the prompts, and the
face measures the tests, the demo and the training report share (docs/toy-faces.md).

``lfw_subset()`` holds 200 grayscale 25x25 images: the first 100 are faces (LFW), the last 100 are not
(patches of other images). The set carries no names, so every face is its own identity; the last
:data:`HELD_OUT` faces are never seen by any training stage and serve as the customization subjects.
Images become RGB (the gray value replicated in the three channels: every part of the runtime, the VAE,
CLIP's preprocessing and the image files are RGB) and are upsampled to 32x32 by the training data's own
preprocessing (LANCZOS, :class:`~profusion_rt.training.data.SubjectImageDataset`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from profusion_rt.training.data import SubjectImageDataset

#: Number of faces in ``lfw_subset()`` (the first images); the rest are non-faces.
FACES = 100
#: Faces kept out of every training stage (the last ten): the customization subjects of tests and demo.
HELD_OUT = tuple(range(90, 100))
TRAIN_FACES = tuple(range(0, 90))
NON_FACES = tuple(range(100, 200))
#: Prompts the UNet learned for faces (the fusion sampler's class prompt "a photo of person" among them).
FACE_PROMPTS = ("a photo of a person", "a photo of a face", "a portrait of a person", "a photo of person")
#: Prompts the UNet learned for the non-face patches.
OTHER_PROMPTS = ("a photo of a background", "a photo of a texture")
#: The prompt of the demo and the tests for toy-faces (ProFusion's S* in a face prompt).
TOY_PROMPT = "a photo of {S*}"
#: The plain face prompt of the base-model images.
FACE_PROMPT = FACE_PROMPTS[0]
RESOLUTION = 32


def lfw_arrays() -> np.ndarray:
    """The 200 images of ``skimage.data.lfw_subset()``, float (200, 25, 25) in [0, 1]."""
    from skimage import (
        data,  # deferred: scikit-image is an optional (test / eval) dependency
    )

    return np.asarray(data.lfw_subset(), dtype=np.float64)


def to_rgb_image(gray: np.ndarray) -> Image.Image:
    """A [0, 1] grayscale array as an RGB PIL image (the value in all three channels)."""
    u8 = np.clip(np.round(gray * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(u8[:, :, None], 3, axis=2))


def images(indices, arrays: np.ndarray | None = None) -> list[Image.Image]:
    arrays = lfw_arrays() if arrays is None else arrays
    return [to_rgb_image(arrays[i]) for i in indices]


def held_out_face(k: int = 0) -> Image.Image:
    """The ``k``-th held-out face (RGB, 25x25: the pipeline resizes references itself)."""
    return images([HELD_OUT[k]])[0]


def prepared(images_: list[Image.Image], resolution: int = RESOLUTION) -> torch.Tensor:
    """Images prepared exactly as the training data (centre crop, LANCZOS to ``resolution``), (N, 3, R, R)
    float in [0, 1]."""
    return SubjectImageDataset(images_, resolution).pixels(range(len(images_)))


def gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) or (N, H, W, 3) [0, 1] images -> (N, H*W) gray values (the channel mean)."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.mean(dim=1).flatten(1)


def mean_face(resolution: int = RESOLUTION) -> torch.Tensor:
    """The mean of the training faces, (H*W,) gray."""
    return gray(prepared(images(TRAIN_FACES), resolution)).mean(0)


def face_distance(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image root-mean-square gray-level distance (0..1) of images ``x`` to one ``reference`` (H*W,):
    the measure of "looks like a face" (reference = the mean training face) and of identity (reference =
    the subject's own face)."""
    return ((gray(x) - reference[None]) ** 2).mean(1).sqrt()


def face_correlation(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image Pearson correlation (-1..1) of the gray levels of images ``x`` with one ``reference``
    (H*W,): the measure of "looks like a face" with the mean training face as the reference (training
    faces score about 0.8, noise about 0, a flat image 0)."""
    a = gray(x)
    a = a - a.mean(1, keepdim=True)
    b = (reference - reference.mean())[None]
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
