"""``profusion-rt demo``: the README's main job on the embedded tiny preset (random weights).

Generates one ProFusion image from scikit-image's bundled astronaut photo with the eager reference
pipeline, writes it, and prints the timing. (The runtime issue extends this with export, every available
backend and a parity and speed table.)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_PROMPT = "a {S*} wearing sunglasses, oil painting"


def demo_reference_image():
    """scikit-image's bundled astronaut photo (a face), as a PIL image; no download."""
    from PIL import Image

    try:
        from skimage import data
    except ImportError:  # pragma: no cover - scikit-image is in the test extra
        import numpy as np

        logger.warning("scikit-image is not installed; using a synthetic reference image")
        y, x = np.mgrid[0:256, 0:256]
        arr = np.stack([x, y, (x + y) // 2], -1).astype("uint8")
        return Image.fromarray(arr)
    return Image.fromarray(data.astronaut())


def run_demo(args: argparse.Namespace) -> int:
    from .image_io import save_image
    from .pipeline import ProFusionPipeline

    out = Path(args.out)
    pipe = ProFusionPipeline.from_preset("tiny", seed=0)
    reference = demo_reference_image()
    start = time.perf_counter()
    result = pipe(reference_image=reference, prompt=DEMO_PROMPT, num_inference_steps=args.steps, seed=args.seed)
    elapsed = time.perf_counter() - start
    path = save_image(result.images[0], out / "profusion_tiny_eager.png")
    save_image(reference, out / "reference.png")
    print(f"eager reference: {args.steps} steps with 1 fusion step in {elapsed:.2f} s")
    print(f"image written to {path.resolve()}")
    return 0
