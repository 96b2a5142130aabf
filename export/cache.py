"""The export driver: for each graph, build what is missing or stale and skip what is valid.

Stages of one artifact folder, each with a key over everything it depends on (recorded in the manifest):

=============  ============================================================================================
``onnx``       weights hash, spec hash, precision, export batch and batch mode, opset, exporter, and the
               versions of torch, onnx, onnxscript, diffusers and transformers
``optimize``   sha256 of ``model.onnx`` (+ data), polygraphy / onnx-graphsurgeon / onnx versions
``ort_fusion`` sha256 of ``model.opt.onnx`` (+ the data it reads), onnx / onnxruntime versions, the pass
               version; only for the graphs the onnxruntime runtime loads (:data:`ORT_FUSION_GRAPHS`)
``validation`` sha256 of ``model.opt.onnx`` and ``model.ort.onnx`` (+ data), onnxruntime version,
               tolerance, batches
``plans``      sha256 of ``model.opt.onnx``, TensorRT version, GPU, build options, profile shapes
=============  ============================================================================================

A stage is skipped when its key matches and its files are intact (sha256 and size against the manifest),
rebuilt otherwise; rebuilding a stage drops everything downstream of it. A corrupt or truncated file is
detected by its hash, logged and rebuilt, never used. The manifest is written after each stage, last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from profusion_rt.export import tensorrt as trt_mod
from profusion_rt.export.fp16 import to_mixed_fp16
from profusion_rt.export.onnx_export import (
    EXPORTERS,
    check_opset,
    export_onnx,
    resolve_exporter,
)
from profusion_rt.export.optimize import optimize_onnx
from profusion_rt.export import ort_fusion
from profusion_rt.export.ort_fusion import write_ort_model
from profusion_rt.export.validate import ValidationError, validate_onnx_files
from tqdm.auto import tqdm

from profusion_rt.artifacts.specs import (
    GRAPHS,
    GraphSpec,
    get_graph,
    model_dims,
    precision_dtype,
    torch_dtype,
)
from profusion_rt.artifacts.store import (
    FORMAT_VERSION,
    ONNX_FILE,
    OPT_ONNX_FILE,
    ORT_ONNX_FILE,
    RUNTIME_JSON,
    ArtifactEntry,
    ArtifactStore,
    file_record,
    model_hash,
    plan_filename,
    read_manifest,
    shape_key,
    stage_key,
    tool_versions,
    verify_files,
    write_runtime_metadata,
)
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.core.fsio import atomic_write_json

logger = logging.getLogger(__name__)

BACKENDS = ("onnx", "tensorrt")
#: graphs that get an onnxruntime-specific ``model.ort.onnx`` (attention as com.microsoft.MultiHeadAttention,
#: export/ort_fusion.py): the ones the runtime's onnxruntime backend loads. The other graphs are exported for
#: TensorRT or as standalone networks and keep only the backend-neutral ``model.opt.onnx``.
ORT_FUSION_GRAPHS = frozenset({"fusion_stage", "refinement_stage"})


@dataclass
class ExportOptions:
    precision: str = "fp32"
    backend: str = "onnx"
    batch: int = 1
    #: None: static batch. (lo, hi): symbolic batch axis; TensorRT profile lo..hi with ``batch`` as optimum.
    dynamic_batch: tuple[int, int] | None = None
    opset: int = 18
    exporter: str = "dynamo"
    validate: bool = False
    force: bool = False
    refittable: bool = False
    optimization_level: int | None = None
    validation_seed: int | None = None

    def check(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise InvalidParameterError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.precision == "bf16" and self.backend != "tensorrt":
            raise InvalidParameterError("bf16 is a TensorRT build precision (from the float32 ONNX); "
                                        "use --backend tensorrt, or fp32/fp16 for ONNX")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise InvalidParameterError(f"batch must be an integer >= 1, got {self.batch!r}")
        if self.dynamic_batch is not None:
            lo, hi = self.dynamic_batch
            if not 1 <= lo <= self.batch <= hi:
                raise InvalidParameterError(
                    f"the dynamic batch range {lo}..{hi} must contain the batch {self.batch} and start at >= 1")
        check_opset(self.opset)
        if self.exporter not in EXPORTERS:
            raise InvalidParameterError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")


@dataclass
class GraphReport:
    """What happened to one graph."""

    graph: str
    path: Path
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "built" | "cached"
    seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes
    checks: list[dict[str, Any]] = field(default_factory=list)
    #: the ort_fusion stage's record (``fused``, ``unmatched_softmax``, ``file``), when it ran or was cached
    ort_fusion: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def summary(self) -> str:
        parts = [f"{stage} {how}" + (f" {self.seconds[stage]:.1f}s" if how == "built" and stage in self.seconds else "")
                 + (self._fusion_note() if stage == "ort_fusion" else "")
                 for stage, how in self.stages.items()]
        mb = sum(self.sizes.values()) / 1e6
        return f"{self.graph}: {', '.join(parts)}; {mb:.1f} MB -> {self.path}"

    def _fusion_note(self) -> str:
        f = self.ort_fusion or {}
        if "fused" not in f:
            return ""
        target = ORT_ONNX_FILE if f.get("file") else "no file, onnxruntime uses " + OPT_ONNX_FILE
        return f" ({f['fused']} attention fused, {f.get('unmatched_softmax', '?')} softmax left; {target})"


def export_batch(options: ExportOptions) -> int:
    """The batch of the example inputs traced at export. torch.export specialises a size-1 dimension to
    the constant 1, so a symbolic batch is traced at 2 or more."""
    return max(options.batch, 2) if options.dynamic_batch is not None else options.batch


class ArtifactBuilder:
    """Exports the graphs of one pipeline into an artifact root."""

    def __init__(self, pipe: Any, root: str | Path, options: ExportOptions | None = None,
                 model_hash_: str | None = None):
        self.pipe = pipe
        self.options = options or ExportOptions()
        self.options.check()
        if pipe.dtype != torch.float32:
            raise InvalidParameterError("export needs the pipeline in float32 (the fp16 variant is derived from it)")
        self.store = ArtifactStore(root)
        self.root = Path(root)
        self.model_hash = model_hash_ or model_hash(pipe)
        self.dims = model_dims(pipe)
        self.versions = tool_versions()
        self._trt = None

    # -- public ----------------------------------------------------------------------------------------
    def run(self, graphs: Sequence[str] | None = None, progress: bool = True, strict: bool = True,
            on_report=None) -> list[GraphReport]:
        """Export ``graphs`` (default: all). With ``strict``, a failed validation raises
        :class:`~profusion_rt.export.validate.ValidationError` after every graph has been processed."""
        names = list(graphs) if graphs else list(GRAPHS)
        specs = [get_graph(n) for n in names]
        if self.options.backend == "tensorrt":

            trt_mod.require_tensorrt()  # fail before any work
            self._trt = (trt_mod, trt_mod.current_gpu(), trt_mod.trt_version())
        self.write_model_metadata()
        reports = []
        bar = tqdm(specs, desc="export", unit="graph", disable=not progress, leave=False)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            report = self.export_graph(spec, bar if progress else None)
            reports.append(report)
            if on_report is not None:
                on_report(report)
        bar.close()
        if strict:
            for r in reports:
                for c in r.checks:
                    if not c["passed"]:
                        model = f", {c['model']}" if c.get("model") else ""
                        raise ValidationError(f"{c['graph']} ({c['precision']}, batch {c['batch']}{model})",
                                              c["output"], c["error"], c["backend"])
        return reports

    def write_model_metadata(self) -> Path:
        """``runtime.json`` + ``tokenizer/`` + the token embedding table at ``<root>/<model_hash>/``, unless
        already there, equal and intact (a folder exported before the table existed gets it now)."""
        folder = self.store.model_dir(self.model_hash)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            old = json.loads((folder / RUNTIME_JSON).read_text())
            table = old.get("token_embedding") or {}
            table_ok = bool(table) and verify_files(folder, {table["file"]: table})[table["file"]] == "ok"
            if (old.get("format") == FORMAT_VERSION and old.get("dims") == self.dims
                    and old.get("model_hash") == self.model_hash and (folder / "tokenizer").is_dir() and table_ok):
                return folder
        return write_runtime_metadata(self.root, self.pipe, self.model_hash)

    def artifact_dir(self, spec: GraphSpec) -> Path:
        o = self.options
        key = shape_key(self.pipe.resolution, o.batch, o.dynamic_batch)
        return self.store.artifact_dir(self.model_hash, spec.name, o.precision, key)

    # -- one graph -------------------------------------------------------------------------------------
    def export_graph(self, spec: GraphSpec | str, bar=None) -> GraphReport:
        spec = get_graph(spec) if isinstance(spec, str) else spec
        o = self.options
        folder = self.artifact_dir(spec)
        report = GraphReport(spec.name, folder)
        manifest = self._load_manifest(spec, folder)
        status = verify_files(folder, manifest["files"]) if manifest["files"] else {}
        bad = {k: v for k, v in status.items() if v != "ok"}
        if bad:
            logger.warning("%s: damaged files %s will be rebuilt", folder,
                           ", ".join(f"{k} ({v})" for k, v in sorted(bad.items())))
        stages = manifest["stages"]

        def ok(stage: str) -> bool:
            rec = stages.get(stage)
            return bool(rec) and all(status.get(f) == "ok" for f in rec.get("files", []))

        def note(stage):
            if bar is not None:
                bar.set_postfix_str(f"{spec.name}: {stage}")

        # 1. ONNX
        onnx_key = self._onnx_key(spec)
        if not o.force and ok("onnx") and stages["onnx"]["key"] == onnx_key:
            report.stages["onnx"] = "cached"
        else:
            note("onnx")
            self._drop(manifest, folder, ("onnx", "optimize", "ort_fusion", "validation", "plans"))
            info = self._export(spec, folder)
            self._record(manifest, folder, "onnx", info.files, key=onnx_key, seconds=info.seconds,
                         exporter=resolve_exporter(spec.name, o.exporter), external_data=info.external_data)
            status.update({f: "ok" for f in info.files})
            report.stages["onnx"], report.seconds["onnx"] = "built", info.seconds
        onnx_files = stages["onnx"]["files"]

        # 2. optimized ONNX
        opt_key = stage_key(inputs={f: manifest["files"][f]["sha256"] for f in onnx_files},
                            polygraphy=self.versions["polygraphy"], onnx=self.versions["onnx"],
                            graphsurgeon=self.versions["onnx_graphsurgeon"], passes=["fold_constants", "infer_shapes"],
                            batch_axes=spec.batch_axes() if o.dynamic_batch is not None else None)
        if not o.force and ok("optimize") and stages["optimize"]["key"] == opt_key:
            report.stages["optimize"] = "cached"
        else:
            note("optimize")

            self._drop(manifest, folder, ("optimize", "ort_fusion", "validation", "plans"))
            info = optimize_onnx(folder / ONNX_FILE, folder / OPT_ONNX_FILE,
                                 spec.batch_axes() if o.dynamic_batch is not None else None)
            self._record(manifest, folder, "optimize", info.files, key=opt_key, seconds=info.seconds,
                         nodes=[info.nodes_before, info.nodes_after], external_data=info.external_data,
                         uses=info.shared_data)
            status.update({f: "ok" for f in info.files})
            report.stages["optimize"], report.seconds["optimize"] = "built", info.seconds
        # everything the optimized model reads: its own files and the data file it may share with model.onnx
        opt_inputs = [*stages["optimize"]["files"], *stages["optimize"].get("uses", [])]
        opt_sha = {f: manifest["files"][f]["sha256"] for f in opt_inputs}

        # 3. onnxruntime-specific graph: attention -> com.microsoft.MultiHeadAttention (model.ort.onnx)
        if spec.name in ORT_FUSION_GRAPHS:

            ort_key = stage_key(inputs=opt_sha, onnx=self.versions["onnx"], onnxruntime=self.versions["onnxruntime"],
                                ort_pass=ort_fusion.PASS_VERSION)  # read at call time
            if not o.force and ok("ort_fusion") and stages["ort_fusion"]["key"] == ort_key:
                report.stages["ort_fusion"] = "cached"
            else:
                note("ort_fusion")

                self._drop(manifest, folder, ("ort_fusion", "validation"))
                info = write_ort_model(folder / OPT_ONNX_FILE, folder / ORT_ONNX_FILE)
                self._record(manifest, folder, "ort_fusion", info.files, key=ort_key, seconds=info.seconds,
                             fused=info.result.fused, unmatched_softmax=info.result.unmatched_softmax,
                             reasons=info.result.reasons, pass_version=ort_fusion.PASS_VERSION, uses=info.shared_data)
                status.update({f: "ok" for f in info.files})
                report.stages["ort_fusion"], report.seconds["ort_fusion"] = "built", info.seconds
            rec = stages["ort_fusion"]
            report.ort_fusion = {"fused": rec["fused"], "unmatched_softmax": rec["unmatched_softmax"],
                                 "file": ORT_ONNX_FILE if ORT_ONNX_FILE in rec["files"] else None}
        # what onnxruntime validates: the optimized model, and the onnxruntime-specific one when there is one
        ort_rec = stages.get("ort_fusion") or {}
        ort_inputs = [*ort_rec.get("files", []), *(ort_rec.get("uses", []) if ort_rec.get("files") else [])]
        validate_sha = {**opt_sha, **{f: manifest["files"][f]["sha256"] for f in ort_inputs}}

        # 4. validation on onnxruntime
        if o.validate:
            files = [OPT_ONNX_FILE, *([ORT_ONNX_FILE] if ORT_ONNX_FILE in ort_rec.get("files", []) else [])]
            self._validate_onnx(spec, folder, manifest, validate_sha, files, report, note)

        # 5. TensorRT plan (from the backend-neutral model.opt.onnx)
        if o.backend == "tensorrt":
            self._build_plan(spec, folder, manifest, status, report, note, opt_sha)

        report.sizes = {f: int(r["size"]) for f, r in manifest["files"].items()}
        return report

    # -- stages ----------------------------------------------------------------------------------------
    def _onnx_key(self, spec: GraphSpec) -> str:
        o = self.options
        v = self.versions
        return stage_key(model=self.model_hash, spec=spec.spec_hash(), precision=o.precision,
                         batch=export_batch(o), dynamic=o.dynamic_batch is not None, opset=o.opset,
                         exporter=resolve_exporter(spec.name, o.exporter),
                         versions={k: v[k] for k in ("torch", "onnx", "onnxscript", "diffusers", "transformers")})

    def _export(self, spec: GraphSpec, folder: Path):
        o = self.options
        module = spec.build_module(self.pipe)
        io_dtype = torch_dtype(precision_dtype(o.precision))
        if o.precision == "fp16":

            module = to_mixed_fp16(module)
        example = spec.sample_inputs(self.pipe, batch=export_batch(o), seed=0, dtype=io_dtype)
        return export_onnx(spec, module, example, folder / ONNX_FILE, opset=o.opset, exporter=o.exporter,
                           dynamic_batch=o.dynamic_batch is not None,
                           metadata={"model_hash": self.model_hash, "precision": o.precision})

    def _validation_batches(self) -> list[int]:
        o = self.options
        batches = [o.batch]
        if o.dynamic_batch is not None:
            other = o.batch + 1 if o.batch + 1 <= o.dynamic_batch[1] else o.dynamic_batch[0]
            if other != o.batch:
                batches.append(other)
        return batches

    def _validate_onnx(self, spec, folder, manifest, onnx_sha, files, report, note) -> None:
        """Validate every file of ``files`` (the optimized model, and ``model.ort.onnx`` when there is one:
        that is what onnxruntime runs) against torch on the same inputs; ``onnx_sha`` covers what they read."""

        o = self.options
        batches = self._validation_batches()
        key = stage_key(onnx=onnx_sha, onnxruntime=self.versions["onnxruntime"],
                        tolerance=list(spec.tolerance_for(o.precision)), batches=batches)
        cached = manifest["validation"].get("onnxruntime")
        if not o.force and cached and cached.get("key") == key and cached.get("passed") and o.validation_seed is None:
            report.stages["validate"] = "cached"
            report.checks += [{**c, "cached": True} for c in cached["checks"]]
            return
        note("validate")
        start = time.perf_counter()
        checks = validate_onnx_files(spec, self.pipe, [folder / f for f in files], o.precision, batches,
                                     o.validation_seed)
        seconds = time.perf_counter() - start
        rows = [c.to_json() for c in checks]
        manifest["validation"]["onnxruntime"] = {"key": key, "passed": all(c.passed for c in checks),
                                                  "checks": rows, "seconds": seconds,
                                                  "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write_manifest(manifest, folder)
        report.stages["validate"], report.seconds["validate"] = "built", seconds
        report.checks += rows

    def _build_plan(self, spec, folder, manifest, status, report, note, opt_sha) -> None:
        trt_mod, gpu, version = self._trt
        o = self.options
        shapes = trt_mod.profile_shapes(spec, self.dims, o.batch, o.dynamic_batch)
        options = trt_mod.build_options(o.precision, o.refittable, o.optimization_level)
        opt_file = folder / OPT_ONNX_FILE
        key = trt_mod.plan_key(stage_key(**opt_sha), version, gpu, options, shapes)
        name = plan_filename(gpu.name, version, gpu.compute_capability)
        plans = manifest["stages"].setdefault("plans", {})
        rec = plans.get(name)
        if not o.force and rec and rec.get("key") == key and status.get(name) == "ok":
            report.stages["tensorrt"] = "cached"
        else:
            note("tensorrt")
            rec = trt_mod.build_plan(opt_file, folder, spec, self.dims, o.batch, o.precision, o.dynamic_batch,
                                     o.refittable, trt_mod.timing_cache_path(self.root, gpu, version),
                                     o.optimization_level, onnx_key=stage_key(**opt_sha))
            rec["files"] = [rec.pop("file")]
            plans[name] = rec
            manifest["files"][name] = file_record(folder / name)
            self._write_manifest(manifest, folder)
            report.stages["tensorrt"], report.seconds["tensorrt"] = "built", rec["seconds"]
        if o.validate:
            note("validate tensorrt")
            checks = trt_mod.validate_plan(spec, self.pipe, ArtifactEntry(folder, manifest), name,
                                           self._validation_batches(), o.validation_seed)
            rows = [c.to_json() for c in checks]
            manifest["validation"][f"tensorrt:{name}"] = {"passed": all(c.passed for c in checks), "checks": rows}
            self._write_manifest(manifest, folder)
            report.checks += rows

    # -- manifest --------------------------------------------------------------------------------------
    def _load_manifest(self, spec: GraphSpec, folder: Path) -> dict[str, Any]:
        o = self.options
        old = read_manifest(folder)
        identity = {
            "format": FORMAT_VERSION,
            "graph": spec.name,
            "precision": o.precision,
            "shape_key": folder.name.split("-", 1)[1],
            "model_hash": self.model_hash,
        }
        if old is not None and any(old.get(k) != v for k, v in identity.items()):
            logger.warning("%s: manifest describes another artifact; starting over", folder)
            old = None
        if old is not None and old.get("spec_hash") != spec.spec_hash():
            logger.info("%s: the graph's spec changed; rebuilding", spec.name)
        manifest = old or {}
        inputs, outputs = spec.tensors(o.precision)
        manifest.update(identity)
        manifest.update({
            "spec_hash": spec.spec_hash(),
            "batch": o.batch,
            "dynamic_batch": list(o.dynamic_batch) if o.dynamic_batch else None,
            "inputs": list(spec.input_names),
            "outputs": list(spec.output_names),
            "shapes": {k: list(v) for k, v in spec.resolve_shapes(self.dims, o.batch).items()},
            "dtypes": {t.name: t.dtype for t in (*inputs, *outputs)},
            "dynamic_axes": spec.dynamic_axes if o.dynamic_batch else {},
            "dims": self.dims,
            "opset": o.opset,
            "versions": self.versions,
        })
        manifest.setdefault("files", {})
        manifest.setdefault("stages", {})
        manifest.setdefault("validation", {})
        return manifest

    def _record(self, manifest, folder, stage, files, **extra) -> None:
        for f in files:
            manifest["files"][f] = file_record(folder / f)
        manifest["stages"][stage] = {"files": list(files), **extra}
        self._write_manifest(manifest, folder)

    @staticmethod
    def _drop(manifest, folder: Path, stages: Iterable[str]) -> None:
        """Forget ``stages`` (and their files) before rebuilding: a reader never pairs new inputs with old
        outputs."""
        for stage in stages:
            if stage == "validation":
                manifest["validation"] = {}
                continue
            rec = manifest["stages"].pop(stage, None)
            if not rec:
                continue
            recs = rec.values() if stage == "plans" else [rec]
            for r in recs:
                for f in r.get("files", []):
                    manifest["files"].pop(f, None)
                    if stage in ("plans", "ort_fusion"):  # derived files that a rebuild may not write again
                        with contextlib.suppress(OSError):
                            (folder / f).unlink()

    @staticmethod
    def _write_manifest(manifest, folder: Path) -> None:
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(folder / "manifest.json", manifest)


def export_artifacts(pipe: Any, root: str | Path, graphs: Sequence[str] | None = None, progress: bool = False,
                     strict: bool = True, **options) -> list[GraphReport]:
    """Convenience wrapper: ``ArtifactBuilder(pipe, root, ExportOptions(**options)).run(graphs)``."""
    return ArtifactBuilder(pipe, root, ExportOptions(**options)).run(graphs, progress=progress, strict=strict)
