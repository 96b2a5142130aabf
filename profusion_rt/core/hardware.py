"""What this machine's CPU can do, read once from ``/proc/cpuinfo`` (Linux; elsewhere: unknown, not native).

bf16 pays on a CPU only where it is native: AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``) do bf16
dot products in hardware; without them torch emulates bf16 and it runs slower than fp32. The doctor prints
:func:`bf16_support`; the bf16 work reuses :func:`native_bf16` (an ``auto`` precision, a warning line).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

#: /proc/cpuinfo flags that make bf16 matmuls native on x86
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=4)
def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in ``path``; ("", empty) when it cannot be read."""
    model, flags = "", frozenset()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``platform.processor()`` or the machine type where /proc/cpuinfo is absent)."""
    return _cpuinfo(path)[0] or platform.processor() or platform.machine()


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """Every feature flag of the first CPU (empty where /proc/cpuinfo cannot be read)."""
    return _cpuinfo(path)[1]


def native_bf16(path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 in hardware (``amx_bf16`` or ``avx512_bf16``)."""
    return any(flag in cpu_flags(path) for flag in BF16_FLAGS)


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    flags: tuple[str, ...]  # the BF16_FLAGS present
    cpu: str

    def describe(self) -> str:
        if self.native:
            return f"bf16 native ({', '.join(self.flags)})"
        return "bf16 not native (no amx_bf16 / avx512_bf16: bf16 runs emulated, slower than fp32)"


def bf16_support(path: str = "/proc/cpuinfo") -> Bf16Support:
    flags = cpu_flags(path)
    return Bf16Support(native_bf16(path), tuple(f for f in BF16_FLAGS if f in flags), cpu_model(path))


# -- precision choice (issue 15: bf16 on CPU) ------------------------------------------------------------------

#: what a user can ask for: ``auto`` resolves per device and backend (:func:`resolve_precision`)
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")

#: the one line logged when bf16 is chosen on a CPU that emulates it
EMULATED_BF16_WARNING = ("bf16 on this CPU ({cpu}) is emulated (no amx_bf16 / avx512_bf16): expect it to run "
                         "slower than fp32; use --precision fp32 (or auto) here")


def resolve_precision(precision: str | None, device="cpu", backend: str | None = None) -> str | None:
    """The concrete precision of a request: ``None`` stays ``None`` (each backend's default); ``auto`` is bf16
    on a CPU with native bf16 and fp32 on other CPUs (always fp32 for onnxruntime on a CPU, which has no bf16
    kernels), fp16 on a GPU."""
    if precision != "auto":
        return precision
    kind = str(device).split(":", 1)[0]
    if kind != "cpu":
        return "fp16"
    if backend in ("onnxruntime", "tensorrt"):
        return "fp32"
    return "bf16" if native_bf16() else "fp32"


def warn_if_emulated_bf16(precision: str | None, device="cpu") -> bool:
    """Log :data:`EMULATED_BF16_WARNING` once when ``precision`` is bf16 on a CPU without native bf16;
    True when it warned."""
    import logging

    if precision != "bf16" or str(device).split(":", 1)[0] != "cpu" or native_bf16():
        return False
    logging.getLogger("profusion_rt").warning(EMULATED_BF16_WARNING.format(cpu=cpu_model()))
    return True
