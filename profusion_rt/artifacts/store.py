"""The artifact cache: layout, manifests, hashes and atomic writes (docs/architecture.md, "Artifacts are
content-addressed").

Layout::

    <root>/<model_hash>/runtime.json                  what a runtime needs besides the engines
    <root>/<model_hash>/tokenizer/                     tokenizer.save_pretrained copy
    <root>/<model_hash>/token_embedding.safetensors    the text encoder's token and position embeddings
                                                       (float32; sha256 in runtime.json)
    <root>/<model_hash>/<graph>/<precision>-<shape_key>/
        model.onnx            (+ model.onnx.data when the graph is over 2 GB)
        model.opt.onnx        constant-folded, shape-inferred; reads model.onnx.data when there is one
        model.ort.onnx        stage graphs only: model.opt.onnx with attention as com.microsoft.MultiHeadAttention
                              (onnxruntime only; absent when nothing was fused); same data file
        <gpu-slug>-trt<version>.plan                  one per GPU and TensorRT version
        manifest.json                                  written last

The manifest records the versions of the tools, the weights' hash, the spec's hash, precision, shapes,
opset, the sha256 and size of every file, the key of every build stage and the validation results.
:meth:`ArtifactStore.find` verifies every file against the manifest; a corrupt or truncated artifact is
logged and treated as missing, never used. Everything is written to a temporary name and renamed
(``os.replace``), the manifest last, so a reader never sees a half-written artifact as valid.

Only the standard library and torch are used here: a serving install needs neither onnx nor polygraphy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from profusion_rt.artifacts.specs import model_dims
from profusion_rt.core.errors import ModelLoadError, ProFusionError
from profusion_rt.core.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    json_default,
    replace_dir,
    staging_dir,
)
from profusion_rt.models.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "RUNTIME_JSON",
    "TOKEN_EMBEDDING_FILE",
    "ONNX_FILE",
    "OPT_ONNX_FILE",
    "ORT_ONNX_FILE",
    "ArtifactError",
    "ArtifactEntry",
    "ArtifactStore",
    "RuntimeMetadata",
    "file_digest",
    "gpu_slug",
    "load_runtime_metadata",
    "model_hash",
    "plan_filename",
    "shape_key",
    "stage_key",
    "tool_versions",
    "write_runtime_metadata",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RUNTIME_JSON = "runtime.json"
TOKENIZER_DIR = "tokenizer"
#: safetensors file beside runtime.json: ``token_embedding`` (vocab, D) and ``position_embedding`` (L, D),
#: float32, so that token_embeddings(ids) = token_embedding[ids] + position_embedding without the weights
TOKEN_EMBEDDING_FILE = "token_embedding.safetensors"
ONNX_FILE = "model.onnx"
OPT_ONNX_FILE = "model.opt.onnx"
#: the optimized model with onnxruntime contrib ops (com.microsoft.MultiHeadAttention); TensorRT cannot parse it
ORT_ONNX_FILE = "model.ort.onnx"
#: protobuf cannot hold more than 2 GiB: above this the weights go to ``<model file>.data``
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


class ArtifactError(ProFusionError):
    """An artifact is missing, corrupt, or was built for another model, spec, GPU or TensorRT version."""


# -- hashing ---------------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike, chunk: int = 8 * 1024 * 1024) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def stage_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of everything a build stage depends on."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def _config_dict(net: Any) -> dict[str, Any]:
    cfg = getattr(net, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif not isinstance(cfg, Mapping):
        from dataclasses import asdict, is_dataclass

        cfg = asdict(cfg) if is_dataclass(cfg) else {}
    # drop bookkeeping that changes with library versions (``_diffusers_version``, ``transformers_version``)
    # or when a model is saved (transformers fills in ``architectures`` and ``dtype``)
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype"})


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    if tokenizer is None:
        return ""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with contextlib.suppress(Exception):
        h.update(canonical_json(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "model_max_length", "")).encode())
    h.update(str(getattr(tokenizer, "pad_token", "")).encode())
    return h.hexdigest()


def model_hash(pipe: Any, length: int = 16) -> str:
    """Content hash of a pipeline: every parameter and persistent buffer of every network (name, dtype,
    shape and bytes, one tensor at a time in sorted order), the networks' configs, the scheduler config,
    the tokenizer's vocabulary, ``text_skip_layers`` and the resolution. Weights are hashed in the dtype
    they are held in (export loads float32). Returns the first ``length`` hex digits of the sha256."""
    import torch

    h = hashlib.sha256(b"profusion-rt/model-hash/1\n")
    for name, net in sorted(pipe.networks().items()):
        h.update(f"network {name} {type(net).__name__}\n".encode())
        h.update(canonical_json(_config_dict(net)).encode())
        for key, tensor in sorted(net.state_dict().items()):
            t = tensor.detach()
            h.update(f"{key} {str(t.dtype)} {tuple(t.shape)}\n".encode())
            if t.numel() == 0:
                continue
            flat = t.reshape(-1).contiguous().cpu()
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    scheduler_cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    h.update(canonical_json({
        "scheduler": scheduler_cfg,
        "text_skip_layers": int(pipe.text_skip_layers),
        "resolution": int(pipe.resolution),
        "tokenizer": _tokenizer_fingerprint(getattr(pipe, "tokenizer", None)),
    }).encode())
    return h.hexdigest()[:length]


# -- names -----------------------------------------------------------------------------------------------
def shape_key(resolution: int, batch: int, dynamic_batch: tuple[int, int] | None = None) -> str:
    """``r256-b1`` for a static batch; ``r256-b1-dyn1to8`` for a symbolic batch axis whose engine profile
    spans 1..8 with ``batch`` as the optimum."""
    key = f"r{int(resolution)}-b{int(batch)}"
    if dynamic_batch is not None:
        lo, hi = (int(v) for v in dynamic_batch)
        key += f"-dyn{lo}to{hi}"
    return key


def gpu_slug(gpu_name: str, compute_capability: tuple[int, int] | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (``-sm90`` appended when the compute
    capability is given)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    if compute_capability is not None:
        slug += f"-sm{compute_capability[0]}{compute_capability[1]}"
    return slug


def plan_filename(gpu_name: str, trt_version: str, compute_capability: tuple[int, int] | None = None) -> str:
    """``<gpu-slug>-trt<version>.plan``: a plan only runs on the GPU and TensorRT version it was built for."""
    return f"{gpu_slug(gpu_name, compute_capability)}-trt{trt_version}.plan"


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str | None]:
    """Installed versions of everything an artifact depends on (``None`` when not installed); read from
    the package metadata, so nothing is imported."""
    trt = None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"):
        trt = _dist_version(dist)
        if trt:
            break
    ort = _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu")
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": _dist_version("diffusers"),
        "transformers": _dist_version("transformers"),
        "onnx": _dist_version("onnx"),
        "onnxscript": _dist_version("onnxscript"),
        "onnxruntime": ort,
        "onnx_graphsurgeon": _dist_version("onnx-graphsurgeon") or _dist_version("onnx_graphsurgeon"),
        "polygraphy": _dist_version("polygraphy"),
        "tensorrt": trt,
    }


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": file_digest(path), "size": path.stat().st_size}


# -- reading ---------------------------------------------------------------------------------------------
@dataclass
class ArtifactEntry:
    """One verified artifact folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def graph(self) -> str:
        return self.manifest["graph"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def shape_key(self) -> str:
        return self.manifest["shape_key"]

    @property
    def model_hash(self) -> str:
        return self.manifest["model_hash"]

    @property
    def spec_hash(self) -> str:
        return self.manifest["spec_hash"]

    @property
    def batch(self) -> int:
        return int(self.manifest["batch"])

    @property
    def dynamic_batch(self) -> tuple[int, int] | None:
        d = self.manifest.get("dynamic_batch")
        return None if d is None else (int(d[0]), int(d[1]))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Concrete shapes at the artifact's batch (name -> shape)."""
        return {k: tuple(v) for k, v in self.manifest["shapes"].items()}

    @property
    def dtypes(self) -> dict[str, str]:
        return dict(self.manifest["dtypes"])

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["inputs"])

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["outputs"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("files", {}))

    def _file(self, name: str) -> Path | None:
        return self.path / name if name in self.files else None

    @property
    def onnx_path(self) -> Path | None:
        return self._file(ONNX_FILE)

    @property
    def opt_onnx_path(self) -> Path | None:
        """The optimized, backend-neutral ONNX (what TensorRT loads, and onnxruntime when there is no
        :attr:`ort_onnx_path`)."""
        return self._file(OPT_ONNX_FILE)

    @property
    def ort_onnx_path(self) -> Path | None:
        """The optimized ONNX with onnxruntime contrib ops (attention as ``com.microsoft.MultiHeadAttention``):
        what onnxruntime should load when there is one. None when the export fused nothing (or predates it)."""
        return self._file(ORT_ONNX_FILE)

    @property
    def plans(self) -> dict[str, dict[str, Any]]:
        """plan file name -> its record (``gpu``, ``compute_capability``, ``tensorrt``, ``config``, ...)."""
        return dict(self.manifest.get("stages", {}).get("plans", {}))

    def plan_path(self, gpu_name: str, trt_version: str, compute_capability: tuple[int, int] | None = None) -> Path | None:
        """The plan built for this GPU and TensorRT version, or None."""
        name = plan_filename(gpu_name, trt_version, compute_capability)
        return self._file(name) if name in self.plans else None

    def check_plan(self, plan_name: str, gpu_name: str, trt_version: str,
                   compute_capability: tuple[int, int] | None = None) -> Path:
        """The path of plan ``plan_name`` after checking it was built for this GPU and TensorRT version;
        :class:`ArtifactError` naming both otherwise."""
        record = self.plans.get(plan_name)
        if record is None or plan_name not in self.files:
            raise ArtifactError(f"{self.graph}: no TensorRT plan {plan_name} in {self.path}")
        if str(record.get("tensorrt")) != str(trt_version):
            raise ArtifactError(
                f"{self.graph}: plan {plan_name} was built with TensorRT {record.get('tensorrt')}, "
                f"this machine has TensorRT {trt_version}; rebuild it with `profusion-rt export --backend tensorrt`")
        if gpu_slug(record.get("gpu", "")) != gpu_slug(gpu_name) or (
                compute_capability is not None and record.get("compute_capability") is not None
                and tuple(record["compute_capability"]) != tuple(compute_capability)):
            raise ArtifactError(
                f"{self.graph}: plan {plan_name} was built for GPU {record.get('gpu')!r}, this is {gpu_name!r}; "
                "rebuild it with `profusion-rt export --backend tensorrt`")
        return self.path / plan_name

    @property
    def validation(self) -> dict[str, Any]:
        return dict(self.manifest.get("validation", {}))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("unreadable manifest in %s (%s): treated as missing", folder, exc)
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        logger.warning("manifest in %s has another format: treated as missing", folder)
        return None
    return manifest


