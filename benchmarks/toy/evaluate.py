"""What the toy-faces model does, measured (docs/toy-faces.md): do its images look like faces, and does
customization on a held-out face bring the images closer to that face, on every backend.

Measures (gray levels in [0, 1], 32x32, :func:`~profusion_rt.benchmarks.toy.faces.face_distance`):

* **face-likeness**: Pearson correlation of an image's gray levels with the mean training face (training
  faces: about 0.8; noise and flat images: about 0). Images of the base model for a face prompt should
  correlate clearly more than noise images (Gaussian noise around the mean face's gray level, uniform
  noise) and than the model's own images for a non-face prompt.
* **identity**: RMS distance of ProFusion images ("a photo of {S*}", the face as reference) to the subject's
  own face (its 32x32 preparation), for the pre-trained model (PromptNet only: the *base*) and for the
  same model customized on that face (our customization code, :func:`profusion_rt.training.customize`),
  same prompt, same seeds. Customization should lower it.

The customization here is short (:data:`CUSTOMIZE_STEPS` steps on the face alone): enough to move the
identity, cheap enough for a unit test.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from profusion_rt.benchmarks.toy import faces
from profusion_rt.export.cache import export_artifacts

from profusion_rt.core.errors import BackendUnavailableError
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import create_runtime
from profusion_rt.training.jobs import customize
from profusion_rt.training.trainer import TrainConfig

logger = logging.getLogger(__name__)

PRESET = "toy-faces"
#: Sampling settings of the toy-faces figures, tests and demo: 20 DDIM steps, one fusion step, and the three
#: guidance scales at 3 instead of ProFusion's 7/5/7 (at 7 this small model's images become high-contrast
#: caricatures: white face, black background; docs/toy-faces.md).
SAMPLING: dict[str, Any] = {"num_inference_steps": 20, "fusion_steps": 1, "guidance_scale": 3.0,
                            "reference_guidance_scale": 3.0, "fusion_guidance_scale": 3.0}
SEEDS = (0, 1, 2, 3)
#: Customization of the figures, tests and demo: 100 steps at 1e-3 on the face alone. The official run
#: adds augmentations inpainted by SD2-inpainting; without that model they are border-filled shifted and
#: scaled copies, and on 32x32 faces they teach position and borders, not the face (docs/toy-faces.md).
CUSTOMIZE_STEPS = 100
CUSTOMIZE_LR = 1e-3
CUSTOMIZE_AUGMENTATIONS = 0


def toy_pipeline() -> ProFusionPipeline:
    """The shipped toy-faces model (fresh: customization changes a pipeline in place)."""
    pipe = ProFusionPipeline.from_preset(PRESET)
    pipe.progress_bar = False
    return pipe


def generate(runner, prompt: str, seeds: Sequence[int], reference=None, **sampling) -> torch.Tensor:
    """Images (N, 3, R, R) in [0, 1] from a pipeline or runtime, one per seed."""
    kwargs = {**SAMPLING, **sampling}
    out = []
    for seed in seeds:
        res = runner(prompt=prompt, reference_image=reference, seed=int(seed), output_type="np", **kwargs)
        img = np.asarray(res.images[0], dtype=np.float32)
        out.append(torch.from_numpy(img).permute(2, 0, 1) if img.shape[-1] == 3 else torch.from_numpy(img))
    return torch.stack(out)


def customize_on(pipe: ProFusionPipeline, face: Image.Image, steps: int = CUSTOMIZE_STEPS,
                 lr: float = CUSTOMIZE_LR, augmentations: int = CUSTOMIZE_AUGMENTATIONS, seed: int = 0):
    """Customize ``pipe`` in place on ``face`` with our training code (no output folder)."""
    config = TrainConfig.customization(learning_rate=lr, seed=seed)
    return customize(pipe, face, None, steps, config, num_augmentations=augmentations, progress=False)


def subject_face(face: Image.Image) -> torch.Tensor:
    """The subject's face as the model sees it: (H*W,) gray at the model's resolution."""
    return faces.gray(faces.prepared([face]))[0]


def noise_images(n: int, seed: int = 0, resolution: int = faces.RESOLUTION) -> dict[str, torch.Tensor]:
    """Noise baselines (N, 3, R, R): Gaussian around the mean face's gray level and its std, and uniform."""
    g = torch.Generator().manual_seed(seed)
    m = faces.mean_face(resolution)
    gauss = (m.mean() + m.std() * torch.randn(n, 1, resolution, resolution, generator=g)).clamp(0, 1)
    uniform = torch.rand(n, 1, resolution, resolution, generator=g)
    return {"gaussian noise": gauss.expand(-1, 3, -1, -1), "uniform noise": uniform.expand(-1, 3, -1, -1)}


