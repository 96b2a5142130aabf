"""Hugging Face hub ids as model sources: ``from_pretrained("org/name")`` and ``--model org/name``.

A name that is an existing local folder is always that folder. Otherwise a name of the form ``org/name`` is a
hub id: its files are fetched with ``huggingface_hub.snapshot_download`` into the Hugging Face cache (which
honours ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and the login token or ``HF_TOKEN``, as every
Hugging Face library does), and the snapshot folder is loaded like a local one.

Only the files the loader reads are downloaded (:func:`select_files`): ``model_index.json``, the JSON/TXT files
and ONE weight set of each component it reads (``unet``, ``vae``, ``promptnet``, ``openclip``,
``text_encoder``, ``image_encoder``, ``tokenizer``, ``scheduler``; ``openclip`` is skipped when both separate
encoders exist), safetensors when a component has safetensors, ``.bin`` only when it has not; never fp16 or
other variants, top-level ``.ckpt`` files, ``feature_extractor`` or ``safety_checker``.

Offline (``local_files_only=True`` or ``HF_HUB_OFFLINE=1``) the cached snapshot of the revision is used;
an id or revision that is not in the cache is a :class:`~profusion_rt.core.errors.ModelLoadError` that names the
id, the revision and the cache folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

from profusion_rt.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: ``org/name`` (the hub's own rules are stricter; this only tells an id from a path)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: Component folders the loader reads (profusion_rt.models.loading).
COMPONENTS = ("unet", "vae", "promptnet", "openclip", "text_encoder", "image_encoder", "clip_projections", "tokenizer",
              "scheduler")

#: Weight file stems per format, in the loader's order of preference.
WEIGHT_STEMS = {".safetensors": ("model", "diffusion_pytorch_model"),
                ".bin": ("pytorch_model", "diffusion_pytorch_model")}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb", ".ot",
                    ".gguf", ".npz")


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id (``org/name``); says nothing about its existence."""
    return bool(_HUB_ID.match(str(name)))


def _chosen_weights(names: set[str]) -> list[str]:
    """One weight set among the file names of one folder: a single file or an index and its shards,
    safetensors first; variants (``*.fp16.safetensors``) never."""
    for ext, stems in WEIGHT_STEMS.items():
        for stem in stems:
            if f"{stem}{ext}" in names:
                return [f"{stem}{ext}"]
            index = f"{stem}{ext}.index.json"
            if index in names:
                shard = re.compile(rf"^{re.escape(stem)}-\d+-of-\d+{re.escape(ext)}$")
                return [index] + sorted(n for n in names if shard.match(n))
    return []


def _folder_files(files: set[str], folder: str) -> list[str]:
    """The config / tokenizer files and the chosen weights directly inside ``folder`` ("" = top level)."""
    prefix = f"{folder}/" if folder else ""
    names = {f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]}
    keep = [n for n in names if n.endswith((".json", ".txt")) and ".index.json" not in n
            and not n.startswith(".") and not n.endswith(_WEIGHT_SUFFIXES)]
    if folder == "":
        keep = [n for n in keep if n in ("model_index.json", "config.json")]
    return sorted(prefix + n for n in keep + _chosen_weights(names))


def select_files(files: Iterable[str]) -> list[str]:
    """The files of a repository (paths relative to its root) that loading it needs; see the module doc."""
    files = {str(f).replace("\\", "/") for f in files}
    top = {f for f in files if "/" not in f}
    dirs = {f.split("/", 1)[0] for f in files if "/" in f}
    components = [c for c in COMPONENTS if c in dirs]
    if {"text_encoder", "image_encoder"} <= set(components) and "openclip" in components:
        components.remove("openclip")  # the loader reads the separate encoders then
    selected = [f for f in ("model_index.json",) if f in top]
    for component in components:
        selected += _folder_files(files, component)
    if "model_index.json" not in top and "config.json" in top:
        selected += _folder_files(files, "")  # a bare PromptNet folder: config.json and weights at the top
    return sorted(set(selected))


def _cache_dir(cache_dir: str | Path | None) -> str:
    if cache_dir is not None:
        return str(Path(cache_dir).expanduser())
    from huggingface_hub import constants

    return str(getattr(constants, "HF_HUB_CACHE", None) or getattr(constants, "HUGGINGFACE_HUB_CACHE"))


