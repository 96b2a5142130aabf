"""Sample inputs shared by the demo, the benchmarks, the load generator and warm-ups: the demo prompt, the
demo's reference photo (scikit-image's bundled astronaut, no download) and a synthetic image that needs
nothing at all."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

#: the prompt of the demo, the benchmarks and the doctor
DEMO_PROMPT = "a {S*} wearing sunglasses, oil painting"


def synthetic_reference_image(size: int = 256) -> Image.Image:
    """A deterministic RGB gradient: a valid reference image for warm-ups and dry runs (no optional package)."""
    y, x = np.mgrid[0:size, 0:size]
    scale = 255 / max(size - 1, 1)
    rgb = np.stack([x * scale, y * scale, (x + y) * scale / 2], -1)
    return Image.fromarray(rgb.round().astype("uint8"))


def demo_reference_image() -> Image.Image:
    """scikit-image's bundled astronaut photo (a face), as a PIL image; the synthetic image (with a warning)
    when scikit-image is not installed."""
    try:
        from skimage import data  # optional: the test and eval extras install scikit-image
    except ImportError:  # pragma: no cover - scikit-image is in the test extra
        logger.warning("scikit-image is not installed; using a synthetic reference image")
        return synthetic_reference_image()
    return Image.fromarray(data.astronaut())
