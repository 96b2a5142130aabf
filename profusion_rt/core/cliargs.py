"""Command-line pieces shared by every command (the top-level CLI and the sub-commands of serve, training,
evaluation and the benchmarks): the model and precision flags, the help formatter, the package version."""

from __future__ import annotations

import argparse
import logging

from profusion_rt.core.hardware import PRECISION_CHOICES, resolve_precision, warn_if_emulated_bf16

logger = logging.getLogger("profusion_rt")

#: backends that run exported artifacts (their model stays fp32: artifacts are matched by the fp32 hash)
ARTIFACT_BACKENDS = ("onnxruntime", "tensorrt")




class DeprecatedAlias(argparse.Action):
    """``--dtype X``: stores X as ``--precision`` and logs one deprecation line."""

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning("%s is deprecated: use --precision (one flag for the torch dtype and the artifacts' precision)",
                       option_string)
        setattr(namespace, self.dest, values)


def settle_precision(args: argparse.Namespace) -> argparse.Namespace:
    """Turn ``--precision`` (or its alias ``--dtype``) into ``args.dtype``, the weights' dtype of the loaded
    model, and ``args.precision``, the engines' precision (None: the backend's default). ``auto`` is resolved
    for the device and backend; bf16 on a CPU without native bf16 logs one warning line. Idempotent."""

    if getattr(args, "_precision_settled", False) or not hasattr(args, "precision"):
        return args
    device, backend = getattr(args, "device", "cpu"), getattr(args, "backend", None)
    precision = resolve_precision(args.precision, device, backend)
    warn_if_emulated_bf16(precision, device)
    args.precision = precision
    args.dtype = "fp32" if precision is None or backend in ARTIFACT_BACKENDS else precision
    args._precision_settled = True
    return args


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="preset name (tiny, sd2-base, sd2-768), model folder or Hugging Face hub id (org/name)")
    p.add_argument("--promptnet", default=None,
                   help="separate PromptNet folder or hub id (with a plain SD2 --model)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--precision", default=None, choices=list(PRECISION_CHOICES),
                   help="compute precision: the torch backends (eager, torch, torch-compile) hold the weights in it; "
                        "onnxruntime/tensorrt load artifacts of it (the model stays fp32, as the artifacts are "
                        "matched by the fp32 hash). auto: bf16 on a CPU with native bf16 (AMX / avx512_bf16), "
                        "else fp32; fp16 on a GPU (default fp32; tensorrt: fp16)")
    p.add_argument("--dtype", dest="precision", action=DeprecatedAlias, choices=["fp32", "fp16", "bf16"],
                   help="deprecated alias of --precision (default: not set)")
    p.set_defaults(dtype="fp32")  # the weights' dtype, set from --precision by settle_precision
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights of a preset")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings or action.required:
            return text
        if action.default is None:
            return f"{text} (default: not set)".strip()
        return super()._get_help_string(action) if action.help else "(default: %(default)s)"


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``); "unknown" when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("profusion-rt")
    except PackageNotFoundError:
        return "unknown (not installed)"
