"""The one map between precision names and torch dtypes.

Two spellings are in use: the short precision names of the CLI and of artifacts (``fp32``, ``fp16``,
``bf16``) and torch's own names as stored in specs and safetensors metadata (``float32``, ``float16``,
``bfloat16``, plus the integer types of token ids).
"""

from __future__ import annotations

import torch

from profusion_rt.core.errors import InvalidParameterError

#: precision name -> torch dtype
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: torch's dtype name (as in ``str(torch.float16)`` without ``torch.``) -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
}
_PRECISION_OF = {v: k for k, v in PRECISION_DTYPES.items()} | {torch.float64: "fp64"}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"``, ``"float16"`` or ``torch.float16`` -> ``torch.float16``; anything else is an
    :class:`InvalidParameterError` naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key in PRECISION_DTYPES:
        return PRECISION_DTYPES[key]
    if key in TORCH_DTYPES:
        return TORCH_DTYPES[key]
    raise InvalidParameterError(f"unknown dtype {name!r}; choose one of {', '.join(PRECISION_DTYPES)}")


def precision_name(dtype: torch.dtype | str) -> str:
    """``torch.float16`` -> ``"fp16"`` (a name that is not a float precision is returned as torch spells it)."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    return _PRECISION_OF.get(dtype, str(dtype).removeprefix("torch."))
