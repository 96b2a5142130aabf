"""Subject deltas, the read side: load a delta, check that it fits a model, apply it in place.

The write side (extract, save) is :mod:`profusion_rt.training.delta`; both share this module's format.

Format (an interface between training and the runtime; full description in ``docs/delta_format.md``):

* one safetensors file, conventionally ``<name>.delta.safetensors``;
* tensors: **every** PromptNet parameter as ``promptnet.<parameter name>`` and every UNet attention
  projection ``to_q``/``to_k``/``to_v`` (self and cross attention, all blocks) as ``unet.<parameter name>``,
  the names of the modules' own ``named_parameters()``. Values are the customized weights themselves
  (not differences), all in one dtype;
* metadata (strings): ``format`` = ``"profusion-rt-delta"``, ``format_version`` = ``"1"``,
  ``base_fingerprint`` (below), ``dtype`` (``float32``, ``float16`` or ``bfloat16``), ``tensor_count``,
  ``created_by``, and optional ``training`` (JSON).

Base fingerprint: sha256 over the base model's values of exactly the tensors the delta replaces, in
sorted name order, each as ``"<name>:<shape tuple>\\n"`` followed by its float32 bytes (little endian,
C order), the hash seeded with ``b"profusion-rt-fingerprint-v1\\n"``. It is computed on float32 values: a
base cast to half precision has another fingerprint, so fingerprint before casting (or pass the stored
value as ``base_fingerprint=``).

A delta fits a model when it holds exactly the model's delta tensors (:func:`delta_parameters`) with the
same shapes, and (when checked) was made on the same base fingerprint: :func:`check_delta_fits`, the one
check the runtime, the trainer's CLI and the server use.

:func:`apply_delta` copies the values into the existing parameters (``param.copy_``, same storage, any
device and dtype), so compiled graphs or engines that read those buffers see the new subject without
being rebuilt. The first checked apply remembers the model's base fingerprint, so later deltas can be
swapped in (each holds full values: applying B after A gives exactly base + B);
:func:`~profusion_rt.training.delta.extract_delta` of the untouched model is a delta that restores the base.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from profusion_rt.core.errors import DeltaError, DeltaMismatchError
from profusion_rt.core.safeio import read

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "Delta", "apply_delta", "base_fingerprint", "check_delta_fits",
           "delta_parameters", "fingerprint_tensors", "is_attention_qkv", "load_delta"]

FORMAT = "profusion-rt-delta"
FORMAT_VERSION = "1"
QKV_NAMES = ("to_q", "to_k", "to_v")
_FINGERPRINT_SEED = b"profusion-rt-fingerprint-v1\n"

# Base fingerprint of each pipeline a delta was applied to (identity-keyed; dropped with the pipeline).
_BASES: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def is_attention_qkv(name: str) -> bool:
    """True for a UNet parameter of an attention ``to_q``/``to_k``/``to_v`` projection."""
    return any(f".{p}." in f".{name}" for p in QKV_NAMES)


def delta_parameters(pipe) -> dict[str, torch.nn.Parameter]:
    """The parameters a delta replaces, by delta key: all of PromptNet, the UNet's attention q/k/v."""
    params = {f"promptnet.{n}": p for n, p in pipe.promptnet.named_parameters()}
    params.update({f"unet.{n}": p for n, p in pipe.unet.named_parameters() if is_attention_qkv(n)})
    return params


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """The fingerprint of a set of named tensors (see the module docstring)."""
    h = hashlib.sha256(_FINGERPRINT_SEED)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def base_fingerprint(pipe) -> str:
    """Fingerprint of the pipeline's current values of the delta tensors (call it on the base model)."""
    return fingerprint_tensors(delta_parameters(pipe))


