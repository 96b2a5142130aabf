"""Command-line interface: ``profusion-rt <command>``.

User errors (:class:`~profusion_rt.core.errors.ProFusionError`) are printed as one line ``error: ...`` and the
process exits with status 2, without a traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from profusion_rt.core.cliargs import (
    ARTIFACT_BACKENDS,
    DefaultsHelpFormatter,
    add_model_args,
    package_version,
    settle_precision,
)
from profusion_rt.core.errors import InvalidParameterError, ProFusionError
from profusion_rt.core.hardware import (
    bf16_support,
    resolve_precision,
)
from profusion_rt.core.image_io import load_image, save_image
from profusion_rt.core.presets import (
    announce_random_weights,
    get_preset,
    preset_names,
    weights_label,
)
from profusion_rt.demo import run_demo
from profusion_rt.models.factory import build_components
from profusion_rt.models.flops import count_network_costs, sample_flops
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.pipeline.convert import convert_model
from profusion_rt.runtime import Runtime, create_runtime

logger = logging.getLogger("profusion_rt")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="reference image of the subject")
    p.add_argument("--prompt", required=True, help='prompt; "{S*}" marks the subject, e.g. "a {S*} wearing sunglasses"')
    p.add_argument("--class-word", default="person", help="class word for the reference guidance prompt C~")
    p.add_argument("--negative-prompt", default=None,
                   help="replaces the empty prompt in every guidance term (at most 77 tokens)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=7.0, help="classifier-free guidance scale w")
    p.add_argument("--reference-guidance-scale", type=float, default=5.0,
                   help="guidance towards the class-word prompt C~ in the refinement stage")
    p.add_argument("--fusion-steps", type=int, default=1, help="fusion (re-noise) steps per DDIM step")
    p.add_argument("--fusion-guidance-scale", type=float, default=7.0, help="guidance scale of the fusion stage")
    p.add_argument("--fusion-eta", type=float, default=1.0, help="re-noising eta of the fusion stage")
    p.add_argument("--fusion-embedding-scale", type=float, default=0.6, help="scale of S* in the fusion stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (image j: seed + j)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--reference-mode", default="sample", choices=["sample", "mean"],
                   help="reference latent: a posterior draw or its mean")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        reference_image=args.image,
        prompt=args.prompt,
        class_word=args.class_word,
        negative_prompt=getattr(args, "negative_prompt", None),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        reference_guidance_scale=args.reference_guidance_scale,
        fusion_steps=args.fusion_steps,
        fusion_guidance_scale=args.fusion_guidance_scale,
        fusion_eta=args.fusion_eta,
        fusion_embedding_scale=args.fusion_embedding_scale,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
        reference_mode=args.reference_mode,
    )


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


#: backends that can run from exported artifacts alone (``generate --artifacts DIR`` without ``--model``)



def artifact_runtime(args: argparse.Namespace):
    """The runtime of ``generate --artifacts DIR --backend onnxruntime|tensorrt`` without ``--model``: every
    network from the exported graphs, no model weights."""

    if args.promptnet is not None:
        raise InvalidParameterError("--promptnet needs --model (a runtime from artifacts alone loads no model)")
    precision = args.precision or ("fp16" if args.backend == "tensorrt" else "fp32")
    runtime = Runtime.from_artifacts(args.artifacts, args.backend, device=args.device, precision=precision,
                                     model_hash=args.model_hash, threads=args.threads)
    print(f"model {runtime.pipe.model_hash} from {args.artifacts} ({args.backend}, {precision}, no weights loaded)")
    return runtime


@command
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate images with the eager reference pipeline, a runtime backend over a model, or a runtime from
    exported artifacts alone (``--artifacts`` with onnxruntime or tensorrt and no ``--model``)."""

    settle_precision(args)
    if args.image is not None:
        load_image(args.image)  # fail fast on a bad file, before loading any model
    if args.model is None and args.artifacts is not None and args.backend in ARTIFACT_BACKENDS:
        generate = artifact_runtime(args)
        if args.delta is not None:
            generate.apply_delta(args.delta)  # raises: a delta needs the weights
        return _generate_and_save(generate, args)
    if args.model_hash is not None:
        raise ProFusionError("--model-hash picks an exported model for a run without --model")
    pipe = ProFusionPipeline.load(args.model or "tiny", args.promptnet, args.device, args.dtype, args.weights_seed)

    announce_random_weights(pipe)
    if args.backend == "eager":
        if args.artifacts is not None:
            raise ProFusionError("--artifacts is used by the runtime backends; pick one with --backend")
        generate = pipe
    else:

        options = {"precision": args.precision} if args.precision else {}
        if args.threads is not None:
            options["threads"] = args.threads
        generate = create_runtime(pipe, args.backend, artifacts=args.artifacts, **options)
        if args.delta is not None:
            seconds = generate.apply_delta(args.delta)
            print(f"applied {args.delta} in {seconds * 1000:.1f} ms")
    return _generate_and_save(generate, args)


