"""Image sets for ``profusion-rt eval`` and their scores.

An :class:`ImageSet` is one image per :class:`Item` (a prompt and a seed), from a backend (generated on
the fly over the same pipeline, seeds and reference: :func:`generate_sets`) or from a folder
(:func:`folder_set`). :func:`quality_rows` scores each image against its prompt and the reference image
(CLIP-T, CLIP-I, DINO, face identity); :func:`fidelity_rows` compares each set with the reference set
(the eager pipeline's) item by item: PSNR, SSIM, CLIP-I between the two images and the latents' relative
error.

Status of a backend (:func:`fidelity_status`): ``ok`` when, over all items, the smallest PSNR is at least
``psnr_min`` (default 30 dB) and the smallest SSIM at least ``ssim_min`` (default 0.95); else ``FLAGGED``
with the first failing figure. Why these thresholds: docs/eval.md.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from profusion_rt.core.errors import (
    BackendUnavailableError,
    ImageError,
    InvalidParameterError,
)
from profusion_rt.core.image_io import load_image
from profusion_rt.evaluation import metrics
from profusion_rt.export.cache import export_artifacts
from profusion_rt.models.tokenizer import PLACEHOLDER
from profusion_rt.runtime import create_runtime

logger = logging.getLogger(__name__)

#: backends ``eval`` can generate with (eager = the reference pipeline)
BACKENDS = ("eager", "torch", "torch-compile", "onnxruntime", "tensorrt")
#: file extensions read from an image folder
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PSNR_MIN = 30.0
SSIM_MIN = 0.95


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    seed: int | None
    name: str  # file stem of its images


@dataclass
class ImageSet:
    name: str
    images: list[Image.Image | None] = field(default_factory=list)
    latents: list[torch.Tensor | None] = field(default_factory=list)
    status: str = "ok"  # or "skipped: <reason>"
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def make_items(prompts: Sequence[str], seeds: Sequence[int]) -> list[Item]:
    """Every prompt with every seed: item ``p * len(seeds) + s``."""
    items = []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            items.append(Item(len(items), prompt, seed, f"{len(items):03d}-p{p}-s{seed}"))
    return items


def parse_backends(text: str) -> list[str]:
    """``"torch,onnxruntime"`` -> ``["eager", "torch", "onnxruntime"]`` (eager, the reference, always first)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise InvalidParameterError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if not names:
        raise InvalidParameterError(f"no backend given; choose from {', '.join(BACKENDS)}")
    return ["eager"] + [n for n in dict.fromkeys(names) if n != "eager"]


# -- folders -----------------------------------------------------------------------------------------------------

