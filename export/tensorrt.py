"""Optimized ONNX -> TensorRT plan, through polygraphy's Python API.

* Precision: ``fp32`` builds the float32 ONNX and ``fp16`` the float16 ONNX (with its float32 islands, see
  :mod:`profusion_rt.export.fp16`), both as *strongly typed* networks (TensorRT keeps exactly the ONNX types; TF32 off);
  that is the only kind TensorRT 11 builds. ``bf16`` builds the float32 ONNX with the BF16 builder flag
  (weakly typed: TensorRT picks bf16 kernels where it can), which exists in TensorRT 10 only: TensorRT 11
  removed ``BuilderFlag.BF16`` (and every weak-typing flag), so a bf16 build there is refused with
  :class:`~profusion_rt.core.errors.BackendUnavailableError` before any work. Support is feature-detected
  (:func:`supports_precision`), never decided from the version string.
* Shapes: one optimization profile derived from the spec; static (min = opt = max at the export batch)
  by default, a batch range ``(min, max)`` with the export batch as optimum on request.
* A timing cache per GPU and TensorRT version under ``<root>/timing-cache/`` is loaded and updated.
* ``refittable`` on request.
* A plan is written as ``<gpu-slug>-trt<version>.plan`` and recorded in the manifest with the GPU,
  compute capability, TensorRT version and build configuration; :func:`load_plan` refuses a plan built
  for another GPU or TensorRT version.

TensorRT cannot be installed on the project's CPU machines: every function that needs the library calls
:func:`~profusion_rt.runtime.trt_engine.require_tensorrt` first (the runtime's gate), which raises
:class:`~profusion_rt.core.errors.BackendUnavailableError` with a clear message. Profile derivation, configuration assembly and cache keys need no TensorRT and are
unit-tested; building, loading and running plans have not been executed anywhere yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from profusion_rt.export.optimize import polygraphy_quiet
from profusion_rt.export.validate import (
    compare,
    draw_inputs,
    fresh_seed,
    torch_reference,
)

from profusion_rt.artifacts.specs import GraphSpec
from profusion_rt.artifacts.store import (
    ArtifactEntry,
    file_digest,
    gpu_slug,
    plan_filename,
    stage_key,
)
from profusion_rt.core.errors import BackendUnavailableError, InvalidParameterError
from profusion_rt.core.fsio import atomic_write_bytes
from profusion_rt.runtime.trt_engine import require_tensorrt

logger = logging.getLogger(__name__)

TRT_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    @property
    def slug(self) -> str:
        return gpu_slug(self.name, self.compute_capability)


def trt_version() -> str:
    return str(require_tensorrt().__version__)


def current_gpu(device: int = 0) -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU is visible: TensorRT plans are built on the GPU they run on")
    return GpuInfo(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))


# -- pure: profiles, configuration, keys -----------------------------------------------------------------
def profile_shapes(spec: GraphSpec, dims: Mapping[str, int], batch: int,
                   dynamic_batch: tuple[int, int] | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """input name -> (min, opt, max) shapes. Static by default (all three at ``batch``); with
    ``dynamic_batch=(lo, hi)`` the batch axes span lo..hi with ``batch`` as the optimum."""
    if batch < 1:
        raise InvalidParameterError(f"batch must be >= 1, got {batch}")
    lo, hi = (batch, batch) if dynamic_batch is None else (int(dynamic_batch[0]), int(dynamic_batch[1]))
    if not 1 <= lo <= batch <= hi:
        raise InvalidParameterError(f"the batch range {lo}..{hi} must contain the batch {batch} and start at >= 1")
    if hi > spec.max_batch:
        raise InvalidParameterError(f"{spec.name}: batch up to {hi} requested, the graph allows {spec.max_batch}")
    axes = spec.batch_axes()
    out = {}
    for t in spec.inputs:
        shapes = []
        for b in (lo, batch, hi):
            full = {**dims, "B": b}
            shapes.append(t.resolve(full))
        if t.name not in axes:
            assert shapes[0] == shapes[1] == shapes[2]
        out[t.name] = tuple(shapes)
    return out


def make_profile(shapes: Mapping[str, tuple[tuple[int, ...], ...]]):
    """A polygraphy ``Profile`` (needs polygraphy, not TensorRT)."""

    polygraphy_quiet()
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    return profile


def build_options(precision: str, refittable: bool = False, optimization_level: int | None = None,
                  workspace_bytes: int | None = None) -> dict[str, Any]:
    """The build configuration as plain data (what goes into the plan's cache key and manifest)."""
    if precision not in TRT_PRECISIONS:
        raise InvalidParameterError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {precision!r}")
    if optimization_level is not None and not 0 <= int(optimization_level) <= 5:
        raise InvalidParameterError(f"builder optimization level must be 0..5, got {optimization_level}")
    return {
        "precision": precision,
        "tf32": False,
        "fp16": False,  # fp16 comes from the ONNX types of a strongly typed network
        "bf16": precision == "bf16",
        "strongly_typed": precision != "bf16",
        "refittable": bool(refittable),
        "builder_optimization_level": None if optimization_level is None else int(optimization_level),
        "workspace_bytes": None if workspace_bytes is None else int(workspace_bytes),
    }


def supports_precision(trt, precision: str) -> bool:
    """Whether the installed TensorRT can build ``precision``: fp32 and fp16 always (strongly typed); bf16
    only where the weak-typing ``BuilderFlag.BF16`` exists (TensorRT 10; removed in 11)."""
    if precision == "bf16":
        return hasattr(trt.BuilderFlag, "BF16")
    return precision in TRT_PRECISIONS


def check_precision(trt, precision: str) -> None:
    """:class:`BackendUnavailableError` when the installed TensorRT cannot build ``precision``."""
    if not supports_precision(trt, precision):
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} cannot build {precision} plans: bf16 from the float32 ONNX needs "
            "BuilderFlag.BF16, which TensorRT 11 removed (it builds strongly typed networks only); use "
            "--precision fp16 or fp32, or TensorRT 10")


