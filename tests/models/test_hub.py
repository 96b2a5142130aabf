"""Hugging Face hub ids, without any network: a tiny model written into a hub cache layout
(``models--org--name/snapshots/<rev>``, ``refs/main``) loads offline by id; the file selection for a download
prefers safetensors; missing ids, revisions and components give one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from profusion_rt.cli import main
from profusion_rt.core.errors import ModelLoadError
from profusion_rt.models import hub
from profusion_rt.pipeline import ProFusionPipeline

REV = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny-profusion"

# A listing shaped like a diffusers SD2 repository on the hub (fp32 and fp16 variants in both formats, a
# top-level checkpoint, a feature extractor), written from the diffusers naming rules.
SD2_BASE_FILES = [
    ".gitattributes", "512-base-ema.ckpt", "README.md", "model_index.json",
    "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
# The released ProFusion layout (train.py's save_pretrained: .bin only).
RELEASE_FILES = [
    "model_index.json", "feature_extractor/preprocessor_config.json", "openclip/config.json",
    "openclip/pytorch_model.bin", "promptnet/config.json", "promptnet/diffusion_pytorch_model.bin",
    "scheduler/scheduler_config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.bin",
]


# -- which files a download asks for ----------------------------------------------------------------------
def test_select_prefers_safetensors_and_skips_the_rest():
    chosen = hub.select_files(SD2_BASE_FILES)
    assert chosen == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ])


def test_select_takes_bin_when_there_is_no_safetensors():
    chosen = hub.select_files(RELEASE_FILES)
    assert chosen == sorted(f for f in RELEASE_FILES if not f.startswith("feature_extractor/"))
    # a component that has both gets only the safetensors file, the others keep their .bin
    both = hub.select_files(RELEASE_FILES + ["unet/diffusion_pytorch_model.safetensors"])
    assert "unet/diffusion_pytorch_model.bin" not in both and "unet/diffusion_pytorch_model.safetensors" in both
    assert "vae/diffusion_pytorch_model.bin" in both


def test_select_sharded_bare_and_our_layout():
    sharded = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
               "unet/diffusion_pytorch_model.bin.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.bin", "unet/diffusion_pytorch_model-00002-of-00002.bin"]
    assert hub.select_files(sharded) == sorted(sharded[:5])
    bare = ["config.json", "model.safetensors", "diffusion_pytorch_model.bin", "README.md", "openclip/config.json",
            "openclip/model.safetensors"]
    assert hub.select_files(bare) == ["config.json", "model.safetensors", "openclip/config.json",
                                      "openclip/model.safetensors"]
    ours = ["model_index.json", "image_encoder/config.json", "image_encoder/model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors", "openclip/config.json",
            "openclip/pytorch_model.bin"]
    assert not any(f.startswith("openclip/") for f in hub.select_files(ours))  # both encoders: openclip unread


def test_hub_id_form():
    assert hub.looks_like_hub_id("stabilityai/stable-diffusion-2-base")
    for name in ("tiny", "./org/name", "/abs/path", "a/b/c", "org/", "../x"):
        assert not hub.looks_like_hub_id(name), name


# -- a hub cache on disk ----------------------------------------------------------------------------------
def _write_cache(pipe, cache, repo, rev=REV, ref="main"):
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / rev
    pipe.save_pretrained(snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(rev)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny_pipe, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    _write_cache(tiny_pipe, cache, REPO)
    broken = _write_cache(tiny_pipe, cache, "org/broken")
    shutil.rmtree(broken / "unet")
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(hub, "_list_repo_files", refuse)


def _same_weights(a, b):
    for name, net in a.networks().items():
        other = b.networks()[name].state_dict()
        for k, v in net.state_dict().items():
            assert torch.equal(other[k], v), (name, k)


def test_load_by_id_offline(tiny_pipe, hub_cache, no_network):
    loaded = ProFusionPipeline.from_pretrained(REPO, cache_dir=hub_cache, local_files_only=True)
    _same_weights(tiny_pipe, loaded)
    assert loaded.resolution == tiny_pipe.resolution
    by_commit = hub.resolve_model_path(REPO, revision=REV, cache_dir=hub_cache, local_files_only=True)
    assert by_commit == hub_cache / "models--org--tiny-profusion" / "snapshots" / REV


def test_hf_hub_offline_and_default_cache(tiny_pipe, hub_cache, monkeypatch, no_network):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    loaded = ProFusionPipeline.from_pretrained(REPO)
    _same_weights(tiny_pipe, loaded)


def test_hf_home_and_hf_hub_offline_env(tmp_path):
    """HF_HOME and HF_HUB_OFFLINE are read by huggingface_hub itself (in a fresh process)."""
    storage = tmp_path / "home" / "hub" / "models--org--env-model"
    (storage / "snapshots" / REV).mkdir(parents=True)
    (storage / "snapshots" / REV / "model_index.json").write_text("{}")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(REV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    code = ("from profusion_rt.models.hub import resolve_model_path as r\n"
            "print(r('org/env-model'))\n"
            "try:\n    r('org/absent')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(storage / "snapshots" / REV)
    assert lines[1].startswith("ModelLoadError") and "org/absent" in lines[1] and "HF_HUB_OFFLINE" in lines[1]
    assert str(tmp_path / "home" / "hub") in lines[1]


def test_missing_id_offline_names_id_and_cache(hub_cache, no_network):
    with pytest.raises(ModelLoadError) as info:
        ProFusionPipeline.from_pretrained("org/absent", cache_dir=hub_cache, local_files_only=True)
    message = str(info.value)
    assert "\n" not in message
    assert "'org/absent'" in message and str(hub_cache) in message and "local_files_only" in message


def test_missing_revision_offline(hub_cache, no_network):
    with pytest.raises(ModelLoadError) as info:
        ProFusionPipeline.from_pretrained(REPO, revision="v9", cache_dir=hub_cache, local_files_only=True)
    message = str(info.value)
    assert "\n" not in message and "'v9'" in message and REPO in message and str(hub_cache) in message


def test_missing_component_in_snapshot(hub_cache, no_network):
    with pytest.raises(ModelLoadError) as info:
        ProFusionPipeline.from_pretrained("org/broken", cache_dir=hub_cache, local_files_only=True)
    message = str(info.value)
    assert "\n" not in message and "'unet'" in message


def test_local_folder_wins(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny-profusion").mkdir(parents=True)
    assert hub.resolve_model_path(REPO).resolve() == tmp_path / "org" / "tiny-profusion"
    with pytest.raises(ModelLoadError) as info:
        hub.resolve_model_path("./no/such-folder")
    assert "does not exist" in str(info.value)


# -- the online path, with the hub replaced by fakes -------------------------------------------------------
def test_download_asks_only_for_the_selected_files(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_list_repo_files", lambda repo, revision, token: list(SD2_BASE_FILES))

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.download("stabilityai/stable-diffusion-2-base", revision="main", cache_dir=tmp_path) == str(tmp_path)
    (repo, kwargs), = calls
    assert repo == "stabilityai/stable-diffusion-2-base" and kwargs["revision"] == "main"
    assert kwargs["allow_patterns"] == hub.select_files(SD2_BASE_FILES)
    assert not any(p.endswith((".bin", ".ckpt")) or ".fp16." in p for p in kwargs["allow_patterns"])
    assert not kwargs.get("local_files_only")


def _hub_error(name):
    cls = getattr(hub._errors(), name)
    exc = cls.__new__(cls)
    Exception.__init__(exc, f"fake {name}")
    return exc


@pytest.mark.parametrize("error, needles", [("RevisionNotFoundError", ["'v9'", "does not exist"]),
                                            ("RepositoryNotFoundError", ["'org/none'", "no hub id found", "HF_TOKEN"])])
def test_online_errors_are_one_line(monkeypatch, error, needles):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def listing(repo, revision, token):
        raise _hub_error(error)

    monkeypatch.setattr(hub, "_list_repo_files", listing)
    with pytest.raises(ModelLoadError) as info:
        hub.download("org/none", revision="v9")
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def listing(repo, revision, token):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(hub, "_list_repo_files", listing)
    path = hub.download(REPO, cache_dir=hub_cache)
    assert json.loads((hub_cache / "models--org--tiny-profusion" / "snapshots" / REV / "model_index.json")
                      .read_text())["profusion_rt"]
    assert path.endswith(REV)


# -- the CLI ------------------------------------------------------------------------------------------------
def test_cli_generate_by_id_and_missing_id(hub_cache, monkeypatch, tmp_path, capsys, no_network):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    out = tmp_path / "plain.png"
    assert main(["generate", "--model", REPO, "--prompt", "a red bicycle", "--steps", "1",
                 "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["generate", "--model", "org/absent", "--prompt", "a red bicycle", "--steps", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "'org/absent'" in err and str(hub_cache) in err
