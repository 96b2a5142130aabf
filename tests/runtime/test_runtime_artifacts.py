"""A Runtime built from an artifact folder alone (no model weights): every network from the exported graphs
on onnxruntime, against the eager reference pipeline on the same seeds; typed errors; the CLI path; the
serving imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from profusion_rt.core.errors import InvalidParameterError, ModelLoadError, PromptError  # noqa: E402
from profusion_rt.runtime import Runtime, create_runtime_from_artifacts  # noqa: E402
from profusion_rt.runtime.artifact_pipeline import REQUIRED_GRAPHS, ArtifactRuntime, GraphRunner  # noqa: E402
from profusion_rt.runtime.parity import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=STEPS, seed=5)


@pytest.fixture(scope="module")
def artifacts(tiny_pipe, tmp_path_factory):
    """The graphs an artifact-only runtime needs (legacy exporter: fast), symbolic batch 1..4."""
    from profusion_rt.export.cache import export_artifacts

    root = tmp_path_factory.mktemp("artifact-runtime")
    export_artifacts(tiny_pipe, root, graphs=list(REQUIRED_GRAPHS), validate=False, batch=1, dynamic_batch=(1, 4),
                     exporter="legacy")
    return root


@pytest.fixture(scope="module")
def runtime(artifacts):
    return Runtime.from_artifacts(artifacts, threads=1)


def _assert_parity(out, ref):
    parity = compare(out.latents, ref.latents, out.images, ref.images)
    assert parity.ok(latent_rel_tol=1e-4, pixel_fraction=0.99), parity


def test_matches_eager_with_a_reference_image(tiny_pipe, runtime, astronaut):
    ref = tiny_pipe(reference_image=astronaut, output_type="np", **KW)
    out = runtime(reference_image=astronaut, output_type="np", **KW)
    assert out.seeds == ref.seeds
    _assert_parity(out, ref)


def test_matches_eager_on_a_batch(tiny_pipe, runtime, astronaut):
    # two prompts x two images each = one batch of 4 in every graph; the reference by its posterior mean
    kw = dict(KW, prompt=["a {S*} in the snow", "a {S*} as a knight"], num_images_per_prompt=2, seed=11,
              reference_mode="mean")
    ref = tiny_pipe(reference_image=astronaut, output_type="np", **kw)
    out = runtime(reference_image=astronaut, output_type="np", **kw)
    assert out.latents.shape[0] == 4 and out.seeds == ref.seeds
    _assert_parity(out, ref)


def test_matches_eager_without_a_reference(tiny_pipe, runtime):
    kw = dict(prompt="a photo of a cat", num_inference_steps=STEPS, seed=3)
    ref = tiny_pipe(output_type="np", **kw)
    out = runtime(output_type="np", **kw)
    _assert_parity(out, ref)


def test_generate_batch_matches_eager(tiny_pipe, runtime, astronaut):
    reqs = [dict(KW, reference_image=astronaut, seed=s, output_type="latent") for s in (1, 2)]
    for req, out in zip(reqs, runtime.generate_batch(reqs)):
        ref = tiny_pipe(**req).images
        torch.testing.assert_close(out.images, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_runs_the_exported_graphs_without_weights(runtime, tiny_pipe):
    from profusion_rt.artifacts.store import ORT_ONNX_FILE, model_hash
    from profusion_rt.models import text as textenc

    assert isinstance(runtime, ArtifactRuntime) and runtime.pipe.model_hash == model_hash(tiny_pipe)
    assert not any(hasattr(runtime.pipe, n) for n in ("unet", "vae", "text_encoder", "image_encoder", "promptnet"))
    assert not any(isinstance(v, torch.nn.Module) for v in vars(runtime.pipe).values())
    assert {e.path.name for e in (runtime.fusion_engine, runtime.refinement_engine)} == {ORT_ONNX_FILE}
    # the token table reproduces the text encoder's embeddings exactly
    ids, _ = tiny_pipe._tokenize(["a {S*} in the snow"], allow_placeholder=True)
    torch.testing.assert_close(runtime.pipe.encoders.token_embeddings(ids),
                               textenc.token_embeddings(tiny_pipe.text_encoder, ids), rtol=0, atol=0)


def test_bad_requests_are_typed_errors(runtime, astronaut):
    with pytest.raises(PromptError, match="2 placeholders"):
        runtime(reference_image=astronaut, prompt="a {S*} and a {S*}", num_inference_steps=1)
    with pytest.raises(PromptError, match="no reference image"):
        runtime(prompt="a {S*}", num_inference_steps=1)
    with pytest.raises(PromptError, match="tokens long"):
        runtime(prompt="a cat " * 60, num_inference_steps=1)
    with pytest.raises(InvalidParameterError, match="num_inference_steps"):
        runtime(prompt="a cat", num_inference_steps=0)
    with pytest.raises(InvalidParameterError, match="weights"):
        runtime.apply_delta("subject.delta.safetensors")


def _model_dir(root: Path) -> Path:
    (model,) = [p for p in root.iterdir() if (p / "runtime.json").is_file()]
    return model


def _copy_model(src: Path, dst_root: Path, name: str | None = None, graphs: bool = False) -> Path:
    """A copy of a model folder's metadata (runtime.json, tokenizer, token table), and its graphs if asked."""
    dst = dst_root / (name or src.name)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.name == "tokenizer" or graphs:
            shutil.copytree(item, dst / item.name)
    return dst


