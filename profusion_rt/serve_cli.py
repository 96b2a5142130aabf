"""``profusion-rt serve``: the HTTP server (:mod:`profusion_rt.serve`) from the command line.

Checks the options, loads the model, builds the runtime over the chosen backend (``--artifacts`` from
``profusion-rt export`` for onnxruntime/tensorrt), warms it up once and serves with uvicorn until Ctrl-C.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from profusion_rt.cli import add_model_args

    p = subparsers.add_parser("serve", help="serve generation over HTTP (FastAPI + uvicorn)",
                              description="Serve POST /v1/generate, POST /v1/subjects, GET /healthz, GET /metrics.")
    add_model_args(p)
    p.add_argument("--backend", default="torch", choices=["torch", "torch-compile", "onnxruntime", "tensorrt"],
                   help="engine of the stage loop (the per-request encoders run in torch)")
    p.add_argument("--artifacts", default=None, help="artifact folder of `profusion-rt export` (onnxruntime, tensorrt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data", default="serve-data", help="folder for stored subjects (created)")
    p.add_argument("--max-queue", type=int, default=32, help="queued requests before 429 (default 32)")
    p.add_argument("--max-batch", type=int, default=4, help="images per runtime batch (default 4)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long to wait for compatible requests to batch with (default 10)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout, queue included (default 120)")
    p.add_argument("--max-upload-bytes", type=int, default=10 * 2**20, help="request body limit (default 10 MiB)")
    p.add_argument("--max-delta-bytes", type=int, default=4 * 2**30,
                   help="body limit of POST /v1/subjects with a delta (default 4 GiB)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="reference image pixel limit")
    p.add_argument("--steps-limit", type=int, default=50, help="most num_inference_steps per request (default 50)")
    p.add_argument("--default-steps", type=int, default=None, help="steps when a request names none "
                   "(default: --steps-limit)")
    p.add_argument("--fusion-steps-limit", type=int, default=4)
    p.add_argument("--customize-steps", type=int, default=100, help="default steps of customize=true")
    p.add_argument("--customize-steps-limit", type=int, default=500)
    p.add_argument("--no-customize", action="store_true", help="refuse customize=true subjects")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the start-up warm-up request (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from profusion_rt.core.errors import InvalidParameterError
    from profusion_rt.serve import ServeConfig

    from profusion_rt.cli import settle_precision

    settle_precision(args)  # --precision: the torch dtype, or the artifacts' precision for onnxruntime/tensorrt
    if not 0 <= args.port <= 65535:
        raise InvalidParameterError(f"--port must be 0..65535, got {args.port}")
    if args.backend in ("onnxruntime", "tensorrt") and args.artifacts is None:
        raise InvalidParameterError(f"--backend {args.backend} needs --artifacts (run `profusion-rt export` first)")
    config = ServeConfig(  # checks every limit before the model is loaded
        data_dir=args.data, max_queue=args.max_queue, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        timeout_s=args.timeout_s, max_upload_bytes=args.max_upload_bytes, max_delta_bytes=args.max_delta_bytes,
        max_pixels=args.max_pixels, steps_limit=args.steps_limit,
        default_steps=args.default_steps if args.default_steps is not None else args.steps_limit,
        fusion_steps_limit=args.fusion_steps_limit, allow_customize=not args.no_customize,
        customize_steps=args.customize_steps, customize_steps_limit=args.customize_steps_limit,
        warmup_steps=args.warmup_steps)
    level = logging.DEBUG if args.verbose else getattr(logging, args.log_level.upper())
    logging.getLogger("profusion_rt").setLevel(level)

    import torch
    import uvicorn

    from profusion_rt.pipeline import ProFusionPipeline
    from profusion_rt.runtime import create_runtime
    from profusion_rt.serve import create_app

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = ProFusionPipeline.load(args.model, args.promptnet, args.device, args.dtype, args.weights_seed)
    pipe.progress_bar = False
    from profusion_rt.core.presets import announce_random_weights

    announce_random_weights(pipe)
    runtime = create_runtime(pipe, args.backend, artifacts=args.artifacts,
                             **({"precision": args.precision} if args.precision else {}))
    app = create_app(runtime, config)
    print(f"serving {args.model} ({args.backend}, {args.precision or args.dtype}, {pipe.device}) on http://{args.host}:{args.port}  "
          f"subjects in {config.data_dir}", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                  lifespan="on", timeout_graceful_shutdown=30)).run()
    return 0
