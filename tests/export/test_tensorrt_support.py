"""Everything around TensorRT that does not need the library: profile derivation from the spec, build
configuration assembly (real polygraphy objects), cache keys and plan names, the plan compatibility
check, and the error when TensorRT is missing. Building a plan needs TensorRT and a GPU."""

from __future__ import annotations

import pytest

from profusion_rt.artifacts.specs import GRAPHS
from profusion_rt.artifacts.store import ArtifactEntry, ArtifactError, gpu_slug, plan_filename
from profusion_rt.core.errors import BackendUnavailableError, InvalidParameterError

pytest.importorskip("polygraphy")

from profusion_rt.export import tensorrt as trt_export  # noqa: E402
from profusion_rt.runtime.trt_engine import tensorrt_available  # noqa: E402

DIMS = {"L": 77, "D": 64, "N": 1, "T": 17, "V": 64, "C": 4, "h": 32, "w": 32, "H": 256, "W": 256, "S": 4}
H100 = trt_export.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))


def test_static_profile_is_the_spec_at_the_batch():
    shapes = trt_export.profile_shapes(GRAPHS["fusion_stage"], DIMS, 2)
    assert list(shapes) == list(GRAPHS["fusion_stage"].input_names)
    assert shapes["x"] == ((2, 4, 32, 32),) * 3
    assert shapes["timestep"] == ((1,),) * 3 and shapes["scalars"] == ((4,),) * 3
    assert shapes["token_embeds"] == ((2, 77, 64),) * 3


def test_dynamic_profile_spans_the_batch_range_only_on_batch_axes():
    shapes = trt_export.profile_shapes(GRAPHS["unet"], DIMS, 2, dynamic_batch=(1, 8))
    assert shapes["sample"] == ((1, 4, 32, 32), (2, 4, 32, 32), (8, 4, 32, 32))
    assert shapes["encoder_hidden_states"] == ((1, 77, 64), (2, 77, 64), (8, 77, 64))
    assert shapes["timestep"] == ((1,), (1,), (1,))
    with pytest.raises(InvalidParameterError):
        trt_export.profile_shapes(GRAPHS["unet"], DIMS, 4, dynamic_batch=(1, 2))
    with pytest.raises(InvalidParameterError, match="allows"):
        trt_export.profile_shapes(GRAPHS["fusion_stage"], DIMS, 1, dynamic_batch=(1, 64))


def test_profile_becomes_a_polygraphy_profile():
    shapes = trt_export.profile_shapes(GRAPHS["unet"], DIMS, 1, dynamic_batch=(1, 4))
    profile = trt_export.make_profile(shapes)
    assert list(profile) == ["sample", "timestep", "encoder_hidden_states"]
    assert tuple(profile["sample"].max) == (4, 4, 32, 32) and tuple(profile["sample"].opt) == (1, 4, 32, 32)


@pytest.mark.parametrize("precision, flags", [
    ("fp32", dict(fp16=False, bf16=False, tf32=False, strongly_typed=True)),
    ("fp16", dict(fp16=False, bf16=False, tf32=False, strongly_typed=True)),
    ("bf16", dict(fp16=False, bf16=True, tf32=False, strongly_typed=False)),
])
def test_build_options_per_precision(precision, flags):
    options = trt_export.build_options(precision)
    for k, v in flags.items():
        assert options[k] == v, k
    assert options["refittable"] is False
    assert trt_export.build_options(precision, refittable=True)["refittable"] is True


def test_build_options_reject_bad_values():
    with pytest.raises(InvalidParameterError):
        trt_export.build_options("int8")
    with pytest.raises(InvalidParameterError):
        trt_export.build_options("fp16", optimization_level=9)


def test_create_config_assembles_polygraphy_config(tmp_path):
    shapes = trt_export.profile_shapes(GRAPHS["unet"], DIMS, 1)
    options = trt_export.build_options("bf16", refittable=True, optimization_level=3)
    cache = tmp_path / "timing.cache"
    config = trt_export.create_config(options, shapes, timing_cache=cache)
    from polygraphy.backend.trt import CreateConfig

    assert isinstance(config, CreateConfig)
    assert config.bf16 and not config.fp16 and not config.tf32
    assert config.refittable and config.builder_optimization_level == 3
    assert config.timing_cache_path == str(cache)
    assert len(config.profiles) == 1 and tuple(config.profiles[0]["sample"].min) == (1, 4, 32, 32)