@dataclass
class Delta:
    """A loaded delta: ``tensors`` by delta key, the ``base_fingerprint`` it was made on, the file metadata."""

    tensors: dict[str, torch.Tensor]
    base_fingerprint: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Delta":
        """A copy on ``device``/in ``dtype`` (pre-stage it on the GPU to make swaps device-to-device)."""
        return Delta({k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()},
                     self.base_fingerprint, dict(self.metadata))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def load_delta(path: str | os.PathLike) -> Delta:
    """Read a delta file; :class:`DeltaError` if it is missing, unreadable or not a profusion-rt delta."""
    source = Path(path)
    tensors, metadata = read(source, DeltaError, "delta file")
    if metadata.get("format") != FORMAT:
        raise DeltaError(f"{source} is not a profusion-rt delta (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DeltaError(
            f"{source} is delta format version {metadata.get('format_version')!r}; this build reads {FORMAT_VERSION}"
        )
    fingerprint = metadata.get("base_fingerprint", "")
    if not tensors or not fingerprint:
        raise DeltaError(f"{source} holds no tensors or no base fingerprint")
    bad = [k for k in tensors if not k.startswith(("promptnet.", "unet."))]
    if bad:
        raise DeltaError(f"{source} holds tensors outside promptnet./unet. (e.g. {bad[0]!r})")
    return Delta(tensors, fingerprint, metadata)


def check_delta_fits(pipe, delta: Delta, base_fingerprint: str | None = None,
                     targets: dict[str, torch.nn.Parameter] | None = None) -> dict[str, torch.nn.Parameter]:
    """Check that ``delta`` fits ``pipe``: exactly the model's delta tensors (:func:`delta_parameters`, or
    ``targets`` when already computed), each of the model's shape, and, when ``base_fingerprint`` is given,
    made on that base. :class:`DeltaMismatchError` naming the first difference; returns the targets."""
    if targets is None:
        targets = delta_parameters(pipe)
    missing = sorted(set(targets) - set(delta.tensors))
    extra = sorted(set(delta.tensors) - set(targets))
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"{len(extra)} tensor(s) the model lacks (e.g. {extra[0]})")
        if missing:
            parts.append(f"lacks {len(missing)} the model has (e.g. {missing[0]})")
        raise DeltaMismatchError("the delta does not fit this model: it has " + " and ".join(parts))
    for name, param in targets.items():
        if tuple(delta.tensors[name].shape) != tuple(param.shape):
            raise DeltaMismatchError(
                f"the delta does not fit this model: {name} is {tuple(delta.tensors[name].shape)} in the delta, "
                f"{tuple(param.shape)} in the model"
            )
    if base_fingerprint is not None and delta.base_fingerprint != base_fingerprint:
        raise DeltaMismatchError(
            f"the delta was made for another base model (its base fingerprint {delta.base_fingerprint[:12]}..., "
            f"this model's {base_fingerprint[:12]}...)"
        )
    return targets


def apply_delta(pipe, delta: Delta, check: bool = True, base_fingerprint: str | None = None):
    """Copy ``delta`` into ``pipe``'s parameters in place and return ``pipe``.

    Names and shapes are always checked. With ``check`` the delta's base fingerprint must equal the
    model's: ``base_fingerprint`` if given, else the one remembered from an earlier checked apply on this
    pipeline, else the fingerprint of the current weights (which must then be the base's). Any mismatch
    raises :class:`DeltaMismatchError` naming it; nothing is copied unless every check passed.
    """
    targets = check_delta_fits(pipe, delta)
    known = _BASES.get(pipe, "")
    if check:
        if base_fingerprint is not None:
            expected = base_fingerprint
        elif known:
            expected = known
        elif known is None:
            raise DeltaMismatchError(
                "this model already carries a delta applied without a check, so its base is unknown; "
                "pass base_fingerprint= (the base model's fingerprint) or check=False"
            )
        else:
            expected = fingerprint_tensors(targets)
        check_delta_fits(pipe, delta, expected, targets)
        _BASES[pipe] = expected
    elif pipe not in _BASES:
        _BASES[pipe] = None
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(delta.tensors[name])
    logger.debug("applied delta: %d tensors", len(targets))
    return pipe