def face_likeness(pipe: ProFusionPipeline, seeds: Sequence[int] = SEEDS) -> dict[str, float]:
    """Mean correlation with the mean training face (:func:`~profusion_rt.benchmarks.toy.faces.face_correlation`)
    of: the model's images for the face prompt and for a non-face prompt, noise, and training faces."""
    m = faces.mean_face(pipe.resolution)
    sets = {
        f"model, '{faces.FACE_PROMPT}'": generate(pipe, faces.FACE_PROMPT, seeds),
        f"model, '{faces.OTHER_PROMPTS[0]}'": generate(pipe, faces.OTHER_PROMPTS[0], seeds),
        **noise_images(len(seeds)),
        "training faces (for scale)": faces.prepared(faces.images(faces.TRAIN_FACES[:16])),
    }
    return {name: float(faces.face_correlation(x, m).mean()) for name, x in sets.items()}


def identity_row(base: ProFusionPipeline, custom: ProFusionPipeline, face: Image.Image,
                 seeds: Sequence[int] = SEEDS, runners: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """Distances to the subject's own face of base and customized ProFusion images (same prompt and seeds),
    per backend (``runners``: name -> (base runner, customized runner); default: eager only)."""
    own = subject_face(face)
    runners = runners or {"eager": (base, custom)}
    row: dict[str, Any] = {}
    for name, (rb, rc) in runners.items():
        xb = generate(rb, faces.TOY_PROMPT, seeds, reference=face)
        xc = generate(rc, faces.TOY_PROMPT, seeds, reference=face)
        row[name] = {"base": float(faces.face_distance(xb, own).mean()),
                     "customized": float(faces.face_distance(xc, own).mean()),
                     "_base_images": xb, "_custom_images": xc}
    return row


def to_pil_grid(rows: Sequence[Sequence[torch.Tensor]], scale: int = 4, pad: int = 2) -> Image.Image:
    """A grid image from rows of (3, R, R) [0, 1] tensors, each cell upscaled ``scale`` x (nearest)."""
    r = rows[0][0].shape[-1] * scale
    cols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (cols * (r + pad) + pad, len(rows) * (r + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            cell = Image.fromarray(arr).resize((r, r), Image.NEAREST)
            canvas.paste(cell, (pad + j * (r + pad), pad + i * (r + pad)))
    return canvas


def identity_figures(out: Path, faces_used: Sequence[int] = range(len(faces.HELD_OUT)),
                     seeds: Sequence[int] = SEEDS) -> dict[str, Any]:
    """The report's identity figures on the held-out faces (eager): writes ``identity.json`` and
    ``identity_grid.png`` (per face: reference, 4 base images, 4 customized images) under ``out``."""
    start = time.perf_counter()
    base = toy_pipeline()
    likeness = face_likeness(base, seeds)
    rows, grid = [], []
    for k in faces_used:
        face = faces.held_out_face(k)
        custom = toy_pipeline()
        t0 = time.perf_counter()
        customize_on(custom, face)
        seconds = time.perf_counter() - t0
        r = identity_row(base, custom, face, seeds)["eager"]
        others = [subject_face(faces.held_out_face(j)) for j in range(len(faces.HELD_OUT)) if j != k]
        to_others = float(torch.stack([faces.face_distance(r["_custom_images"], o).mean() for o in others]).mean())
        rows.append({"face": faces.HELD_OUT[k], "base": r["base"], "customized": r["customized"],
                     "customized_to_other_held_out_faces": to_others, "customize_seconds": seconds})
        logger.info("held-out face %d: base %.4f -> customized %.4f (to other faces %.4f)",
                    faces.HELD_OUT[k], r["base"], r["customized"], to_others)
        ref = faces.prepared([face])[0]
        grid.append([ref, *r["_base_images"], *r["_custom_images"]])
    to_pil_grid(grid).save(out / "identity_grid.png")
    summary = {
        "face_likeness_correlation_with_mean_face": likeness,
        "identity_rows": rows,
        "mean_base": float(np.mean([r["base"] for r in rows])),
        "mean_customized": float(np.mean([r["customized"] for r in rows])),
        "faces_improved": sum(r["customized"] < r["base"] for r in rows),
        "faces": len(rows),
        "sampling": SAMPLING, "seeds": list(seeds),
        "customization": {"steps": CUSTOMIZE_STEPS, "lr": CUSTOMIZE_LR, "augmentations": CUSTOMIZE_AUGMENTATIONS},
        "seconds": time.perf_counter() - start,
    }
    (out / "identity.json").write_text(json.dumps(summary, indent=1))
    return summary


# -- backends ----------------------------------------------------------------------------------------------

#: CPU backends of the toy-faces grid and tests (TensorRT and torch.compile are left out: GPU / minutes).
GRID_BACKENDS = ("eager", "torch", "onnxruntime")


def runner_for(pipe: ProFusionPipeline, backend: str, workdir: Path, threads: int | None = None):
    """A pipeline (``eager``) or a :class:`~profusion_rt.runtime.Runtime` over ``pipe``; onnxruntime runs
    the two stage graphs exported into ``workdir`` (this pipeline's weights). Raises
    :class:`~profusion_rt.core.errors.BackendUnavailableError` when the backend cannot run here."""
    if backend == "eager":
        return pipe
    artifacts = None
    options: dict[str, Any] = {}
    if backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401  (deferred: optional)
        except ImportError:
            raise BackendUnavailableError("onnxruntime is not installed") from None
        artifacts = Path(workdir)
        export_artifacts(pipe, artifacts, graphs=["fusion_stage", "refinement_stage"], progress=False,
                         validate=False, batch=1, exporter="legacy")
        if threads is not None:
            options["threads"] = threads
    return create_runtime(pipe, backend, artifacts=artifacts, **options)


def labelled_grid(rows: dict[str, Sequence[torch.Tensor]], scale: int = 4) -> Image.Image:
    """:func:`to_pil_grid` with each row's name written on its left."""
    from PIL import ImageDraw

    body = to_pil_grid(list(rows.values()), scale)
    label_w = 130
    canvas = Image.new("RGB", (body.width + label_w, body.height), (255, 255, 255))
    canvas.paste(body, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    cell = body.height / max(len(rows), 1)
    for i, name in enumerate(rows):
        draw.text((6, int(i * cell + cell / 2) - 6), name, fill=(0, 0, 0))
    return canvas


def backend_grid(out: Path, backends: Sequence[str] = GRID_BACKENDS, face_index: int = 0,
                 seeds: Sequence[int] = (0, 1, 2), threads: int | None = None, log=logger.info) -> dict[str, Any]:
    """The demo's images: held-out face ``face_index`` as the reference, the base model's and the
    customized model's ProFusion images (same prompt and seeds), one row per backend. Writes
    ``toy_faces_grid.png`` and ``toy_faces.json`` (distances to the face per backend) into ``out``."""
    out = Path(out)
    face = faces.held_out_face(face_index)
    base, custom = toy_pipeline(), toy_pipeline()
    t0 = time.perf_counter()
    customize_on(custom, face)
    log(f"customized toy-faces on held-out face #{faces.HELD_OUT[face_index]} in {time.perf_counter() - t0:.1f} s "
        f"({CUSTOMIZE_STEPS} steps)")
    ref = faces.prepared([face])[0]
    rows: dict[str, list[torch.Tensor]] = {}
    results: dict[str, Any] = {}
    eager_images = None
    for backend in backends:
        try:
            runners = (runner_for(base, backend, out / "toy-artifacts" / "base", threads),
                       runner_for(custom, backend, out / "toy-artifacts" / "customized", threads))
        except BackendUnavailableError as exc:
            results[backend] = {"skipped": str(exc)}
            log(f"toy-faces {backend}: skipped ({exc})")
            continue
        r = identity_row(base, custom, face, seeds, {backend: runners})[backend]
        images = torch.cat([r["_base_images"], r["_custom_images"]])
        eager_images = images if eager_images is None else eager_images
        results[backend] = {"base": r["base"], "customized": r["customized"],
                            "max_abs_diff_vs_first": float((images - eager_images).abs().max())}
        rows[f"{backend}: base | custom."] = [ref, *images]
        log(f"toy-faces {backend}: distance to the face {r['base']:.3f} (base) -> {r['customized']:.3f} (customized)")
    grid = labelled_grid(rows)
    grid.save(out / "toy_faces_grid.png")
    summary = {"face": faces.HELD_OUT[face_index], "prompt": faces.TOY_PROMPT, "seeds": list(seeds),
               "sampling": SAMPLING, "customize_steps": CUSTOMIZE_STEPS, "backends": results,
               "measure": "RMS gray-level distance (0..1) of the 32x32 images to the reference face"}
    (out / "toy_faces.json").write_text(json.dumps(summary, indent=1))
    return summary
