"""The outputs of ``profusion-rt eval``: ``eval.json``, ``eval.md`` (Markdown tables), ``grid.png`` (the
reference and every set's images side by side) and, for generated sets, ``images/<set>/<item>.png``.

JSON has no infinity: an infinite PSNR (identical images) is written as ``null`` and the report's
``notes`` say so; the Markdown tables print it as ``inf``. Every file is written atomically (temporary
file, then rename) and only after every figure is computed, so a failed run leaves no half-written output.
"""

from __future__ import annotations

import io
import math
import platform
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from profusion_rt.core.fsio import atomic_write_bytes
from profusion_rt.core.errors import OutputPathError
from profusion_rt.core.image_io import png_info

INF_NOTE = "psnr_db null = identical images (infinite PSNR); JSON has no infinity"


def json_safe(value: Any) -> Any:
    """``inf``/``nan`` floats -> ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}; Python {platform.python_version()}"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The fidelity and quality tables of a report (before :func:`json_safe`)."""
    lines = [f"Machine: {report['machine']}. {report['conditions']}", ""]
    summaries = report["summary"]
    fid = [s for s in summaries if s["set"] != report["reference_set"]]
    if fid:
        lines += ["Fidelity against the reference set "
                  f"`{report['reference_set']}` (same seeds; worst item; status thresholds: PSNR >= "
                  f"{report['thresholds']['psnr_min']:g} dB and SSIM >= {report['thresholds']['ssim_min']:g}):", "",
                  "| set | status | PSNR min (dB) | SSIM min | CLIP-I vs reference set min | latent max rel. err "
                  "| latent mean rel. err | generation s (first call incl.) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s in fid:
            lines.append(f"| {s['set']} | {s['status']} | {_fmt(s.get('psnr_db_min'), 1)} | {_fmt(s.get('ssim_min'))} "
                         f"| {_fmt(s.get('clip_i_pair_min'))} | {_fmt(s.get('latent_max_rel'))} "
                         f"| {_fmt(s.get('latent_mean_rel'))} | {_fmt(s.get('seconds'), 2)} |")
        lines.append("")
    keys = [k for k in ("clip_t_mean", "clip_i_mean", "dino_mean", "face_mean") if any(k in s for s in summaries)]
    names = {"clip_t_mean": "CLIP-T", "clip_i_mean": "CLIP-I", "dino_mean": "DINO", "face_mean": "face identity"}
    lines += ["Quality (mean over images; " + report["quality_note"] + "):", "",
              "| set | images | " + " | ".join(names[k] for k in keys) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for s in summaries:
        lines.append(f"| {s['set']} | {s['images']} | " + " | ".join(_fmt(s.get(k)) for k in keys) + " |")
    if report.get("notes"):
        lines += [""] + [f"* {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def grid(reference: Image.Image, sets: Sequence[Any], items: Sequence[Any], cell: int = 160) -> Image.Image:
    """Rows: items; columns: the reference image, then every set's image of that item (blank when skipped)."""
    label_h = 16
    columns = 1 + len(sets)
    canvas = Image.new("RGB", (columns * cell, label_h + len(items) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(["reference"] + [s.name for s in sets]):
        draw.text((c * cell + 4, 2), name[:24], fill="black")
    ref = reference.convert("RGB").resize((cell, cell))
    for r, item in enumerate(items):
        top = label_h + r * cell
        canvas.paste(ref, (0, top))
        for c, s in enumerate(sets, start=1):
            image = s.images[item.index] if item.index < len(s.images) else None
            if image is not None:
                canvas.paste(image.convert("RGB").resize((cell, cell)), (c * cell, top))
    return canvas


def png_bytes(image: Image.Image, metadata: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


def write_outputs(out: str | Path, report: dict[str, Any], grid_image: Image.Image,
                  images: dict[str, bytes]) -> list[Path]:
    """Write the report's files under ``out``, each atomically: ``images`` (relative path -> PNG bytes)
    first, then ``grid.png``, ``eval.md`` and last ``eval.json``."""
    import json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    written = []
    try:
        for rel, data in images.items():
            written.append(atomic_write_bytes(out / rel, data))
        written.append(atomic_write_bytes(out / "grid.png", png_bytes(grid_image)))
        written.append(atomic_write_bytes(out / "eval.md", markdown(report).encode()))
        text = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
        written.append(atomic_write_bytes(out / "eval.json", text.encode()))
    except OSError as exc:
        raise OutputPathError(f"cannot write the evaluation to {out}: {exc.strerror or exc}") from exc
    return written