def list_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` sorted by name; :class:`ImageError` for a missing folder, an empty one,
    or one holding files that are not images (hidden files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    others = [p for p in files if p.is_dir() or p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        raise ImageError(f"image folder {folder} holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} that "
                         f"{'is' if len(others) == 1 else 'are'} not an image (e.g. {others[0].name}); "
                         f"expected only {', '.join(IMAGE_EXTENSIONS)} files")
    if not files:
        raise ImageError(f"image folder {folder} holds no images")
    return files


def folder_set(name: str, folder: str | Path) -> ImageSet:
    """Every image of ``folder`` (decoded now: a file that is not a readable image is an :class:`ImageError`)."""

    files = list_images(folder)
    return ImageSet(name, [load_image(p) for p in files], [None] * len(files))


def folder_items(folders: dict[str, Path], prompts: Sequence[str]) -> list[Item]:
    """Items of the folder mode: the image files of every folder, which must match in count (file names are
    not compared: the order by name pairs them); one prompt for all images or one per image."""
    counts = {name: len(list_images(folder)) for name, folder in folders.items()}
    first = next(iter(counts))
    for name, count in counts.items():
        if count != counts[first]:
            raise ImageError(f"image folders differ in count: {first} has {counts[first]} images, {name} has {count}")
    n = counts[first]
    if len(prompts) not in (1, n):
        raise InvalidParameterError(f"{len(prompts)} prompts for {n} images: give one prompt for all or one per image")
    stems = [p.stem for p in list_images(folders[first])]
    return [Item(i, prompts[0] if len(prompts) == 1 else prompts[i], None, stems[i]) for i in range(n)]


# -- generation --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stage_artifacts(pipe, artifacts: str | Path | None, needed: bool) -> Iterator[Path | None]:
    """``artifacts`` as given, or (when an onnxruntime backend needs them and none were given) the two
    stage graphs exported into a temporary folder, removed afterwards."""
    if artifacts is not None or not needed:
        yield None if artifacts is None else Path(artifacts)
        return

    with tempfile.TemporaryDirectory(prefix="profusion-eval-artifacts-") as tmp:
        logger.warning("no --artifacts: exporting the two stage graphs to a temporary folder for onnxruntime")
        export_artifacts(pipe, tmp, graphs=["fusion_stage", "refinement_stage"], validate=False)
        yield Path(tmp)


def _runner(pipe, backend: str, artifacts: Path | None, threads: int | None):
    if backend == "eager":
        return pipe

    options: dict[str, Any] = {}
    if threads is not None and backend == "onnxruntime":
        options["threads"] = threads
    return create_runtime(pipe, backend, artifacts=artifacts, **options)


def generate_sets(pipe, backends: Sequence[str], items: Sequence[Item], reference_image: Image.Image,
                  sampling: dict[str, Any], artifacts: str | Path | None = None, threads: int | None = None,
                  progress: bool = True) -> dict[str, ImageSet]:
    """One :class:`ImageSet` per backend: every item generated on the same pipeline, seed and reference.
    A backend this machine cannot run (:class:`BackendUnavailableError`, e.g. TensorRT without its library)
    is kept as a skipped set with the reason; other errors propagate."""
    from tqdm.auto import tqdm

    sets: dict[str, ImageSet] = {}
    needs_export = "onnxruntime" in backends and artifacts is None
    with stage_artifacts(pipe, artifacts, needs_export) as folder:
        for backend in backends:
            try:
                runner = _runner(pipe, backend, folder, threads)
            except BackendUnavailableError as exc:
                logger.warning("backend %s skipped: %s", backend, exc)
                sets[backend] = ImageSet(backend, [None] * len(items), [None] * len(items), f"skipped: {exc}")
                continue
            result = ImageSet(backend)
            start = time.perf_counter()
            for item in tqdm(items, desc=f"eval {backend}", unit="image", disable=not progress, leave=False):
                out = runner(prompt=item.prompt, reference_image=reference_image, seed=item.seed,
                             output_type="pil", **sampling)
                result.latents.append(out.latents[:1].detach().float().cpu())
                result.images.append(out.images[0])
            result.seconds = time.perf_counter() - start
            sets[backend] = result
    return sets


# -- scores ------------------------------------------------------------------------------------------------------

def quality_rows(sets: dict[str, ImageSet], items: Sequence[Item], reference_image: Image.Image,
                 clip: metrics.ClipEmbedder, class_word: str, dino: metrics.DinoEmbedder | None = None,
                 face: metrics.FaceEmbedder | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Per set and item: CLIP-T (image vs the prompt with ``{S*}`` replaced by ``class_word``), CLIP-I
    (image vs the reference image), DINO and face similarity (when their models are given)."""
    from tqdm.auto import tqdm

    ref_clip = clip.image_embeddings([reference_image])[0]
    ref_dino = dino.image_embeddings([reference_image])[0] if dino is not None else None
    ref_face = face.embed(reference_image) if face is not None else None
    texts = [item.prompt.replace(PLACEHOLDER, class_word) for item in items]
    text_emb = clip.text_embeddings(texts)
    rows = []
    for s in sets.values():
        if not s.ok:
            continue
        for item, image in tqdm(list(zip(items, s.images)), desc=f"quality {s.name}", unit="image",
                                disable=not progress, leave=False):
            emb = clip.image_embeddings([image])[0]
            row: dict[str, Any] = {"set": s.name, "item": item.name, "prompt": item.prompt, "seed": item.seed,
                                   "clip_t": None if text_emb is None else metrics.cosine(emb, text_emb[item.index]),
                                   "clip_i": metrics.cosine(emb, ref_clip)}
            if dino is not None:
                row["dino"] = metrics.cosine(dino.image_embeddings([image])[0], ref_dino)
            if face is not None:
                row["face"], reason = metrics.face_similarity(face.embed(image), ref_face)
                if reason:
                    row["face_skipped"] = reason
            rows.append(row)
    return rows


def fidelity_rows(sets: dict[str, ImageSet], reference: str, items: Sequence[Item], clip: metrics.ClipEmbedder,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Per set (other than ``reference``) and item: PSNR (dB, ``inf`` when identical), SSIM, CLIP-I between
    the two images and, when both have latents, the latents' max and mean relative error."""
    from tqdm.auto import tqdm

    ref = sets[reference]
    ref_emb = [clip.image_embeddings([im])[0] for im in ref.images]
    rows = []
    for s in sets.values():
        if s.name == reference or not s.ok:
            continue
        for item, image, latent in tqdm(list(zip(items, s.images, s.latents)), desc=f"fidelity {s.name}",
                                        unit="image", disable=not progress, leave=False):
            ref_image, ref_latent = ref.images[item.index], ref.latents[item.index]
            row: dict[str, Any] = {"set": s.name, "item": item.name, "psnr_db": metrics.psnr(image, ref_image),
                                   "ssim": metrics.ssim(image, ref_image),
                                   "clip_i": metrics.cosine(clip.image_embeddings([image])[0], ref_emb[item.index])}
            if latent is not None and ref_latent is not None:
                row["latent_max_rel"], row["latent_mean_rel"] = metrics.latent_relative_error(latent, ref_latent)
            rows.append(row)
    return rows


def fidelity_status(rows: Sequence[dict[str, Any]], psnr_min: float = PSNR_MIN, ssim_min: float = SSIM_MIN) -> str:
    """``ok`` or ``FLAGGED: <the worst failing figure>`` over one set's rows (see the module docstring)."""
    if not rows:
        return "no images"
    worst_psnr = min(r["psnr_db"] for r in rows)
    worst_ssim = min(r["ssim"] for r in rows)
    if worst_psnr < psnr_min:
        return f"FLAGGED: PSNR {worst_psnr:.1f} dB < {psnr_min:g}"
    if worst_ssim < ssim_min:
        return f"FLAGGED: SSIM {worst_ssim:.3f} < {ssim_min:g}"
    return "ok"


def summarize(sets: dict[str, ImageSet], reference: str, quality: Sequence[dict[str, Any]],
              fidelity: Sequence[dict[str, Any]], psnr_min: float = PSNR_MIN,
              ssim_min: float = SSIM_MIN) -> list[dict[str, Any]]:
    """One summary per set: means of the quality figures; worst fidelity figures and the status."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    out = []
    for s in sets.values():
        q = [r for r in quality if r["set"] == s.name]
        f = [r for r in fidelity if r["set"] == s.name]
        summary: dict[str, Any] = {"set": s.name, "images": sum(im is not None for im in s.images),
                                   "seconds": s.seconds}
        for key in ("clip_t", "clip_i", "dino", "face"):
            if any(key in r for r in q):
                summary[f"{key}_mean"] = mean(r.get(key) for r in q)
        if s.name == reference:
            summary["status"] = "reference" if s.ok else s.status
        elif not s.ok:
            summary["status"] = s.status
        else:
            summary.update(psnr_db_min=min(r["psnr_db"] for r in f), ssim_min=min(r["ssim"] for r in f),
                           clip_i_pair_min=min(r["clip_i"] for r in f),
                           status=fidelity_status(f, psnr_min, ssim_min))
            if all("latent_max_rel" in r for r in f):
                summary["latent_max_rel"] = max(r["latent_max_rel"] for r in f)
                summary["latent_mean_rel"] = mean(r["latent_mean_rel"] for r in f)
        out.append(summary)
    return out
