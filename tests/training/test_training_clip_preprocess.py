"""The reference's CLIP preprocessing, in training and in sampling, is the official code's: torchvision
``Resize(224, BICUBIC)`` on a [0, 1] tensor with ``antialias`` unset, which in the official environment
(torchvision 0.15, May 2023) did NOT antialias tensors; then OpenAI-CLIP normalisation. Pinned against an
independent ``torch.nn.functional.interpolate`` computation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from skimage import data as skdata

from profusion_rt.core.image_io import center_crop_resize, load_image, pil_to_tensor
from profusion_rt.models.vision import CLIP_ANTIALIAS, clip_preprocess
from profusion_rt.training import SubjectImageDataset, TrainConfig, Trainer

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _official(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    # torchvision's tensor resize: float32 interpolate, bicubic, align_corners=False, no clamp for floats
    y = F.interpolate(x.float(), size=[size, size], mode="bicubic", align_corners=False, antialias=antialias)
    return (y - MEAN) / STD


def test_clip_resize_is_not_antialiased_like_the_official_torchvision():
    assert CLIP_ANTIALIAS is False
    x = pil_to_tensor(center_crop_resize(load_image(skdata.astronaut()), 512))[None]
    ours = clip_preprocess(x, 224)
    torch.testing.assert_close(ours, _official(x, 224), rtol=0, atol=1e-6)
    # the choice matters: an antialiased resize moves the input by several percent
    other = _official(x, 224, antialias=True)
    assert (ours - other).norm() / other.norm() > 0.02
    # the half-precision official path (fp16 tensors are resized in float32 by torchvision) agrees too
    torch.testing.assert_close(clip_preprocess(x.half(), 224), _official(x.half().float(), 224), rtol=0, atol=1e-6)


def test_sampling_and_training_use_it(tiny_pipe):
    size = int(tiny_pipe.image_encoder.config.image_size)
    photo = skdata.chelsea()
    ref = tiny_pipe.encode_reference(photo, mode="mean")
    pixels = pil_to_tensor(center_crop_resize(load_image(photo), tiny_pipe.resolution))[None]
    with torch.no_grad():
        expected = tiny_pipe.image_encoder(pixel_values=_official(pixels, size)).last_hidden_state
        antialiased = tiny_pipe.image_encoder(pixel_values=_official(pixels, size, True)).last_hidden_state
    torch.testing.assert_close(ref.image_tokens, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref.image_tokens, antialiased, rtol=1e-5, atol=1e-5)

    pipe = copy.deepcopy(tiny_pipe)
    trainer = Trainer(pipe, SubjectImageDataset([photo], pipe.resolution), TrainConfig(batch_size=1))
    torch.testing.assert_close(trainer.draw_batch()["tokens"], expected, rtol=1e-5, atol=1e-5)
