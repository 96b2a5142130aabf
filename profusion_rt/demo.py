"""``profusion-rt demo``: the README's main job on the embedded tiny preset (random weights).

1. exports the tiny model's fused stage graphs and the encoders and VAE decoder to ONNX, validated against
   PyTorch;
2. runs every available backend on the same seed, each in its own process (eager reference, fused eager
   torch, torch.compile, onnxruntime over the pipeline's encoders, onnxruntime from the artifact folder
   alone (``Runtime.from_artifacts``: every network on onnxruntime), TensorRT when present): one warm-up
   call each, then rounds of one timed run per backend (interleaved, so load changes on a shared machine
   hit all backends alike);
3. writes each backend's image, and prints and writes a parity and speed table against the eager
   reference (``demo_table.md``, ``demo_results.json``);
4. the learned images: the shipped ``toy-faces`` model (docs/toy-faces.md) customized on a held-out face,
   its base and customized images on eager, the torch runtime and onnxruntime (``toy_faces_grid.png``,
   ``toy_faces.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

from profusion_rt.benchmarks.runner import run_interleaved
from profusion_rt.benchmarks.toy import evaluate as toy_eval
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.core.image_io import save_image
from profusion_rt.core.presets import announce_random_weights, weights_label
from profusion_rt.core.samples import DEMO_PROMPT, demo_reference_image
from profusion_rt.export.cache import export_artifacts
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import available_backends
from profusion_rt.runtime.artifact_pipeline import REQUIRED_GRAPHS
from profusion_rt.runtime.parity import compare

logger = logging.getLogger(__name__)

BACKEND_ORDER = ("eager", "torch", "torch-compile", "onnxruntime", "onnxruntime-artifacts", "tensorrt")
#: demo rows that are not backend names -> the backend they run (from the artifact folder alone)
ROW_BACKENDS = {"onnxruntime-artifacts": "onnxruntime"}


def export_demo_artifacts(pipe, root: Path) -> list:


    # The two stages, and the encoders and decoder the artifact-only runtime needs.
    return export_artifacts(pipe, root, graphs=list(REQUIRED_GRAPHS), progress=True, validate=True, batch=1,
                            dynamic_batch=(1, 4), exporter="legacy")


def format_table(rows: list[dict]) -> str:
    head = ("| backend | status | first call (s) | median (s) | min-max (s) | speed-up vs eager | loop (s) | "
            "latent max rel. err | pixels within 1/255 | PSNR (dB) | peak RSS (MB) |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['name']} | skipped: {r['reason']} |" + " |" * 9)
            continue
        p = r.get("parity") or {}
        psnr = p.get("psnr_db")
        lines.append(
            f"| {r['name']} | {r['status']} | {r['first_call_s']:.2f} | {r['median_s']:.2f} | "
            f"{r['min_s']:.2f}-{r['max_s']:.2f} | {r['speedup']:.2f}x | {r['loop_s']:.2f} | "
            f"{p.get('latent_max_rel', 0):.2e} | {100 * p.get('pixel_match', 1):.2f}% | "
            f"{'inf' if psnr is None or psnr == float('inf') else f'{psnr:.1f}'} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    out = Path(args.out).resolve()
    artifacts = out / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    save_image(demo_reference_image(), out / "reference.png")

    print(f"[1/3] exporting the tiny preset's stage graphs, encoders and decoder to ONNX (validated) -> {artifacts}")
    start = time.perf_counter()
    pipe = ProFusionPipeline.from_preset("tiny", seed=0)

    announce_random_weights(pipe)
    reports = export_demo_artifacts(pipe, artifacts)
    for rep in reports:
        print("      " + rep.summary())
    print(f"      export took {time.perf_counter() - start:.1f} s")

    available = available_backends("cpu", artifacts)
    available["eager"] = ""
    available["onnxruntime-artifacts"] = available.get("onnxruntime", "")
    request = {"prompt": DEMO_PROMPT, "num_inference_steps": args.steps, "seed": args.seed, "fusion_steps": 1}
    threads = args.threads or torch.get_num_threads()
    wanted = BACKEND_ORDER if not args.backends else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    for name in wanted:
        if name not in BACKEND_ORDER:

            raise InvalidParameterError(f"unknown backend {name!r} in --backends; choose from {', '.join(BACKEND_ORDER)}")
    print(f"[2/3] running every backend in its own process: {args.steps} steps, 1 fusion step, seed {args.seed}, "
          f"one warm-up call, then {args.repeats} timed rounds (one run per backend per round, order rotating), "
          f"{threads} threads")
    jobs = {}
    results = {}
    for name in BACKEND_ORDER:
        reason = available.get(name, "unknown backend") if name in wanted or name == "eager" else "not requested"
        if reason:
            results[name] = {"name": name, "ok": False, "reason": reason}
            print(f"      {name}: skipped ({reason})")
            continue
        jobs[name] = {"backend": ROW_BACKENDS.get(name, name), "name": name, "model": "tiny", "request": request,
                      "artifacts": str(artifacts), "warmup": 0, "repeats": args.repeats, "out": str(out / "runs"),
                      "threads": threads, "ort_threads": threads, "artifacts_only": name in ROW_BACKENDS}
    results.update(run_interleaved(jobs, args.repeats))
    eager = results["eager"]
    if not eager["ok"]:
        print(f"error: the eager reference failed: {eager['reason']}")
        return 1
    failures = 0
    for r in results.values():
        if not r["ok"]:
            continue
        parity = compare(torch.from_numpy(r["_latents"]), torch.from_numpy(eager["_latents"]),
                         r["_images"], eager["_images"])
        r["parity"] = parity.__dict__
        r["status"] = "reference" if r is eager else ("parity ok" if parity.ok() else "PARITY FAILED")
        failures += r["status"] == "PARITY FAILED"
        r["speedup"] = eager["median_s"] / r["median_s"]
        r["loop_s"] = float(np.median([run["loop_s"] for run in r["runs"]]))
        save_image(r["_images"][0], out / f"profusion_tiny_{r['name']}.png",
                   metadata={"weights": weights_label(pipe), "backend": r["name"]})

    rows = [results[n] for n in BACKEND_ORDER]
    table = format_table(rows)
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs, torch {torch.__version__}"
    header = (f"ProFusion on the tiny preset (random weights), {args.steps} steps with 1 fusion step, batch 1, "
              f"seed {args.seed}; {machine}; median of {args.repeats} runs after one warm-up call, end to end "
              "(prepare + loop + decode); every backend in its own process, timed runs interleaved.\n\n")
    (out / "demo_table.md").write_text(header + table + "\n")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    (out / "demo_results.json").write_text(json.dumps({"machine": machine, "request": request, "results": clean},
                                                      indent=2, default=str))
    print("[3/3] parity and speed against the eager reference:\n")
    print(table)
    print(f"\nimage written to {out / 'profusion_tiny_eager.png'} (one per backend beside it)")
    print(f"table written to {out / 'demo_table.md'}")
    toy_backends = [b for b in toy_eval.GRID_BACKENDS if b in ("eager",) + wanted]
    print(f"\n[toy-faces] learned images (docs/toy-faces.md): a held-out face customized with our training code, "
          f"base and customized images per backend ({', '.join(toy_backends)})")
    torch.set_num_threads(threads)
    try:
        toy_eval.backend_grid(out, toy_backends, threads=threads, log=lambda line: print("      " + line))
    except ImportError as exc:  # the faces come with scikit-image (test / eval extras)
        print(f"      skipped: {exc}")
    else:
        print(f"toy-faces grid written to {out / 'toy_faces_grid.png'} (reference | 3 base | 3 customized, "
              "one row per backend)")
    return 1 if failures else 0