def test_plan_key_changes_with_every_input():
    shapes = trt_export.profile_shapes(GRAPHS["unet"], DIMS, 1)
    options = trt_export.build_options("fp16")
    base = trt_export.plan_key("a" * 64, "10.9.0", H100, options, shapes)
    assert base == trt_export.plan_key("a" * 64, "10.9.0", H100, dict(options), dict(shapes))
    variants = [
        trt_export.plan_key("b" * 64, "10.9.0", H100, options, shapes),
        trt_export.plan_key("a" * 64, "10.10.0", H100, options, shapes),
        trt_export.plan_key("a" * 64, "10.9.0", trt_export.GpuInfo("NVIDIA H200", (9, 0)), options, shapes),
        trt_export.plan_key("a" * 64, "10.9.0", H100, trt_export.build_options("fp16", refittable=True), shapes),
        trt_export.plan_key("a" * 64, "10.9.0", H100, options,
                            trt_export.profile_shapes(GRAPHS["unet"], DIMS, 2)),
    ]
    assert len({base, *variants}) == 6


def test_plan_names_and_timing_cache_path(tmp_path):
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert plan_filename("NVIDIA H100 80GB HBM3", "10.9.0.34", (9, 0)) == "nvidia-h100-80gb-hbm3-sm90-trt10.9.0.34.plan"
    path = trt_export.timing_cache_path(tmp_path, H100, "10.9.0")
    assert path == tmp_path / "timing-cache" / "nvidia-h100-80gb-hbm3-sm90-trt10.9.0.cache"


def _entry_with_plan(tmp_path):
    name = plan_filename(H100.name, "10.9.0", H100.compute_capability)
    (tmp_path / name).write_bytes(b"plan")
    manifest = {"graph": "unet", "precision": "fp16", "files": {name: {"sha256": "x", "size": 4}},
                "stages": {"plans": {name: {"gpu": H100.name, "compute_capability": [9, 0], "tensorrt": "10.9.0",
                                            "files": [name]}}}}
    return ArtifactEntry(tmp_path, manifest), name


def test_plan_compatibility_check(tmp_path):
    entry, name = _entry_with_plan(tmp_path)
    assert entry.plan_path(H100.name, "10.9.0", (9, 0)) == tmp_path / name
    assert entry.plan_path(H100.name, "10.10.0", (9, 0)) is None
    assert entry.check_plan(name, H100.name, "10.9.0", (9, 0)) == tmp_path / name
    with pytest.raises(ArtifactError, match="TensorRT 10.9.0.*TensorRT 10.10.0"):
        entry.check_plan(name, H100.name, "10.10.0", (9, 0))
    with pytest.raises(ArtifactError, match="built for GPU"):
        entry.check_plan(name, "NVIDIA A100-SXM4-80GB", "10.9.0", (8, 0))


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(tiny_pipe, tmp_path):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        trt_export.require_tensorrt()
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    builder = ArtifactBuilder(tiny_pipe, tmp_path, ExportOptions(backend="tensorrt", precision="fp16",
                                                                 exporter="legacy"))
    with pytest.raises(BackendUnavailableError):
        builder.run(["unet"], progress=False)
    assert not any(tmp_path.iterdir())  # failed before doing any work


@pytest.mark.tensorrt
def test_build_and_validate_a_plan(tiny_pipe, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it cannot be on the project's machines)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT plans need a CUDA GPU")
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    builder = ArtifactBuilder(tiny_pipe, tmp_path, ExportOptions(backend="tensorrt", precision="fp16",
                                                                 exporter="legacy", validate=True))
    report = builder.run(["unet"], progress=False)[0]
    assert report.stages["tensorrt"] == "built" and report.passed
    again = builder.run(["unet"], progress=False)[0]
    assert again.stages["tensorrt"] == "cached"


def _tensorrt_module(version: str, flags: tuple[str, ...]):
    """A stand-in ``tensorrt`` module with the given builder flags (TensorRT 11 has no BF16 flag)."""
    import enum
    import types

    return types.SimpleNamespace(__version__=version, BuilderFlag=enum.Enum("BuilderFlag", flags))


def test_bf16_needs_the_weak_typing_flag_of_tensorrt_10():
    """Finding 5: TensorRT 11 removed BuilderFlag.BF16; fp32 and fp16 are strongly typed in both."""
    trt10 = _tensorrt_module("10.8.0", ("TF32", "FP16", "BF16", "REFIT"))
    trt11 = _tensorrt_module("11.0.0", ("TF32", "REFIT"))
    for precision in ("fp32", "fp16"):
        assert trt_export.supports_precision(trt10, precision) and trt_export.supports_precision(trt11, precision)
        assert trt_export.build_options(precision)["strongly_typed"] is True
    assert trt_export.supports_precision(trt10, "bf16")
    assert not trt_export.supports_precision(trt11, "bf16")
    with pytest.raises(BackendUnavailableError, match="BF16"):
        trt_export.check_precision(trt11, "bf16")


def test_bf16_build_on_tensorrt_11_is_refused_before_any_work(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt_module("11.0.0", ("TF32", "REFIT")))
    with pytest.raises(BackendUnavailableError, match="TensorRT 11"):
        trt_export.build_plan(tmp_path / "missing.onnx", tmp_path, GRAPHS["unet"], DIMS, 1, "bf16")
    assert not any(tmp_path.iterdir())
