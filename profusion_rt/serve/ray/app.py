"""Building and running the Ray Serve application: :func:`build` (the application builder that
``serve run`` / ``serve deploy`` import, ``args`` from :func:`~profusion_rt.serve.ray.spec.builder_args`),
:func:`start` (a Ray cluster connection and ``serve.run``, what ``profusion-rt serve --engine ray`` does)
and :func:`stop`."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
from ray import serve

from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.ray.generator import generator_deployment
from profusion_rt.serve.ray.ingress import Ingress
from profusion_rt.serve.ray.spec import ModelSpec, ScaleSpec, builder_args, config_from_dict

logger = logging.getLogger(__name__)

__all__ = ["build", "connect", "serve_forever", "start", "stop"]


def build(args: dict[str, Any]):
    """The bound application (Ingress over Generator) of builder ``args`` (model, scale, config, data)."""
    scale = ScaleSpec(**args["scale"])
    config = config_from_dict(args["config"])
    generator = generator_deployment(scale, config).options(**scale.generator_options(config))
    ingress = Ingress.options(**scale.ingress_options())
    return ingress.bind(generator.bind(args["model"], args["config"], args["data"]),
                        args["model"], args["scale"], args["config"], args["data"])


def connect(address: str = "local", num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at ``address`` (``auto``: the one ``ray start --head`` runs on this machine; an
    ``ip:port`` or ``ray://`` address) or start a local one (``local``). A local cluster gets no dashboard
    and, unless ``RAY_AUTH_MODE`` is set, no token file: it listens on this machine only."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"address": address, "log_to_driver": False}
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a cluster on loopback
        options.update(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus)
    ray.init(**options)


def start(model: ModelSpec, scale: ScaleSpec, config: ServeConfig, data: str, *, host: str = "127.0.0.1",
          port: int = 8000, name: str = "profusion", blocking: bool = False):
    """Deploy the application on the connected cluster (:func:`connect`) with its HTTP proxy on
    ``host:port``; returns the ingress handle once every replica is warmed up."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build(builder_args(model, scale, config, data)), name=name, route_prefix="/",
                     blocking=blocking)


def stop() -> None:
    """Remove the application and Serve, and leave the cluster (a local one stops)."""
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(model: ModelSpec, scale: ScaleSpec, config: ServeConfig, data: str, *, address: str = "local",
                  host: str = "127.0.0.1", port: int = 8000) -> None:
    """``profusion-rt serve --engine ray``: connect, deploy, serve until Ctrl-C, then remove the application
    (a local cluster stops with it)."""
    connect(address)
    try:
        start(model, scale, config, data, host=host, port=port)
        print(f"serving {model.model} on Ray Serve ({scale.replicas or f'{scale.min_replicas}-{scale.max_replicas}'} "
              f"Generator replica(s), {model.backend}, {model.device}) on http://{host}:{port}  subjects in {data}",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    finally:
        stop()