def test_missing_or_damaged_token_table(artifacts, tmp_path):
    model = _copy_model(_model_dir(artifacts), tmp_path)
    table = model / "token_embedding.safetensors"
    table.write_bytes(table.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="token embedding table .* is corrupt.*profusion-rt export"):
        create_runtime_from_artifacts(tmp_path)
    meta = json.loads((model / "runtime.json").read_text())
    del meta["token_embedding"]
    (model / "runtime.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="no token embedding table.*profusion-rt export --model tiny"):
        create_runtime_from_artifacts(tmp_path)


def test_missing_graphs_name_the_export_command(artifacts, tmp_path):
    _copy_model(_model_dir(artifacts), tmp_path)  # metadata only, no graphs
    with pytest.raises(ModelLoadError, match="vae_decoder.*profusion-rt export --model tiny .*--graphs text_encoder,"):
        create_runtime_from_artifacts(tmp_path)
    with pytest.raises(ModelLoadError, match="fp16"):
        create_runtime_from_artifacts(artifacts, precision="fp16")


def test_model_folder_choice(artifacts, tmp_path):
    src = _model_dir(artifacts)
    with pytest.raises(ModelLoadError, match="no exported model"):
        create_runtime_from_artifacts(tmp_path)
    _copy_model(src, tmp_path, graphs=True)
    _copy_model(src, tmp_path, name="0000000000000000")
    with pytest.raises(ModelLoadError, match=f"2 exported models \\(0000000000000000, {src.name}\\).*--model-hash"):
        create_runtime_from_artifacts(tmp_path)
    with pytest.raises(ModelLoadError, match="no exported model ffff.*0000000000000000"):
        create_runtime_from_artifacts(tmp_path, model_hash="ffff")
    assert create_runtime_from_artifacts(tmp_path, model_hash=src.name, threads=1).pipe.model_hash == src.name
    # a model folder itself is accepted too
    assert create_runtime_from_artifacts(tmp_path / src.name, threads=1).pipe.model_hash == src.name


def test_bad_backend_or_precision(artifacts):
    with pytest.raises(InvalidParameterError, match="model weights"):
        create_runtime_from_artifacts(artifacts, "torch")
    with pytest.raises(InvalidParameterError, match="CUDA device"):
        create_runtime_from_artifacts(artifacts, "tensorrt")
    with pytest.raises(InvalidParameterError, match="precision"):
        create_runtime_from_artifacts(artifacts, precision="fp8")


def test_export_writes_the_token_table_again_when_missing(tiny_pipe, tmp_path):
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    builder = ArtifactBuilder(tiny_pipe, tmp_path, ExportOptions(exporter="legacy"))
    folder = builder.write_model_metadata()
    record = json.loads((folder / "runtime.json").read_text())["token_embedding"]
    assert record["tensors"] == {"token_embedding": [49408, 64], "position_embedding": [77, 64]}
    (folder / record["file"]).unlink()  # e.g. a folder exported before the table existed
    builder.write_model_metadata()
    assert json.loads((folder / "runtime.json").read_text())["token_embedding"]["sha256"] == record["sha256"]
    assert (folder / record["file"]).is_file()


class _FakeEngine:
    """Doubles its input; accepts batches in ``batch_range`` only."""

    def __init__(self, batch_range):
        self.batch_range = batch_range
        self.batches = []

    def run(self, feeds, outputs):
        x = feeds["latents"]
        assert self.batch_range[0] <= x.shape[0] <= self.batch_range[1]
        self.batches.append(int(x.shape[0]))
        outputs["images"].zero_()
        outputs["images"][:, :, :2, :2] = x[:, :3, :2, :2] * 2


def test_graph_runner_splits_and_pads_batches():
    dims = {"C": 4, "h": 2, "w": 2, "H": 4, "W": 4}
    engine = _FakeEngine((2, 3))
    runner = GraphRunner(engine, "vae_decoder", {"latents": "float32", "images": "float32"}, dims,
                         torch.device("cpu"))
    x = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    out = runner(latents=x)["images"]
    assert engine.batches == [3, 2]  # 3, then 1 padded to the engine's minimum of 2
    assert out.shape == (4, 3, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :, :2, :2], (x[:, :3] * 2).float())