def _errors():
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.20
        from huggingface_hub import utils as errors
    return errors


def resolve_model_path(name: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
                       local_files_only: bool = False, token: str | bool | None = None,
                       what: str = "model") -> Path:
    """A local folder for ``name``: the folder itself when it exists, else the hub id's cached snapshot
    (downloaded unless offline). ``what`` names the role in messages ("model", "PromptNet")."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            logger.warning("%s %s is a local folder: revision %r is ignored", what, path, revision)
        return path
    if path.exists():
        raise ModelLoadError(f"{what} {name} is a file, not a model folder or a hub id")
    if not looks_like_hub_id(str(name)):
        raise ModelLoadError(f"{what} folder {name} does not exist (and it is not a Hugging Face hub id org/name)")
    return Path(download(str(name), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                         token=token, what=what))


def _list_repo_files(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo_id, revision=revision, token=token)


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
             local_files_only: bool = False, token: str | bool | None = None, what: str = "model") -> str:
    """The snapshot folder of ``repo_id`` at ``revision`` holding the files :func:`select_files` picks."""
    import huggingface_hub
    from huggingface_hub import constants

    errors = _errors()
    cache = _cache_dir(cache_dir)
    rev = revision or "main"
    offline_reason = None
    if local_files_only:
        offline_reason = "local_files_only=True"
    elif getattr(constants, "HF_HUB_OFFLINE", False):
        offline_reason = "HF_HUB_OFFLINE is set"

    files = None
    if offline_reason is None:
        try:
            files = _list_repo_files(repo_id, revision, token)
        except errors.RevisionNotFoundError:
            raise ModelLoadError(f"revision {rev!r} of hub id {repo_id!r} does not exist on the Hugging Face hub") \
                from None
        except errors.RepositoryNotFoundError:  # GatedRepoError included
            raise ModelLoadError(
                f"{what} {repo_id!r} is no local folder and no hub id found on the Hugging Face hub (or a "
                "private or gated one, and no accepted token was sent: log in with `hf auth login` or set "
                "HF_TOKEN)") from None
        except Exception as exc:  # noqa: BLE001 - no connection, hub down, offline mode: try the cache
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            offline_reason = f"the hub cannot be reached: {type(exc).__name__}: {first}"
            logger.info("%s; looking for %s in the cache %s", offline_reason, repo_id, cache)

    if files is not None:
        patterns = select_files(files)
        if not patterns:
            raise ModelLoadError(f"hub id {repo_id!r} (revision {rev!r}) holds no files profusion-rt reads "
                                 f"(model_index.json, {', '.join(COMPONENTS)})")
        logger.info("downloading %d file(s) of %s (revision %s) into %s", len(patterns), repo_id, rev, cache)
        try:
            return huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, token=token,
                                                     allow_patterns=patterns)
        except Exception as exc:  # noqa: BLE001 - one clear line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot download {what} {repo_id!r} (revision {rev!r}) into {cache}: "
                                 f"{type(exc).__name__}: {first}") from exc

    try:
        # Anchor patterns only: the snapshot folder is returned as cached; the loader then names any
        # component that is missing from it.
        return huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, token=token,
                                                 local_files_only=True,
                                                 allow_patterns=["model_index.json", "config.json"])
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        storage = Path(cache) / ("models--" + repo_id.replace("/", "--"))
        if not storage.is_dir():
            raise ModelLoadError(
                f"{what} {repo_id!r} is no local folder, and as a hub id it is not in the Hugging Face cache "
                f"{cache} and cannot be downloaded ({offline_reason}); download it once with network access, or "
                "point HF_HOME / cache_dir at the cache that holds it") from None
        detail = ""
        if not isinstance(exc, errors.LocalEntryNotFoundError):  # e.g. an incomplete snapshot
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            detail = f": {type(exc).__name__}: {first}"
        raise ModelLoadError(
            f"revision {rev!r} of hub id {repo_id!r} is not in the Hugging Face cache {cache} and it cannot be "
            f"downloaded ({offline_reason}){detail}") from None
