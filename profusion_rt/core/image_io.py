"""Reading, preparing and writing images.

Input images are accepted as a path, raw bytes, a PIL image or a numpy array and always come back as an
RGB ``PIL.Image``; anything unusable raises :class:`ImageError` with a one-line message naming the source.
Output images are written atomically (:func:`profusion_rt.core.fsio.atomic_write`).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from profusion_rt.core.errors import ImageError, InvalidParameterError, OutputPathError
from profusion_rt.core.fsio import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "center_crop_resize",
    "load_image",
    "pil_to_tensor",
    "png_info",
    "save_image",
    "tensor_to_pil",
    "to_uint8",
]

#: Largest image (width × height) :func:`load_image` accepts by default: 64 megapixels.
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Tolerance for float arrays slightly outside [0, 1] (rounding in upstream computations).
_FLOAT_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _check_size(image: Image.Image, name: str, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} ({_megapixels(width * height)}); "
            f"the limit is {_megapixels(max_pixels)} (max_pixels)"
        )


def _white_background(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white and return RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (transparency composited on white, high bit depths scaled to 8 bits)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _white_background(image)
    if mode == "L" and "transparency" in image.info:
        return _white_background(image)
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.size and values.max() > 255):
            values = values / 257.0  # 16-bit range 0..65535 → 0..255
        elif mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """An RGB/L/RGBA PIL image from an HxW, HxWx1, HxWx3 or HxWx4 array (uint8, or float in [0, 1])."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"{name} has shape {tuple(array.shape)}; expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name} has zero size ({array.shape[1]}x{array.shape[0]})")

    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.bool_:
        data = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64, copy=False)
        if not np.all(np.isfinite(values)):
            raise ImageError(f"{name} contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
            raise ImageError(
                f"{name} is a float array with values in [{low:.4g}, {high:.4g}]; expected values in [0, 1]"
            )
        data = to_uint8(values)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageError(
                f"{name} is a {array.dtype} array with values in [{low}, {high}]; expected uint8 values 0..255"
            )
        data = array.astype(np.uint8)
    else:
        raise ImageError(f"{name} has dtype {array.dtype}; expected uint8 or float in [0, 1]")

    data = np.ascontiguousarray(data)
    if data.ndim == 2:
        return Image.fromarray(data, mode="L")
    return Image.fromarray(data, mode="RGB" if data.shape[2] == 3 else "RGBA")


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; malformed EXIF data is ignored (with a warning)."""
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # broken EXIF blocks must not make an otherwise valid image unusable
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", name, _one_line(exc))
        return image
    return oriented if oriented is not None else image


def _decode(opener, name: str, max_pixels: int | None) -> Image.Image:
    """Open, size-check, fully decode and convert an encoded image; map every failure to ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with opener() as image:
                _check_size(image, name, max_pixels)  # before decoding: cheap rejection of huge images
                image.load()  # full decode; truncated files fail here (LOAD_TRUNCATED_IMAGES untouched)
                result = _to_rgb(_apply_exif_orientation(image, name))
                if result is image:
                    result = image.copy()  # detach from the file before it is closed
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name} is too large to decode safely ({_one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image file or its format is not supported") from exc
    except FileNotFoundError as exc:
        raise ImageError(f"image file {name} does not exist") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{name} is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageError(f"image file {name} cannot be read (permission denied)") from exc
    except MemoryError as exc:
        raise ImageError(f"{name} is too large to decode in memory") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        message = _one_line(exc)
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            raise ImageError(f"{name} is truncated or incomplete ({message})") from exc
        raise ImageError(f"{name} cannot be decoded as an image ({message})") from exc
    _check_size(result, name, max_pixels)  # EXIF rotation keeps the pixel count; checks zero size again
    return result


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as an RGB ``PIL.Image``.

    ``source`` is a path (``str`` or ``os.PathLike``), the encoded bytes of an image file, a PIL image or a
    numpy array (HxW, HxWx1, HxWx3 or HxWx4; uint8, or float in [0, 1]). Grayscale, palette, LA and RGBA
    images are converted (transparency composited on white); EXIF orientation of files is applied; the
    first frame of an animation is used. Images with more than ``max_pixels`` pixels (default 64 megapixels;
    ``None`` for no limit of our own — PIL's decompression-bomb limit still applies) are refused.

    Raises :class:`ImageError` (one line, naming the file) for a missing file, a directory, a file that is
    not an image, a truncated file, a zero-size image or an image that is too large.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0):
        raise InvalidParameterError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")

    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source)).expanduser()
        name = str(path)
        try:
            if not path.exists():
                raise ImageError(f"image file {name} does not exist")
            if path.is_dir():
                raise ImageError(f"{name} is a directory, not an image file")
            if path.stat().st_size == 0:
                raise ImageError(f"image file {name} is empty (0 bytes)")
        except OSError as exc:
            raise ImageError(f"image file {name} cannot be accessed: {_one_line(exc)}") from exc
        image = _decode(lambda: Image.open(path), name, max_pixels)
        logger.debug("loaded %s (%dx%d)", name, *image.size)
        return image

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"image data ({len(data)} bytes)"
        if not data:
            raise ImageError("image data is empty (0 bytes)")
        return _decode(lambda: Image.open(io.BytesIO(data)), name, max_pixels)

    if isinstance(source, Image.Image):
        name = "image"
        _check_size(source, name, max_pixels)
        try:
            source.load()  # a lazily opened image may still fail to decode
        except Exception as exc:
            raise ImageError(f"{name} cannot be decoded ({_one_line(exc)})") from exc
        result = _to_rgb(source)
        return result.copy() if result is source else result

    if isinstance(source, np.ndarray):
        name = "image array"
        image = _array_to_image(source, name)
        _check_size(image, name, max_pixels)
        return _to_rgb(image)

    raise ImageError(
        f"cannot load an image from a {type(source).__name__}; expected a path, bytes, a PIL image or a numpy array"
    )