def verify_files(folder: Path, files: Mapping[str, Mapping[str, Any]], verify: str = "hash") -> dict[str, str]:
    """name -> "ok" | "missing" | "truncated" | "corrupt" for every file recorded in a manifest.
    ``verify="size"`` only compares sizes (fast; catches truncation, not bit flips)."""
    status = {}
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            status[name] = "missing"
        elif path.stat().st_size != int(record.get("size", -1)):
            status[name] = "truncated"
        elif verify == "hash" and file_digest(path) != record.get("sha256"):
            status[name] = "corrupt"
        else:
            status[name] = "ok"
    return status


class ArtifactStore:
    """Read access to an artifact root (the export side writes through the same layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def model_dir(self, model_hash: str) -> Path:
        return self.root / model_hash

    def artifact_dir(self, model_hash: str, graph: str, precision: str, shape_key: str) -> Path:
        return self.root / model_hash / graph / f"{precision}-{shape_key}"

    def models(self) -> list[str]:
        """Model hashes that have a ``runtime.json``."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / RUNTIME_JSON).is_file())

    def find(self, model_hash: str, graph: str, precision: str, shape_key: str,
             verify: str = "hash") -> ArtifactEntry | None:
        """The artifact if its manifest exists and every file it lists is intact; else None (a corrupt or
        truncated file is logged as a warning and the artifact treated as missing)."""
        folder = self.artifact_dir(model_hash, graph, precision, shape_key)
        manifest = read_manifest(folder)
        if manifest is None:
            return None
        if (manifest.get("model_hash"), manifest.get("graph"), manifest.get("precision"),
                manifest.get("shape_key")) != (model_hash, graph, precision, shape_key):
            logger.warning("manifest in %s describes another artifact: treated as missing", folder)
            return None
        bad = {k: v for k, v in verify_files(folder, manifest.get("files", {}), verify).items() if v != "ok"}
        if bad:
            logger.warning("artifact %s is damaged (%s): treated as missing", folder,
                           ", ".join(f"{k} {v}" for k, v in sorted(bad.items())))
            return None
        return ArtifactEntry(folder, manifest)

    def entries(self, model_hash: str, verify: str = "size") -> list[ArtifactEntry]:
        """Every intact artifact of a model."""
        out = []
        base = self.model_dir(model_hash)
        if not base.is_dir():
            return out
        for manifest_path in sorted(base.glob(f"*/*/{MANIFEST}")):
            m = read_manifest(manifest_path.parent)
            if m is None:
                continue
            entry = self.find(m.get("model_hash", ""), m.get("graph", ""), m.get("precision", ""),
                              m.get("shape_key", ""), verify=verify)
            if entry is not None:
                out.append(entry)
        return out


