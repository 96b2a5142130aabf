"""The options of ``profusion-rt serve --engine ray`` (no ray import: ``--print-config`` and ``--help``
work without the ``ray`` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.ray.spec import ModelSpec, ScaleSpec, serve_config_yaml
from profusion_rt.serve.storage import is_remote_url

__all__ = ["add_ray_args", "print_config", "run_ray", "specs_from_args", "storage_url"]


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--engine ray (a Ray Serve cluster; docs/scale-out.md)")
    g.add_argument("--address", default="local",
                   help="Ray cluster: 'local' starts one on this machine, 'auto' joins the one `ray start --head` "
                        "runs here, or a head address (default local)")
    g.add_argument("--replicas", type=int, default=None,
                   help="Generator replicas, each with its own runtime (default 1; or autoscale with "
                        "--min-replicas/--max-replicas)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest Generator replicas (0: "
                   "scale to zero when idle)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most Generator replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=ScaleSpec.target_ongoing_requests,
                   help="autoscaling: requests in flight per replica that Ray Serve aims for (default "
                        f"{ScaleSpec.target_ongoing_requests:g})")
    g.add_argument("--subjects-per-replica", type=int, default=ScaleSpec.subjects_per_replica,
                   help="subject deltas each replica keeps loaded; requests go to a replica that holds theirs "
                        f"(default {ScaleSpec.subjects_per_replica})")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests one replica takes at once (default 2 x --max-batch); more wait in the caller's "
                        "queue (--max-queue), then 429")
    g.add_argument("--replica-cpus", type=float, default=ScaleSpec.num_cpus, help="CPUs reserved per replica "
                   f"(default {ScaleSpec.num_cpus:g})")
    g.add_argument("--replica-gpus", type=float, default=ScaleSpec.num_gpus, help="GPUs per replica (1 for a GPU "
                   "replica, with --device cuda; default 0)")
    g.add_argument("--customize-cpus", type=float, default=ScaleSpec.customize_num_cpus,
                   help="CPUs of each customize=true task")
    g.add_argument("--customize-gpus", type=float, default=ScaleSpec.customize_num_gpus,
                   help="GPUs of each customize=true task")
    g.add_argument("--print-config", action="store_true",
                   help="print the Ray Serve config (YAML for `serve deploy` or a KubeRay RayService) and exit")


def storage_url(data: str | Path) -> str:
    """``--data`` as a storage URL every replica can open: remote URLs as given, local folders absolute
    (replicas do not run in the caller's working directory)."""
    text = str(data)
    return text if is_remote_url(text) else str(Path(text).expanduser().resolve())


def specs_from_args(args: argparse.Namespace) -> tuple[ModelSpec, ScaleSpec]:
    if args.replicas is None and args.min_replicas is None and args.max_replicas is None:
        args.replicas = 1
    if args.backend == "torch-compile":
        raise InvalidParameterError("--engine ray serves --backend torch, onnxruntime or tensorrt")
    model = ModelSpec(model=str(args.model), promptnet=args.promptnet, device=args.device, dtype=args.dtype,
                      precision=args.precision, weights_seed=args.weights_seed, backend=args.backend,
                      artifacts=str(Path(args.artifacts).resolve()) if args.artifacts else None, threads=args.threads)
    scale = ScaleSpec(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests,
                      subjects_per_replica=args.subjects_per_replica, max_ongoing_requests=args.max_ongoing_requests,
                      num_cpus=args.replica_cpus, num_gpus=args.replica_gpus, customize_num_cpus=args.customize_cpus,
                      customize_num_gpus=args.customize_gpus)
    return model, scale


def print_config(args: argparse.Namespace, config: ServeConfig, raw_data: str) -> str:
    model, scale = specs_from_args(args)
    return serve_config_yaml(model, scale, config, storage_url(raw_data), host=args.host, port=args.port)


def run_ray(args: argparse.Namespace, config: ServeConfig) -> int:
    """``profusion-rt serve --engine ray`` after the common checks: print the config, or deploy and serve."""
    if args.print_config:
        print(print_config(args, config, args.data_dir), end="")
        return 0
    model, scale = specs_from_args(args)
    try:
        # deferred: pulls in ray (the ray extra)
        from profusion_rt.serve.ray.app import serve_forever
    except ImportError as exc:
        if getattr(exc, "name", "") and exc.name.split(".")[0] == "ray":
            raise InvalidParameterError("--engine ray needs Ray Serve: pip install 'profusion-rt[ray]'") from None
        raise
    serve_forever(model, scale, config, storage_url(args.data_dir), address=args.address, host=args.host,
                  port=args.port)
    return 0
