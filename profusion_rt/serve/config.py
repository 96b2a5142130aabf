"""The server's limits and behaviour: :class:`ServeConfig`, the one place for their defaults.

``profusion-rt serve`` derives its options from the fields (:func:`add_config_args`, :func:`config_from_args`):
each field with ``cli`` metadata becomes ``--<field-name>`` (or the flag its metadata names) with the
field's type, default and help, so a default is never written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profusion_rt.core.errors import InvalidParameterError

__all__ = ["ServeConfig", "add_config_args", "config_from_args"]


def _option(default: Any, help: str, *, flag: str | None = None, shown: str | None = None,
            unset_means: str | None = None) -> Any:
    """A field that ``profusion-rt serve`` has an option for. ``flag``: the option's name (default
    ``--<field-name>``); ``shown``: how the help prints the default; ``unset_means``: the option defaults to
    None, which takes the value of that other field (``--default-steps`` -> ``--steps-limit``)."""
    return field(default=default, metadata={"cli": {"help": help, "flag": flag, "shown": shown,
                                                    "unset_means": unset_means}})


@dataclass
class ServeConfig:
    """Limits and behaviour of the server (``profusion-rt serve`` has one option per ``_option`` field)."""

    data_dir: Path = _option(Path("serve-data"), "folder for stored subjects (created)", flag="--data")
    max_queue: int = _option(32, "queued requests (not counting the batch being run) before 429")
    max_batch: int = _option(4, "images per runtime batch; also the most images one request may ask for")
    max_wait_ms: float = _option(10.0, "how long the worker waits for compatible requests to batch with")
    timeout_s: float = _option(120.0, "per-request timeout, queue wait included (a request may ask for less) -> 504")
    max_upload_bytes: int = _option(10 * 2**20, "body limit of /v1/generate and of the image of /v1/subjects",
                                    shown="10 MiB")
    max_delta_bytes: int = _option(4 * 2**30, "body limit of POST /v1/subjects with a delta (an SD2 delta is "
                                   "~1.7 GB in fp32)", shown="4 GiB")
    max_pixels: int = _option(4096 * 4096, "reference image pixel limit (width x height)", shown="4096x4096")
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    steps_limit: int = _option(50, "most num_inference_steps a request may ask for")
    default_steps: int = _option(50, "steps when a request names none", unset_means="steps_limit")
    fusion_steps_limit: int = _option(4, "most fusion_steps a request may ask for")
    max_prompt_chars: int = _option(1000, "longest prompt / negative_prompt in characters")
    allow_customize: bool = _option(True, "refuse customize=true subjects", flag="--no-customize")
    customize_steps: int = _option(100, "default steps of customize=true")
    customize_steps_limit: int = _option(500, "most customize_steps a request may ask for")
    customize_augmentations: int = _option(31, "augmented copies of the reference image in a customization")
    max_customize_jobs: int = _option(2, "queued + running customizations before 429")
    subject_cache: int = _option(4, "loaded subjects kept in memory")
    warmup_steps: int = _option(2, "steps of the start-up warm-up request (0: none)")
    poll_interval_s: float = 0.05  # how often a waiting handler checks for a client disconnect
    api_keys_file: Path | None = _option(None, "file of API keys, one per line (blank lines and # comments "
                                         "ignored): /v1/* then needs 'Authorization: Bearer <key>'")
    metrics_need_key: bool = _option(False, "/metrics needs an API key too (with --api-keys-file)")

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        if self.api_keys_file is not None:
            self.api_keys_file = Path(self.api_keys_file)
        for name in ("max_queue", "max_batch", "max_upload_bytes", "max_delta_bytes", "max_pixels", "steps_limit",
                     "default_steps", "max_prompt_chars", "customize_steps", "customize_steps_limit",
                     "max_customize_jobs", "subject_cache"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("fusion_steps_limit", "customize_augmentations", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameterError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("max_wait_ms", "timeout_s", "poll_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                    name != "max_wait_ms" and value == 0):
                raise InvalidParameterError(f"{name} must be a positive number, got {value!r}")
        if self.default_steps > self.steps_limit:
            raise InvalidParameterError(f"default_steps ({self.default_steps}) is above steps_limit ({self.steps_limit})")
        if self.customize_steps > self.customize_steps_limit:
            raise InvalidParameterError(
                f"customize_steps ({self.customize_steps}) is above customize_steps_limit ({self.customize_steps_limit})")
        if self.metrics_need_key and self.api_keys_file is None:
            raise InvalidParameterError("metrics_need_key needs api_keys_file (--metrics-need-key needs --api-keys-file)")


def _cli_fields() -> list[tuple[dataclasses.Field, dict[str, Any], Any]]:
    hints = typing.get_type_hints(ServeConfig)
    return [(f, f.metadata["cli"], hints[f.name]) for f in dataclasses.fields(ServeConfig) if "cli" in f.metadata]


def _flag(f: dataclasses.Field, meta: dict[str, Any]) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`ServeConfig` field with ``cli`` metadata: type, default and help from the field."""
    for f, meta, hint in _cli_fields():
        flag, text = _flag(f, meta), meta["help"]
        if hint is bool:
            # a flag that flips the default: --no-customize stores False into allow_customize
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", help=text)
            continue
        if meta["unset_means"]:
            text += f" (default: --{meta['unset_means'].replace('_', '-')})"
            default = None
        else:
            default = f.default
            if default is not None:
                text += f" (default {meta['shown'] or default})"
        kind = hint if hint in (int, float) else str  # paths are given as strings
        parser.add_argument(flag, dest=f.name, type=kind, default=default, help=text,
                            metavar=flag[2:].upper().replace("-", "_"))


def config_from_args(args: argparse.Namespace, **overrides: Any) -> ServeConfig:
    """The :class:`ServeConfig` of parsed options (:func:`add_config_args`); checks every limit."""
    values: dict[str, Any] = {}
    for f, meta, _ in _cli_fields():
        value = getattr(args, f.name)
        if value is None and meta["unset_means"]:
            value = getattr(args, meta["unset_means"])
        values[f.name] = value
    values.update(overrides)
    return ServeConfig(**values)