# -- runtime metadata ------------------------------------------------------------------------------------
@dataclass
class RuntimeMetadata:
    """What a runtime needs besides the engines: shapes, constants, tokenizer and scheduler config."""

    path: Path
    model_hash: str
    preset: str | None
    resolution: int
    latent_shape: tuple[int, int, int]
    vae_scaling_factor: float
    text_skip_layers: int
    dims: dict[str, int]
    scheduler: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def load_tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)


def token_embedding_tables(text_encoder: Any) -> dict[str, Any]:
    """The tables a runtime needs to compute the text encoder's token + position embeddings without its
    weights (the stage graphs take token embeddings as input): ``token_embedding`` (vocab, D) and
    ``position_embedding`` (L, D), the rows its position ids add, float32 on the CPU."""
    import torch

    emb = text_encoder.embeddings
    with torch.no_grad():
        positions = emb.position_embedding(emb.position_ids[0])
    return {"token_embedding": emb.token_embedding.weight.detach().float().cpu().contiguous(),
            "position_embedding": positions.detach().float().cpu().contiguous()}


def write_token_embedding(folder: Path, text_encoder: Any, model_hash_: str) -> dict[str, Any]:
    """Write :data:`TOKEN_EMBEDDING_FILE` into ``folder`` atomically; returns its ``runtime.json`` record."""
    from safetensors.torch import save

    tables = token_embedding_tables(text_encoder)
    # One metadata key: safetensors keeps metadata in a hash map whose iteration order varies from call to
    # call, so two keys could serialise in either order and the same table would hash differently.
    data = save(tables, metadata={"profusion_rt": json.dumps({"format": FORMAT_VERSION, "model_hash": model_hash_},
                                                             sort_keys=True)})
    atomic_write_bytes(folder / TOKEN_EMBEDDING_FILE, data)
    return {"file": TOKEN_EMBEDDING_FILE, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "dtype": "float32", "tensors": {k: list(v.shape) for k, v in tables.items()}}