def create_config(options: Mapping[str, Any], shapes: Mapping[str, tuple[tuple[int, ...], ...]],
                  timing_cache: str | Path | None = None):
    """polygraphy ``CreateConfig`` for ``options`` (from :func:`build_options`) and one profile."""

    polygraphy_quiet()
    from polygraphy.backend.trt import CreateConfig

    kwargs: dict[str, Any] = dict(
        tf32=options["tf32"],
        fp16=options["fp16"],
        bf16=options["bf16"],
        refittable=options["refittable"],
        profiles=[make_profile(shapes)],
    )
    if timing_cache is not None:
        kwargs["load_timing_cache"] = str(timing_cache)
    if options.get("builder_optimization_level") is not None:
        kwargs["builder_optimization_level"] = options["builder_optimization_level"]
    if options.get("workspace_bytes") is not None:
        import tensorrt as trt  # only reached with a workspace limit, i.e. when building

        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: options["workspace_bytes"]}
    return CreateConfig(**kwargs)


def plan_key(onnx_sha256: str, trt_version_: str, gpu: GpuInfo, options: Mapping[str, Any],
             shapes: Mapping[str, Any]) -> str:
    """Everything a plan depends on: the optimized ONNX's bytes, TensorRT version, GPU, build options and
    profile shapes."""
    return stage_key(onnx=onnx_sha256, tensorrt=trt_version_, gpu=gpu.name,
                     compute_capability=list(gpu.compute_capability), options=dict(options),
                     shapes={k: [list(s) for s in v] for k, v in shapes.items()})


def timing_cache_path(root: str | Path, gpu: GpuInfo, trt_version_: str) -> Path:
    return Path(root) / "timing-cache" / f"{gpu.slug}-trt{trt_version_}.cache"


# -- needs TensorRT --------------------------------------------------------------------------------------
def build_plan(onnx_path: Path, out_dir: Path, spec: GraphSpec, dims: Mapping[str, int], batch: int,
               precision: str, dynamic_batch: tuple[int, int] | None = None, refittable: bool = False,
               timing_cache: Path | None = None, optimization_level: int | None = None,
               onnx_key: str | None = None) -> dict[str, Any]:
    """Build and save a plan for this GPU; returns its manifest record (file name under ``"file"``).
    ``onnx_key``: the hash of everything the ONNX file reads (its bytes and external data); default: the
    sha256 of the file."""
    trt = require_tensorrt()
    check_precision(trt, precision)  # before any work
    onnx_key = onnx_key or file_digest(onnx_path)

    polygraphy_quiet()
    from polygraphy.backend.trt import engine_bytes_from_network, network_from_onnx_path

    gpu = current_gpu()
    version = str(trt.__version__)
    options = build_options(precision, refittable, optimization_level)
    shapes = profile_shapes(spec, dims, batch, dynamic_batch)
    config = create_config(options, shapes, timing_cache)
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    network = network_from_onnx_path(str(onnx_path), strongly_typed=options["strongly_typed"])
    plan = engine_bytes_from_network(network, config=config,
                                     save_timing_cache=None if timing_cache is None else str(timing_cache))
    name = plan_filename(gpu.name, version, gpu.compute_capability)
    atomic_write_bytes(Path(out_dir) / name, bytes(plan))
    seconds = time.perf_counter() - start
    logger.info("%s: TensorRT %s plan for %s built in %.1f s", spec.name, precision, gpu.name, seconds)
    return {
        "file": name,
        "key": plan_key(onnx_key, version, gpu, options, shapes),
        "gpu": gpu.name,
        "compute_capability": list(gpu.compute_capability),
        "tensorrt": version,
        "config": options,
        "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
        "seconds": seconds,
    }


def load_plan(entry: ArtifactEntry, plan_name: str | None = None):
    """Deserialize this GPU's plan of ``entry`` after checking its TensorRT version and GPU."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import engine_from_bytes

    gpu = current_gpu()
    version = str(trt.__version__)
    name = plan_name or plan_filename(gpu.name, version, gpu.compute_capability)
    path = entry.check_plan(name, gpu.name, version, gpu.compute_capability)
    return engine_from_bytes(path.read_bytes())


def validate_plan(spec: GraphSpec, pipe: Any, entry: ArtifactEntry, plan_name: str, batches=(1,),
                  seed: int | None = None):
    """TensorRT (polygraphy ``TrtRunner``) against the float32 torch module, like
    :func:`profusion_rt.export.validate.validate_onnx`."""
    from polygraphy.backend.trt import TrtRunner

    engine = load_plan(entry, plan_name)
    seed = fresh_seed() if seed is None else int(seed)
    module = spec.build_module(pipe)
    checks = []
    with TrtRunner(engine) as runner:
        for i, batch in enumerate(batches):
            feeds, ref_feeds = draw_inputs(spec, pipe, batch, seed + i, entry.precision)
            ref = torch_reference(module, spec, ref_feeds)
            start = time.perf_counter()
            outs = runner.infer({k: v.cpu().numpy() for k, v in feeds.items()})
            seconds = time.perf_counter() - start
            for name in spec.output_names:
                checks.append(compare(spec, entry.precision, "tensorrt", batch, seed + i, name,
                                      outs[name], ref[name], seconds))
    return checks
