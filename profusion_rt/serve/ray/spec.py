"""What a Ray Serve deployment of profusion-rt is made of, as plain data (no ray import): the model each
replica loads (:class:`ModelSpec`), the scaling and resources (:class:`ScaleSpec`), and the Ray Serve
config file of both (:func:`serve_config`, what ``profusion-rt serve --engine ray --print-config`` prints
for ``serve deploy`` or a KubeRay ``RayService``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.serve.config import ServeConfig

__all__ = ["APP_BUILDER", "ModelSpec", "ScaleSpec", "config_from_dict", "config_to_dict", "serve_config",
           "serve_config_yaml"]

#: the import path of the application builder (``serve run`` / ``serve deploy``)
APP_BUILDER = "profusion_rt.serve.ray.app:build"


@dataclass
class ModelSpec:
    """How each Generator replica builds its runtime (the options of ``profusion-rt serve``)."""

    model: str = "tiny"
    promptnet: str | None = None
    device: str = "cpu"  # "cuda" on GPU replicas (each replica sees the GPU Ray gives it as cuda:0)
    dtype: str = "fp32"
    precision: str | None = None
    weights_seed: int = 0
    backend: str = "torch"
    artifacts: str | None = None
    threads: int | None = None


@dataclass
class ScaleSpec:
    """Replicas, autoscaling, multiplexing, batching, back-pressure and resources of the Generator."""

    replicas: int | None = 1  # fixed replica count; None with min/max replicas: autoscaling
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica (requests in flight or queued there)
    subjects_per_replica: int = 2  # subject deltas kept loaded per replica (multiplexing LRU)
    max_ongoing_requests: int | None = None  # per replica; default: 2 x the batch size
    max_queued_requests: int | None = None  # waiting in each caller before 429; default: ServeConfig.max_queue
    num_cpus: float = 1.0  # per Generator replica
    num_gpus: float = 0.0  # per Generator replica (1 for a GPU replica)
    customize_num_cpus: float = 1.0  # per customization task
    customize_num_gpus: float = 0.0
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.0  # the HTTP ingress only parses requests and forwards them
    # requests one ingress replica holds at once: far above the Generators' capacity, so back-pressure happens
    # at the Generator (429) and not as an unbounded wait in front of the ingress (Ray's default is 5)
    ingress_max_ongoing_requests: int = 1000

    def __post_init__(self):
        if self.replicas is None and (self.min_replicas is None or self.max_replicas is None):
            raise InvalidParameterError("give --replicas N, or --min-replicas A and --max-replicas B")
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise InvalidParameterError("--replicas and --min-replicas/--max-replicas exclude each other")
        for name in ("replicas", "max_replicas", "subjects_per_replica", "max_ongoing_requests", "ingress_replicas",
                     "ingress_max_ongoing_requests"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidParameterError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.min_replicas is not None and (not isinstance(self.min_replicas, int) or self.min_replicas < 0):
            raise InvalidParameterError(f"min-replicas must be an integer >= 0, got {self.min_replicas!r}")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise InvalidParameterError(f"min-replicas ({self.min_replicas}) is above max-replicas ({self.max_replicas})")
        if self.max_queued_requests is not None and (not isinstance(self.max_queued_requests, int)
                                                     or self.max_queued_requests < 1):
            raise InvalidParameterError(f"max-queued-requests must be an integer >= 1, got {self.max_queued_requests!r}")
        for name in ("target_ongoing_requests", "num_cpus", "num_gpus", "customize_num_cpus", "customize_num_gpus",
                     "ingress_num_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    name == "target_ongoing_requests" and value == 0):
                raise InvalidParameterError(f"{name.replace('_', '-')} must be a number >= 0, got {value!r}")

    def generator_options(self, config: ServeConfig) -> dict[str, Any]:
        """The Generator deployment's options (``serve.deployment(...)`` / the YAML's deployment entry)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or 2 * config.max_batch,
            "max_queued_requests": self.max_queued_requests or config.max_queue,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            # a replica is healthy once its runtime is built and warmed up; a ~1 s GPU batch never blocks the loop
            "health_check_period_s": 10.0, "health_check_timeout_s": 60.0,
            "graceful_shutdown_timeout_s": 30.0,
        }
        if self.replicas is not None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 10.0, "downscale_delay_s": 300.0,
            }
        return options

    def ingress_options(self) -> dict[str, Any]:
        return {"num_replicas": self.ingress_replicas, "max_ongoing_requests": self.ingress_max_ongoing_requests,
                "ray_actor_options": {"num_cpus": self.ingress_num_cpus}}


def config_to_dict(config: ServeConfig) -> dict[str, Any]:
    """A :class:`ServeConfig` as JSON-able values (paths as strings)."""
    out = {}
    for f in dataclasses.fields(ServeConfig):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(values: dict[str, Any]) -> ServeConfig:
    values = dict(values)
    if "image_formats" in values:
        values["image_formats"] = tuple(values["image_formats"])
    return ServeConfig(**values)


def builder_args(model: ModelSpec, scale: ScaleSpec, config: ServeConfig, data: str) -> dict[str, Any]:
    """The ``args`` of :data:`APP_BUILDER` (all JSON values)."""
    return {"model": asdict(model), "scale": asdict(scale), "config": config_to_dict(config), "data": data}


def serve_config(model: ModelSpec, scale: ScaleSpec, config: ServeConfig, data: str, host: str = "0.0.0.0",
                 port: int = 8000, name: str = "profusion") -> dict[str, Any]:
    """A Ray Serve config (``serve deploy``; the ``serveConfigV2`` of a KubeRay RayService)."""
    gen = scale.generator_options(config)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": name, "route_prefix": "/", "import_path": APP_BUILDER,
            "args": builder_args(model, scale, config, data),
            "deployments": [
                {"name": "Generator", **gen},
                {"name": "Ingress", **scale.ingress_options()},
            ],
        }],
    }


def serve_config_yaml(*args, **kwargs) -> str:
    """:func:`serve_config` as YAML (every JSON document is YAML; PyYAML's block style when installed)."""
    document = serve_config(*args, **kwargs)
    try:
        import yaml  # comes with ray[serve]
    except ImportError:
        return json.dumps(document, indent=2) + "\n"
    return yaml.safe_dump(document, sort_keys=False)
