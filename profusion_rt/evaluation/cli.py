"""``profusion-rt eval``: quality (CLIP-T, CLIP-I, DINO, face identity) of generated images and fidelity of
every backend against the eager reference on the same seeds (PSNR, SSIM, CLIP-I, latent error).

Two modes:

* generate: ``--backends eager,torch,onnxruntime`` over ``--model`` on every ``--prompt`` x ``--seeds``
  with ``--reference`` (onnxruntime uses ``--artifacts``, or the stage graphs exported to a temporary folder);
* folders: ``--images NAME=DIR`` (repeatable; the first folder is the fidelity reference), the images
  paired by their order by file name; one prompt for all or one per image.

Every input is checked before any work starts; bad input is one line ``error: ...`` and exit status 2,
and nothing is written unless everything was computed (see :mod:`.report`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from profusion_rt.core.cliargs import DefaultsHelpFormatter, add_model_args, package_version
from profusion_rt.core.errors import InvalidParameterError, OutputPathError
from profusion_rt.core.image_io import load_image
from profusion_rt.core.presets import (
    announce_random_weights,
    has_random_weights,
    weights_label,
)
from profusion_rt.evaluation import fidelity, metrics, report
from profusion_rt.pipeline import ProFusionPipeline

logger = logging.getLogger(__name__)

EPILOG = """examples:
  profusion-rt eval --model tiny --reference face.jpg --prompt "a {S*} wearing sunglasses" --seeds 0,1 \\
      --backends eager,torch,onnxruntime --out outputs/eval
  profusion-rt eval --model path/to/model --reference face.jpg --prompts prompts.txt --images eager=out/eager \\
      --images trt=out/trt --dino path/to/dinov2-small --face-model arcface.onnx