def _generate_and_save(generate, args: argparse.Namespace) -> int:

    start = time.perf_counter()
    result = generate(output_type="pil", **sampling_kwargs(args))
    elapsed = time.perf_counter() - start
    metadata = {"weights": weights_label(generate)}
    seeds = list(result.seeds) if len(result.seeds) == len(result.images) else [None] * len(result.images)
    for path, image, seed in zip(output_paths(Path(args.out), len(result.images)), result.images, seeds):
        save_image(image, path, metadata={**metadata, "prompt": args.prompt,
                                          **({"seed": str(seed)} if seed is not None else {})})
        print(f"wrote {path}")
    print(f"{len(result.images)} image(s) in {elapsed:.2f} s (seeds {result.seeds})")
    return 0


@command
def cmd_info(args: argparse.Namespace) -> int:
    """Components, parameter counts and FLOPs per network (meta-device counting)."""

    if not Path(args.model).is_dir() and args.model in preset_names():

        preset = get_preset(args.model)
        components, resolution, name = build_components(preset, device="meta"), preset.resolution, args.model
    else:
        pipe = ProFusionPipeline.load(args.model, args.promptnet)
        components, resolution, name = pipe.components(), pipe.resolution, args.model
    costs = count_network_costs(components, resolution)
    print(f"model: {name}   resolution: {resolution}px   text layers skipped: {components.text_skip_layers}")
    print(f"scheduler: {type(components.scheduler).__name__}   tokenizer: {type(components.tokenizer).__name__}")

    support = bf16_support()
    print(f"cpu: {support.cpu}   {support.describe()}   --precision auto on cpu: {resolve_precision('auto', 'cpu')}")
    print("| network | class | params (M) | GFLOP per forward | forward |")
    print("| --- | --- | ---: | ---: | --- |")
    classes = {k: type(v).__name__ for k, v in components.networks().items()}
    classes["vae_encoder"] = classes["vae_decoder"] = classes["vae"]
    for c in costs:
        print(f"| {c.name} | {classes.get(c.name, '')} | {c.params / 1e6:.1f} | {c.gflops:.2f} | {c.call} |")
    total = sample_flops(costs, args.steps, args.fusion_steps)
    print(f"one image, {args.steps} steps, {args.fusion_steps} fusion step(s): {total / 1e12:.2f} TFLOP")
    return 0


@command
def cmd_convert(args: argparse.Namespace) -> int:
    """Rewrite a model (the released ProFusion layout, SD2 + PromptNet, a hub id) in our safetensors layout,
    atomically, verified by reloading it and comparing every tensor."""

    report = convert_model(args.model, args.out, promptnet_path=args.promptnet, overwrite=args.overwrite)
    for line in report["dropped"]:
        print(f"dropped {line}")
    print(f"wrote {report['path']}: {report['tensors']} tensors in safetensors, verified (reloaded, every tensor "
          "equal to the source)")
    return 0


@command
def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job on the embedded tiny preset."""

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profusion-rt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate an image with the eager reference pipeline",
                       formatter_class=DefaultsHelpFormatter)
    add_model_args(p)
    p.set_defaults(model=None)  # None: tiny, or with --artifacts and onnxruntime/tensorrt no model at all
    for action in p._actions:
        if action.dest == "model":
            action.help += " (default: tiny; with --artifacts and --backend onnxruntime|tensorrt: no model)"
    add_sampling_args(p)
    p.add_argument("--out", default="out.png", help="output image (several: out-0.png, out-1.png, ...)")
    p.add_argument("--backend", default="eager",
                   choices=["eager", "torch", "torch-compile", "onnxruntime", "tensorrt"],
                   help="eager: the reference pipeline; the others run the lean runtime loop")
    p.add_argument("--artifacts", default=None, help="artifact folder written by `profusion-rt export` "
                   "(onnxruntime, tensorrt); without --model every network runs from its exported graphs and "
                   "no model is loaded")
    p.add_argument("--model-hash", default=None,
                   help="which exported model of --artifacts to run without --model (when it holds several)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session (default: all cores)")
    p.add_argument("--delta", default=None, help="customization delta to hot-swap in (profusion-rt customize)")

    p = sub.add_parser("info", help="components, parameters and FLOPs per network")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--fusion-steps", type=int, default=1)

    p = sub.add_parser("convert", help="rewrite a model folder (e.g. the released ProFusion layout) in our "
                       "safetensors layout, verified by reloading")
    p.add_argument("--model", required=True, help="model folder or Hugging Face hub id (org/name)")
    p.add_argument("--promptnet", default=None, help="separate PromptNet folder or hub id (with a plain SD2 --model)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    p = sub.add_parser("demo", help="end-to-end demo on the tiny preset")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds: one run per backend each (after one warm-up call)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / onnxruntime threads per backend process (default: all cores; use 1 on a busy "
                        "machine, where torch's OpenMP pool can run many times slower)")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of eager,torch,torch-compile,onnxruntime,tensorrt (default: all)")

    for extra in _extra_parsers():
        extra(sub)
    return parser


def _extra_parsers():
    """Subcommands registered by other layers (training, export, benchmarks, serving, evaluation)."""
    import importlib

    found = []
    for module in ("profusion_rt.training.cli", "profusion_rt.export.cli",
                   "profusion_rt.benchmarks.cli", "profusion_rt.benchmarks.cpu_realsize", "profusion_rt.serve.cli",
                   "profusion_rt.evaluation.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue
            raise
        found.append(mod.register)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    try:
        settle_precision(args)
        return int(handler(args) or 0)
    except ProFusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