def write_runtime_metadata(root: str | os.PathLike, pipe: Any, model_hash_: str) -> Path:
    """Write ``<root>/<model_hash>/runtime.json``, the ``tokenizer/`` copy and the token embedding table
    (atomically; the tokenizer folder is staged and renamed, ``runtime.json`` is written last). Returns the
    model folder."""

    folder = Path(root) / model_hash_
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / TOKENIZER_DIR
    if pipe.tokenizer is not None:
        with staging_dir(folder) as tmp:
            pipe.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            replace_dir(tmp / TOKENIZER_DIR, tok_dir)
    token_embedding = write_token_embedding(folder, pipe.text_encoder, model_hash_)
    scheduler_cfg = {k: v for k, v in dict(pipe.scheduler.config).items()}
    scheduler_cfg.setdefault("_class_name", type(pipe.scheduler).__name__)
    data = {
        "format": FORMAT_VERSION,
        "model_hash": model_hash_,
        "preset": getattr(pipe, "preset", None),
        "resolution": int(pipe.resolution),
        "latent_shape": list(pipe.latent_shape),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "text_skip_layers": int(pipe.text_skip_layers),
        "dims": model_dims(pipe),
        "scheduler": scheduler_cfg,
        "tokenizer": {
            "dir": TOKENIZER_DIR,
            "class": type(pipe.tokenizer).__name__ if pipe.tokenizer is not None else None,
            "model_max_length": int(getattr(pipe.tokenizer, "model_max_length", 77) or 77),
        },
        "token_embedding": token_embedding,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "versions": tool_versions(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(folder / RUNTIME_JSON, data)
    return folder


def load_runtime_metadata(root_or_model_dir: str | os.PathLike, model_hash_: str | None = None) -> RuntimeMetadata:
    """Read ``runtime.json`` from a model folder (``<root>/<model_hash>``) or from an artifact root: with
    ``model_hash_`` given, or when the root holds exactly one model. :class:`ModelLoadError` otherwise."""
    path = Path(root_or_model_dir)
    if model_hash_ is not None:
        path = path / model_hash_
    elif not (path / RUNTIME_JSON).is_file():
        models = ArtifactStore(path).models()
        if len(models) != 1:
            raise ModelLoadError(
                f"{path} holds {len(models)} exported models ({', '.join(models) or 'none'}); "
                "name the model folder <root>/<model_hash>")
        path = path / models[0]
    try:
        data = json.loads((path / RUNTIME_JSON).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"no {RUNTIME_JSON} in {path}: export the model first (profusion-rt export)") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {path / RUNTIME_JSON}: {exc}") from None
    if data.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"{path / RUNTIME_JSON} has format {data.get('format')!r}, expected {FORMAT_VERSION}")
    known = {"format", "model_hash", "preset", "resolution", "latent_shape", "vae_scaling_factor",
             "text_skip_layers", "dims", "scheduler", "tokenizer"}
    return RuntimeMetadata(
        path=path,
        model_hash=data["model_hash"],
        preset=data.get("preset"),
        resolution=int(data["resolution"]),
        latent_shape=tuple(int(v) for v in data["latent_shape"]),
        vae_scaling_factor=float(data["vae_scaling_factor"]),
        text_skip_layers=int(data["text_skip_layers"]),
        dims={k: int(v) for k, v in data["dims"].items()},
        scheduler=dict(data["scheduler"]),
        tokenizer=dict(data.get("tokenizer", {})),
        extra={k: v for k, v in data.items() if k not in known},
    )
