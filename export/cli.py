"""``profusion-rt export``: every network and the fused stage graphs to ONNX (and TensorRT), validated,
into the versioned artifact cache."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from profusion_rt.export.cache import ArtifactBuilder, ExportOptions
from profusion_rt.export.tensorrt import require_tensorrt
from profusion_rt.export.validate import ValidationError, format_table

from profusion_rt.artifacts.specs import GRAPHS, get_graph
from profusion_rt.core.errors import InvalidParameterError, ModelLoadError
from profusion_rt.core.presets import announce_random_weights, preset_names
from profusion_rt.pipeline import ProFusionPipeline

logger = logging.getLogger(__name__)

EPILOG = """examples:
  profusion-rt export --model tiny --validate
  profusion-rt export --model tiny --graphs unet,fusion_stage --precision fp16 --dynamic-batch --max-batch 4
  profusion-rt export --model path/to/model --out artifacts --backend tensorrt --precision fp16
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export graphs to ONNX / TensorRT into the artifact cache",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="preset name (tiny, sd2-base, sd2-768) or model folder")
    p.add_argument("--promptnet", default=None, help="separate PromptNet folder (with a plain SD2 --model)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights of a preset")
    p.add_argument("--out", default="artifacts", help="artifact root (default: ./artifacts)")
    p.add_argument("--graphs", default="all", help="'all' or a comma-separated list of graph names")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp16: float16 ONNX with float32 norms/softmax; bf16: TensorRT only")
    p.add_argument("--backend", default="onnx", choices=["onnx", "tensorrt"],
                   help="onnx: ONNX + optimized ONNX; tensorrt: also a TensorRT plan for this GPU")
    p.add_argument("--validate", action="store_true", help="check every graph against PyTorch and print a table")
    p.add_argument("--batch", type=int, default=1, help="batch size of the artifacts (default 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis (TensorRT profile "
                   "--min-batch..--max-batch, optimum --batch)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=None, help="default: 4 x --batch")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"],
                   help="torch.onnx exporter: dynamo (torch's default) or legacy TorchScript (faster, deprecated)")
    p.add_argument("--refittable", action="store_true", help="build refittable TensorRT plans")
    p.add_argument("--builder-optimization-level", type=int, default=None, help="TensorRT builder level 0-5")
    p.add_argument("--force", action="store_true", help="rebuild every stage even when the cache is valid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_export)


def _graph_list(text: str) -> list[str]:
    if text.strip() == "all":
        return list(GRAPHS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        get_graph(n)  # typed error for an unknown name
    if not names:

        raise InvalidParameterError("--graphs is empty; give 'all' or graph names")
    return names


def _load(args):
    if Path(args.model).is_dir():
        return ProFusionPipeline.from_pretrained(args.model, promptnet_path=args.promptnet)
    if args.promptnet is not None:
        raise ModelLoadError("--promptnet needs --model to be a model folder")
    if args.model in preset_names() or "/" not in args.model:
        return ProFusionPipeline.from_preset(args.model, seed=args.weights_seed)
    raise ModelLoadError(f"model folder {args.model} does not exist")


def cmd_export(args: argparse.Namespace) -> int:
    graphs = _graph_list(args.graphs)
    dynamic = None
    if args.dynamic_batch:
        hi = args.max_batch if args.max_batch is not None else 4 * args.batch
        dynamic = (args.min_batch, hi)
    elif args.max_batch is not None:
        raise InvalidParameterError("--max-batch needs --dynamic-batch")

    from tqdm.auto import tqdm

    options = ExportOptions(precision=args.precision, backend=args.backend, batch=args.batch,
                            dynamic_batch=dynamic, opset=args.opset, exporter=args.exporter,
                            validate=args.validate, force=args.force, refittable=args.refittable,
                            optimization_level=args.builder_optimization_level)
    options.check()  # before loading weights
    if args.backend == "tensorrt":

        require_tensorrt()

    start = time.perf_counter()
    pipe = _load(args)

    announce_random_weights(pipe)
    builder = ArtifactBuilder(pipe, args.out, options)
    print(f"model {args.model}: hash {builder.model_hash}, {args.precision}, batch {args.batch}"
          f"{' (dynamic %d..%d)' % dynamic if dynamic else ''}, opset {args.opset}, {args.exporter} exporter")
    reports = []
    try:
        builder.run(graphs, progress=not args.no_progress, strict=True,
                    on_report=lambda r: (reports.append(r), tqdm.write(r.summary())))
    except ValidationError:
        _print_table(reports, format_table)
        raise
    if args.validate:
        _print_table(reports, format_table)
    total = time.perf_counter() - start
    print(f"{len(reports)} graph(s) in {total:.1f} s; artifacts in {Path(args.out) / builder.model_hash}")
    return 0


def _print_table(reports, format_table) -> None:
    rows = [c for r in reports for c in r.checks]
    if rows:
        print(format_table(rows))
