"""``profusion-rt serve``: the HTTP server (:mod:`profusion_rt.serve`) from the command line.

Checks the options, loads the model, builds the runtime over the chosen backend (``--artifacts`` from
``profusion-rt export`` for onnxruntime/tensorrt), warms it up once and serves with uvicorn until Ctrl-C.
The server's options are derived from :class:`~profusion_rt.serve.config.ServeConfig` (one default each).
"""

from __future__ import annotations

import argparse
import logging

import torch

from profusion_rt.core.cliargs import ARTIFACT_BACKENDS, add_model_args, settle_precision
from profusion_rt.core.errors import BackendUnavailableError, InvalidParameterError
from profusion_rt.core.presets import announce_random_weights
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import create_runtime
from profusion_rt.serve.auth import load_api_keys
from profusion_rt.serve.config import add_config_args, config_from_args
from profusion_rt.serve.ray.options import add_ray_args, run_ray

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve generation over HTTP (FastAPI + uvicorn)",
                              description="Serve POST /v1/generate, POST /v1/subjects, GET/DELETE /v1/subjects/{id}, "
                                          "GET /healthz, GET /metrics, GET /docs.")
    add_model_args(p)
    p.add_argument("--backend", default="torch", choices=list(BACKENDS),
                   help="engine of the stage loop (the per-request encoders run in torch)")
    p.add_argument("--artifacts", default=None, help="artifact folder of `profusion-rt export` (onnxruntime, tensorrt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_config_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process serves (default); ray: Ray Serve replicas on a cluster (the ray extra)")
    add_ray_args(p)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    settle_precision(args)  # --precision: the torch dtype, or the artifacts' precision for onnxruntime/tensorrt
    if not 0 <= args.port <= 65535:
        raise InvalidParameterError(f"--port must be 0..65535, got {args.port}")
    if args.backend in ARTIFACT_BACKENDS and args.artifacts is None:
        raise InvalidParameterError(f"--backend {args.backend} needs --artifacts (run `profusion-rt export` first)")
    config = config_from_args(args)  # checks every limit before the model is loaded
    if config.api_keys_file is not None:
        load_api_keys(config.api_keys_file)  # a missing or empty keys file: one line, before the model loads
    if args.engine == "ray":
        return run_ray(args, config)
    if args.print_config:
        raise InvalidParameterError("--print-config prints the Ray Serve config: use it with --engine ray")
    level = logging.DEBUG if getattr(args, "verbose", False) else getattr(logging, args.log_level.upper())
    logging.getLogger("profusion_rt").setLevel(level)

    try:
        import uvicorn

        # deferred: pulls in fastapi and prometheus-client (the serve extra); `profusion-rt --help` works without it
        from profusion_rt.serve.app import create_app
    except ModuleNotFoundError as exc:
        raise BackendUnavailableError(f"profusion-rt serve needs the serve extra ({exc.name} is missing): "
                                      "pip install 'profusion-rt[serve]'") from None

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = ProFusionPipeline.load(args.model, args.promptnet, args.device, args.dtype, args.weights_seed)
    pipe.progress_bar = False
    announce_random_weights(pipe)
    runtime = create_runtime(pipe, args.backend, artifacts=args.artifacts,
                             **({"precision": args.precision} if args.precision else {}))
    app = create_app(runtime, config)
    auth = f", API keys from {config.api_keys_file}" if config.api_keys_file is not None else ""
    print(f"serving {args.model} ({args.backend}, {args.precision or args.dtype}, {pipe.device}) on "
          f"http://{args.host}:{args.port}  subjects in {config.data_dir}{auth}", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  lifespan="on", timeout_graceful_shutdown=30)).run()
    return 0