# --------------------------------------------------------------------------------------------------
# Geometry and conversion
# --------------------------------------------------------------------------------------------------


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the centred square of side ``min(w, h)`` (offsets ``((w-s)//2, (h-s)//2)``), resize to ``size``².

    Resizing uses LANCZOS. The input is not modified.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidParameterError(f"size must be a positive integer, got {size!r}")
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(image).__name__}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), resample=Image.Resampling.LANCZOS)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 tensor of shape ``(3, H, W)`` with values in [0, 1] (non-RGB images are converted first)."""
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(image).__name__}")
    rgb = _to_rgb(image)
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)


def to_uint8(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """``round(clamp(x, 0, 1) * 255)`` as uint8, same shape. NaN becomes 0."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        logger.warning("image contains NaN or infinite values; they are written as 0 or clamped")
        values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """An RGB (or L) PIL image from a ``(3, H, W)``/``(1, H, W)`` tensor, or a batch of one, in [0, 1]."""
    if not isinstance(tensor, torch.Tensor):
        raise ImageError(f"expected a torch tensor, got {type(tensor).__name__}")
    t = tensor
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ImageError(f"expected a single image, got a batch of {t.shape[0]} (shape {tuple(t.shape)})")
        t = t[0]
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ImageError(f"expected an image tensor of shape (3, H, W) or (1, H, W), got {tuple(tensor.shape)}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ImageError(f"image tensor has zero size {tuple(tensor.shape)}")
    array = to_uint8(t.permute(1, 2, 0))
    if array.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _format_for(path: Path) -> str:
    extension = path.suffix.lower()
    formats = Image.registered_extensions()
    if not extension or extension not in formats:
        raise OutputPathError(
            f"cannot tell the image format of {path}: use an extension such as .png, .jpg or .webp"
        )
    return formats[extension]


def png_info(metadata: dict[str, str] | None):
    """A ``PIL.PngImagePlugin.PngInfo`` holding ``metadata`` as PNG text chunks (``None`` for none), e.g.
    ``{"weights": "random (preset tiny)"}`` (:func:`profusion_rt.core.presets.weights_label`)."""
    if not metadata:
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), str(value))
    return info


def save_image(image: Image.Image | torch.Tensor | np.ndarray, path: str | os.PathLike,
               metadata: dict[str, str] | None = None, **save_options) -> Path:
    """Write an image to ``path`` atomically and return the path.

    The format follows the extension. The parent folder is created; the image is written to a temporary
    file in the same folder, then moved into place with ``os.replace`` (readers never see a partial file).
    A tensor is converted with :func:`tensor_to_pil`, an array with :func:`load_image`. ``save_options`` go
    to ``PIL.Image.save`` (e.g. ``quality=95``). ``metadata`` becomes PNG text chunks (ignored for other
    formats). Failures raise :class:`OutputPathError` with one line.
    """
    target = Path(os.fspath(path)).expanduser()
    if isinstance(image, torch.Tensor):
        image = tensor_to_pil(image)
    elif isinstance(image, np.ndarray):
        image = load_image(image, max_pixels=None)
    elif not isinstance(image, Image.Image):
        raise OutputPathError(f"cannot save a {type(image).__name__} to {target}; expected a PIL image")
    image_format = _format_for(target)
    if metadata and image_format == "PNG" and "pnginfo" not in save_options:
        save_options["pnginfo"] = png_info(metadata)
    if image_format in ("JPEG", "MPO") and image.mode not in ("RGB", "L", "CMYK"):
        image = _to_rgb(image)
    if target.is_dir():
        raise OutputPathError(f"cannot write image to {target}: it is a directory")

    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create output folder {folder}: {_one_line(exc)}") from exc

    def write(temp: Path) -> None:
        with open(temp, "wb") as fh:
            image.save(fh, format=image_format, **save_options)

    atomic_write(target, write, what="image", errors=(OSError, ValueError, KeyError, TypeError))
    logger.debug("wrote %s (%dx%d, %s)", target, image.width, image.height, image_format)
    return target