"""

DEFAULT_PROMPT = "a photo of a {S*}"


def register(subparsers) -> None:
    class Formatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = subparsers.add_parser("eval", help="quality and backend fidelity of generated images",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=Formatter)
    add_model_args(p)
    p.add_argument("--reference", default=None, help="reference image of the subject (required)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f'prompt (repeatable); "{{S*}}" marks the subject (default: "{DEFAULT_PROMPT}")')
    p.add_argument("--prompts", default=None, help="text file with one prompt per line (added to --prompt)")
    p.add_argument("--class-word", default="person",
                   help="class word: the reference guidance prompt, and {S*} in CLIP-T's text")
    p.add_argument("--images", action="append", default=None, metavar="[NAME=]DIR",
                   help="folder of generated images (repeatable; the first is the fidelity reference); "
                        "instead of generating")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to generate with; eager (the reference) is always added "
                        "(default: eager,torch,onnxruntime)")
    p.add_argument("--artifacts", default=None, help="artifact folder of `profusion-rt export` for onnxruntime "
                   "and tensorrt (default: onnxruntime's stage graphs exported to a temporary folder)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds: every prompt with every seed")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--fusion-steps", type=int, default=1, help="fusion steps per DDIM step")
    p.add_argument("--guidance-scale", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    p.add_argument("--clip", default=None, help="a transformers CLIPModel folder for CLIP-T/CLIP-I (default: the "
                   "model's openclip folder when it has one, else the model's own towers without projections)")
    p.add_argument("--dino", default=None, help="a transformers DINO (ViTModel) or DINOv2 (Dinov2Model) folder")
    p.add_argument("--face-model", default=None, help="a face-embedding ONNX model (e.g. ArcFace)")
    p.add_argument("--psnr-min", type=float, default=30.0, help="fidelity status: smallest acceptable PSNR (dB)")
    p.add_argument("--ssim-min", type=float, default=0.95, help="fidelity status: smallest acceptable SSIM")
    p.add_argument("--out", default="outputs/eval", help="output folder (eval.json, eval.md, grid.png, images/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_eval)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts)
        try:
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise InvalidParameterError(f"cannot read --prompts {path}: {reason}") from None
        if not prompts:
            raise InvalidParameterError(f"--prompts {path} holds no prompt")
    return prompts or [DEFAULT_PROMPT]


def _folders(specs: list[str]) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name or spec, spec
        if not name or not folder:
            raise InvalidParameterError(f"--images {spec!r}: expected NAME=DIR or DIR")
        if name in folders:
            raise InvalidParameterError(f"--images: two folders named {name!r}; name them with NAME=DIR")
        folders[name] = Path(folder)
    return folders


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidParameterError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds or min(seeds) < 0:
        raise InvalidParameterError(f"--seeds {text!r}: expected non-negative integers")
    return seeds


def cmd_eval(args: argparse.Namespace) -> int:

    # -- every input is checked before any model is loaded or image generated ------------------------------
    if args.reference is None:
        raise InvalidParameterError("--reference is required: the subject's reference image")
    reference_image = load_image(args.reference)
    prompts = _prompts(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    if args.steps < 1 or args.fusion_steps < 0:
        raise InvalidParameterError("--steps must be >= 1 and --fusion-steps >= 0")
    folder_mode = bool(args.images)
    if folder_mode:
        if args.backends is not None or args.artifacts is not None:
            raise InvalidParameterError("--images evaluates existing folders; --backends/--artifacts generate: "
                                        "give one or the other")
        folders = _folders(args.images)
        items = fidelity.folder_items(folders, prompts)
        backends: list[str] = []
    else:
        backends = fidelity.parse_backends(args.backends or "eager,torch,onnxruntime")
        items = fidelity.make_items(prompts, _seeds(args.seeds))
        if args.artifacts is not None and not Path(args.artifacts).is_dir():
            raise InvalidParameterError(f"--artifacts {args.artifacts} is not a folder")
    dino = metrics.DinoEmbedder(args.dino) if args.dino is not None else None
    face = metrics.FaceEmbedder(args.face_model) if args.face_model is not None else None
    if face is not None and face.problem:
        logger.warning("face identity skipped for every image: %s", face.problem)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clip_folder = args.clip
    if clip_folder is None and Path(args.model).is_dir() and (Path(args.model) / "openclip" / "config.json").is_file():
        clip_folder = str(Path(args.model) / "openclip")
    pipe = None
    if not folder_mode or clip_folder is None:
        pipe = ProFusionPipeline.load(args.model, args.promptnet, args.device, args.dtype, args.weights_seed)
        pipe.progress_bar = False
        announce_random_weights(pipe)
    clip = (metrics.ClipEmbedder.from_folder(clip_folder, pipe.tokenizer if pipe is not None else None)
            if clip_folder is not None else metrics.ClipEmbedder.from_pipeline(pipe))

    # -- images -------------------------------------------------------------------------------------------------
    progress = not args.no_progress
    sampling = {"class_word": args.class_word, "num_inference_steps": args.steps, "fusion_steps": args.fusion_steps,
                "guidance_scale": args.guidance_scale}
    if folder_mode:
        sets = {name: fidelity.folder_set(name, folder) for name, folder in folders.items()}
        sizes = {im.size for s in sets.values() for im in s.images}
        if len(sizes) > 1:
            raise InvalidParameterError(f"the image folders hold images of different sizes: {sorted(sizes)}")
    else:
        sets = fidelity.generate_sets(pipe, backends, items, reference_image, sampling, artifacts=args.artifacts,
                                      threads=args.threads, progress=progress)
    reference_set = next(iter(sets))

    # -- scores -------------------------------------------------------------------------------------------------
    quality = fidelity.quality_rows(sets, items, reference_image, clip, args.class_word, dino, face, progress)
    fid = fidelity.fidelity_rows(sets, reference_set, items, clip, progress)
    summary = fidelity.summarize(sets, reference_set, quality, fid, args.psnr_min, args.ssim_min)

    random = pipe is not None and has_random_weights(pipe)
    notes = [report.INF_NOTE]
    quality_note = clip.note
    if random:
        quality_note = "random weights: quality figures are meaningless, only fidelity is; " + quality_note
    if face is not None:
        notes.append("face identity: the whole image is the face crop (no detector); " + (face.problem or
                     "images the model could not be fed are skipped with a reason in eval.json"))
    source = f"Folders {', '.join(sets)}" if folder_mode else f"Model {args.model} ({weights_label(pipe)})"
    conditions = (f"{source}; {len(items)} image(s) per set" + ("" if folder_mode else
                  f", {args.steps} steps, {args.fusion_steps} fusion step(s), guidance {args.guidance_scale:g}, "
                  f"seeds {args.seeds}, device {pipe.device}, {torch.get_num_threads()} torch threads"))
    result = {
        "profusion_rt_version": package_version(), "machine": report.machine(), "conditions": conditions,
        "mode": "folders" if folder_mode else "generated",
        "model": None if folder_mode and pipe is None else args.model,
        "weights": weights_label(pipe) if pipe is not None else None, "reference_image": str(args.reference),
        "reference_set": reference_set, "sampling": None if folder_mode else sampling,
        "thresholds": {"psnr_min": args.psnr_min, "ssim_min": args.ssim_min},
        "clip": {"source": clip.source, "projections": clip.projected},
        "dino": None if dino is None else dino.source, "face_model": None if face is None else face.source,
        "quality_note": quality_note, "notes": notes,
        "items": [{"name": i.name, "prompt": i.prompt, "seed": i.seed} for i in items],
        "summary": summary, "fidelity": fid, "quality": quality,
    }
    files: dict[str, bytes] = {}
    if not folder_mode:
        meta = {"weights": weights_label(pipe)}
        for s in sets.values():
            for item, image in zip(items, s.images):
                if image is not None:
                    files[f"images/{s.name}/{item.name}.png"] = report.png_bytes(
                        image, {**meta, "backend": s.name, "prompt": item.prompt, "seed": str(item.seed)})
    report.write_outputs(out, result, report.grid(reference_image, list(sets.values()), items), files)
    print(report.markdown(result))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'grid.png'}")
    flagged = [s["set"] for s in summary if str(s.get("status", "")).startswith("FLAGGED")]
    if flagged:
        print(f"fidelity FLAGGED for: {', '.join(flagged)}")
    return 0