def test_cli_generates_from_artifacts_alone(artifacts, tmp_path, capsys, astronaut):
    from PIL import Image

    from profusion_rt.cli import main

    face = tmp_path / "face.png"
    Image.fromarray(astronaut).save(face)
    out = tmp_path / "out.png"
    argv = ["generate", "--artifacts", str(artifacts), "--backend", "onnxruntime", "--image", str(face),
            "--prompt", "a {S*} wearing sunglasses", "--steps", "2", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "no weights loaded" in capsys.readouterr().out
    assert Image.open(out).size == (256, 256)
    bad = argv[:argv.index("--prompt")] + ["--prompt", "a {s*}"] + argv[argv.index("--prompt") + 2:]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "{S*}" in err[0]
    assert main(argv + ["--dtype", "fp16"]) == 2
    assert "--precision" in capsys.readouterr().err


def test_serving_imports_neither_export_nor_onnx(artifacts):
    code = (
        "import sys\n"
        "from profusion_rt.runtime.artifact_pipeline import create_runtime_from_artifacts\n"
        f"rt = create_runtime_from_artifacts({str(artifacts)!r}, threads=1)\n"
        "rt(prompt='a cat', num_inference_steps=1, output_type='np')\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'onnx', 'polygraphy', 'onnxscript',"
        " 'onnx_graphsurgeon', 'tensorrt'})\n"
        "bad += sorted(m for m in sys.modules if m.startswith('profusion_rt.export'))\n"
        "print('FORBIDDEN', bad)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FORBIDDEN []" in res.stdout, res.stdout


def test_benchmark_worker_builds_the_artifact_only_runtime(tiny_pipe, artifacts, astronaut):
    """The demo's ``onnxruntime-artifacts`` row: a worker job with ``artifacts_only`` gets the runtime built
    from the folder alone (not the pipeline's), and it matches the eager reference."""
    from profusion_rt.benchmarks.worker import create_backend_runtime

    job = {"backend": "onnxruntime", "artifacts": str(artifacts), "artifacts_only": True, "ort_threads": 1}
    runtime = create_backend_runtime(tiny_pipe, job)
    assert isinstance(runtime, ArtifactRuntime) and runtime.pipe is not tiny_pipe
    ref = tiny_pipe(reference_image=astronaut, output_type="np", **KW)
    _assert_parity(runtime(reference_image=astronaut, output_type="np", **KW), ref)
