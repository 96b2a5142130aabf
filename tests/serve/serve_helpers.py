"""Helpers of the serving tests (imported by the test modules of this folder)."""

from __future__ import annotations

import io
import re

import numpy as np

STEPS = 1  # denoising steps of most test requests: the serving logic, not the model, is under test


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def expected_array(runtime, reference_png: bytes, **kwargs) -> np.ndarray:
    """What the server should answer: the runtime's image for the same request, as uint8."""
    from profusion_rt.core.image_io import to_uint8

    kwargs.setdefault("num_inference_steps", STEPS)
    out = runtime(output_type="np", reference_image=reference_png, **kwargs)
    return to_uint8(out.images[0])


def assert_close_images(a: np.ndarray, b: np.ndarray, tol: int = 3) -> None:
    """Equal up to float rounding of batched vs single runs (a few 8-bit levels)."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= tol, f"images differ by up to {diff.max()} levels (mean {diff.mean():.3f})"


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return 0.0


def generate_fields(**overrides) -> dict[str, str]:
    fields = {"prompt": "a {S*} wearing sunglasses", "num_inference_steps": str(STEPS), "seed": "0"}
    fields.update({k: str(v) for k, v in overrides.items()})
    return fields
