"""Image metrics of ``profusion-rt eval``: pixel fidelity (PSNR, SSIM), latent error, and the paper's
embedding similarities (CLIP-T, CLIP-I, DINO, face identity).

Every similarity is the cosine of two embeddings. Embedders:

* :class:`ClipEmbedder`: the model's own CLIP towers. With the projection layers (a transformers
  ``CLIPModel`` folder such as the released checkpoint's ``openclip``) the embeddings are CLIP's: pooled
  tower output -> ``visual_projection`` / ``text_projection``, as the paper's CLIP-I and CLIP-T. Without
  them (our model layout keeps the towers only) CLIP-I is the cosine of the vision tower's pooled output
  (post-layernorm class token: a different space from the paper's, so not comparable to its figures) and
  CLIP-T is not available (the two towers' pooled outputs live in unrelated spaces).
* :class:`DinoEmbedder`: a transformers DINO (``ViTModel``) or DINOv2 (``Dinov2Model``) folder; the class
  token of the last hidden state.
* :class:`FaceEmbedder`: a face-embedding ONNX model (e.g. an ArcFace export) on onnxruntime. The whole
  image is the face crop (no detector): resized to the model's input size, scaled as ``(x - 127.5) / 127.5``.
  An image the model cannot be fed is skipped with a reason.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from profusion_rt.core.errors import InvalidParameterError, ModelLoadError
from profusion_rt.core.image_io import center_crop_resize, pil_to_tensor
from profusion_rt.models.text import run_text_layers, token_embeddings
from profusion_rt.models.tokenizer import load_default_tokenizer
from profusion_rt.models.vision import clip_preprocess

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- pixels and latents ------------------------------------------------------------------------------------------

def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return array


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise InvalidParameterError(f"cannot compare images of different sizes: {a.shape} and {b.shape}")


def psnr(image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over 8-bit RGB values (peak 255); ``inf`` for identical images."""
    a, b = as_uint8(image).astype(np.float64), as_uint8(reference).astype(np.float64)
    _same_shape(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray) -> float:
    """Structural similarity of two 8-bit RGB images (scikit-image's ``structural_similarity``, 7x7 window,
    channels averaged); 1 for identical images."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:  # pragma: no cover - scikit-image is in the eval extra
        raise InvalidParameterError("SSIM needs scikit-image: pip install 'profusion-rt[eval]'") from None
    a, b = as_uint8(image), as_uint8(reference)
    _same_shape(a, b)
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def latent_relative_error(latents: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |a - b| / max |b|, mean |a - b| / mean |b|) in float64."""
    a, b = latents.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != b.shape:
        raise InvalidParameterError(f"cannot compare latents of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).abs()
    return (float(diff.max() / b.abs().max().clamp(min=1e-30)),
            float(diff.mean() / b.abs().mean().clamp(min=1e-30)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two 1-D embeddings, computed in float64."""
    a, b = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _square_pixels(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = pil_to_tensor(center_crop_resize(image.convert("RGB"), size))
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return ((x - m) / s)[None]


# -- CLIP ----------------------------------------------------------------------------------------------------------

class ClipEmbedder:
    """Image and text embeddings from CLIP towers; see the module docstring for the two variants.

    ``text_tower``: a transformers CLIP text tower (``CLIPTextModel`` or ``CLIPModel.text_model``);
    ``vision_tower``: ``CLIPVisionModel`` or ``CLIPModel.vision_model``; ``text_projection`` and
    ``visual_projection``: the ``CLIPModel``'s projection layers, or ``None``.
    """

    def __init__(self, tokenizer, text_tower, vision_tower, text_projection=None, visual_projection=None,
                 source: str = ""):
        self.tokenizer = tokenizer
        self.text_tower, self.vision_tower = text_tower, vision_tower
        self.text_projection, self.visual_projection = text_projection, visual_projection
        self.source = source

    @property
    def projected(self) -> bool:
        return self.text_projection is not None and self.visual_projection is not None

    @property
    def note(self) -> str:
        if self.projected:
            return f"CLIP embeddings with projections ({self.source})"
        return (f"no CLIP projection layers in {self.source}: CLIP-I is the cosine of the vision tower's pooled "
                "output (not comparable to the paper's figures) and CLIP-T is not available; pass --clip with a "
                "transformers CLIPModel folder (e.g. the released checkpoint's openclip) for the paper's metrics")

    @classmethod
    def from_pipeline(cls, pipe) -> "ClipEmbedder":
        """The pipeline's own towers; projections when the pipeline carries them (``text_projection`` /
        ``visual_projection`` attributes), else none."""
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.image_encoder,
                   getattr(pipe, "text_projection", None), getattr(pipe, "visual_projection", None),
                   source=f"the model ({getattr(pipe, 'preset', None) or 'folder'})")

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer=None) -> "ClipEmbedder":
        """A transformers ``CLIPModel`` folder (towers and projections; e.g. a released ``openclip``)."""
        from transformers import CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"CLIP folder {folder} has no config.json (expected a transformers CLIPModel folder)")
        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().float()
        except Exception as exc:  # noqa: BLE001 - any library failure is one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load a CLIPModel from {folder}: {first}") from exc
        if tokenizer is None:

            tokenizer = load_default_tokenizer()
        return cls(tokenizer, model.text_model, model.vision_model, model.text_projection, model.visual_projection,
                   source=str(folder))

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) embeddings of ``images`` (centre square, bicubic resize to the tower's size, CLIP norm)."""

        tower = self.vision_tower
        size = int(tower.config.image_size)
        param = next(tower.parameters())
        out = []
        for image in images:
            square = center_crop_resize(image.convert("RGB"), min(image.size))  # the centred square, as is
            pixels = clip_preprocess(pil_to_tensor(square)[None], size).to(param.device, param.dtype)
            pooled = tower(pixel_values=pixels).pooler_output
            if self.visual_projection is not None:
                pooled = self.visual_projection(pooled)
            out.append(pooled.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor | None:
        """(N, D) embeddings of ``texts`` (last layer, final layer norm, end-of-text token, projection);
        ``None`` without projection layers."""
        if not self.projected:
            return None

        tower = self.text_tower
        param = next(tower.parameters())
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(param.device)
        hidden = run_text_layers(tower, token_embeddings(tower, ids), skip_layers=0)
        eos = self.tokenizer.eos_token_id
        position = (ids == eos).int().argmax(-1) if eos is not None else ids.argmax(-1)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), position]
        return self.text_projection(pooled).float().cpu()


# -- DINO ----------------------------------------------------------------------------------------------------------

class DinoEmbedder:
    """Class-token embeddings of a DINO (``ViTModel``) or DINOv2 (``Dinov2Model``) transformers folder."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"DINO model folder {folder} does not exist")
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"DINO model folder {folder} has no readable config.json: {exc}") from None
        kind = config.get("model_type")
        from transformers import Dinov2Model, ViTModel

        classes = {"dinov2": Dinov2Model, "vit": ViTModel}
        if kind not in classes:
            raise ModelLoadError(f"DINO model folder {folder}: model_type {kind!r} is not dinov2 or vit")
        try:
            self.model = classes[kind].from_pretrained(str(folder), local_files_only=True).eval().float()
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load the DINO model from {folder}: {first}") from exc
        pre = {}
        if (folder / "preprocessor_config.json").is_file():
            try:
                pre = json.loads((folder / "preprocessor_config.json").read_text())
            except (OSError, ValueError):
                pre = {}
        crop = pre.get("crop_size") or pre.get("size") or config.get("image_size", 224)
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge") or 224
        self.size = int(crop)
        self.mean = tuple(pre.get("image_mean", IMAGENET_MEAN))
        self.std = tuple(pre.get("image_std", IMAGENET_STD))
        self.source = str(folder)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = [self.model(pixel_values=_square_pixels(im, self.size, self.mean, self.std)).last_hidden_state[:, 0]
               for im in images]
        return torch.cat(out).float()


# -- face identity ---------------------------------------------------------------------------------------------

@dataclass
class FaceEmbedding:
    vector: np.ndarray | None
    reason: str | None = None  # why the image was skipped


class FaceEmbedder:
    """A face-embedding ONNX model on onnxruntime's CPU provider. The whole image is the face crop."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"face-embedding model {path} does not exist")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError("the face-embedding model needs onnxruntime: "
                                 "pip install 'profusion-rt[onnx]'") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load the face-embedding model {path}: {first}") from exc
        inputs = self.session.get_inputs()
        self.input = inputs[0]
        self.source = str(path)
        self.problem = self._check_input(inputs)

    def _check_input(self, inputs) -> str | None:
        """Why this model's input cannot be fed an RGB image, or None. Sets the layout and size."""
        if len(inputs) != 1:
            return f"the model takes {len(inputs)} inputs, expected one image tensor"
        if self.input.type != "tensor(float)":
            return f"the model's input is {self.input.type}, expected tensor(float)"
        shape = list(self.input.shape)
        if len(shape) != 4:
            return f"the model's input has shape {shape}, expected 4 axes (NCHW or NHWC)"
        if shape[1] == 3:
            self.layout, hw = "NCHW", shape[2:]
        elif shape[3] == 3:
            self.layout, hw = "NHWC", shape[1:3]
        else:
            return f"the model's input shape {shape} has no axis of 3 colour channels"
        self.height, self.width = (int(d) if isinstance(d, int) and d > 0 else 112 for d in hw)
        return None

    def embed(self, image: Image.Image) -> FaceEmbedding:
        if self.problem is not None:
            return FaceEmbedding(None, self.problem)

        side = min(self.height, self.width)
        crop = center_crop_resize(image.convert("RGB"), side).resize((self.width, self.height))
        x = (np.asarray(crop, dtype=np.float32) - 127.5) / 127.5
        x = x[None] if self.layout == "NHWC" else x.transpose(2, 0, 1)[None]
        try:
            out = self.session.run(None, {self.input.name: np.ascontiguousarray(x)})[0]
        except Exception as exc:  # noqa: BLE001 - the model refused this input
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return FaceEmbedding(None, f"the model could not be run on this image: {first[:200]}")
        vector = np.asarray(out, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            return FaceEmbedding(None, "the model returned a zero or non-finite embedding")
        return FaceEmbedding(vector)


def face_similarity(a: FaceEmbedding, b: FaceEmbedding) -> tuple[float | None, str | None]:
    if a.vector is None or b.vector is None:
        return None, a.reason or b.reason
    if a.vector.shape != b.vector.shape:
        return None, "embeddings of different sizes"
    return cosine(torch.from_numpy(a.vector), torch.from_numpy(b.vector)), None
