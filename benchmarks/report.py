"""Writers for a suite's results: ``results.json`` (everything, every sample), ``results.md`` (tables),
PNG plots (matplotlib, optional) and ``snippet.md`` (the README excerpt: machine line, end-to-end table,
plot link)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: default output folders are relative to the working directory
ROOT = Path(".")
PLOTS = ("e2e.png", "stages.png", "comparisons.png", "scaling.png")


# -- formatting ------------------------------------------------------------------------------------------
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits (plain notation), "" for None, "inf" for infinity."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if not _finite(x):
        return "inf" if x == math.inf else str(x)
    if x == 0:
        return "0"
    magnitude = int(math.floor(math.log10(abs(x))))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{x:.{decimals}f}"


def fmt_si(x, unit: str = "") -> str:
    """``x`` with an SI prefix (k, M, G, T, P) and 3 significant digits: 1.23 GFLOP."""
    if not _finite(x):
        return ""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{fmt_num(x / scale)} {prefix}{unit}"
    return f"{fmt_num(x)} {unit}".strip()


def fmt_pct(x) -> str:
    return f"{100 * x:.1f}%" if _finite(x) else ""


def fmt_ratio(x) -> str:
    return f"{x:.2f}x" if _finite(x) else ""


def fmt_span(stats: dict | None, scale: float = 1.0) -> str:
    if not stats or stats.get("min_s") is None:
        return ""
    return f"{fmt_num(stats['min_s'] * scale)}-{fmt_num(stats['max_s'] * scale)}"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


# -- JSON ------------------------------------------------------------------------------------------------
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalars
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n")
    return path


# -- Markdown --------------------------------------------------------------------------------------------
def machine_line(results: dict[str, Any]) -> str:
    m, v = results.get("machine", {}), results.get("versions", {})
    cfg = results.get("config", {})
    gpu = m.get("gpu")
    if gpu:
        where = f"{gpu['name']} ({gpu['memory_gib']} GiB, CUDA {gpu.get('cuda')}), host CPU {m.get('cpu')}"
    else:
        flags = ", ".join(m.get("cpu_flags") or [])
        where = f"{m.get('cpu')}, {m.get('cpus')} CPUs" + (f" ({flags})" if flags else "") + \
            (f", {m.get('memory_gib')} GiB" if m.get("memory_gib") else "")
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt") if v.get(k))
    threads = cfg.get("threads")
    load = results.get("load_average", {})
    start, end = load.get("start"), load.get("end")
    load_txt = ""
    if start:
        load_txt = f"; load average {'/'.join(fmt_num(x, 2) for x in start)} (1/5/15 min) at start"
        if end:
            load_txt += f", {fmt_num(end[0], 2)} at end"
    return (f"**Machine** `{results.get('machine_tag', '')}`: {where}; {libs}; Python {v.get('python')}; "
            f"{threads if threads else 'default'} thread(s) per process{load_txt}.")


def run_line(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    peak = results.get("peak") or {}
    res = f", {results['resolution']} px" if results.get("resolution") else ""
    peak_txt = ""
    if peak.get("best_flops"):
        used = results.get("peak_flops") or peak["best_flops"]
        basis = "CPU time" if results.get("time_basis") == "cpu" else "wall-clock time"
        peak_txt = (f" Peak for utilization: {fmt_si(used, 'FLOP/s')} ({peak.get('what')}, best of two series of "
                    f"{peak['timing']['n']} in the eager worker, by {basis}; wall-clock median "
                    f"{fmt_si(peak['median_flops'], 'FLOP/s')}).")
    ref = f", parity against an eager {cfg.get('reference_dtype')} run" if cfg.get("reference_dtype") else ""
    flags = f"--{cfg.get('mode')}" + (" --with-compile" if cfg.get("with_compile") and cfg.get("mode") == "quick" else "")
    return (f"**Run** `profusion-rt bench {flags}` on {results.get('created', '')[:10]}: preset "
            f"`{cfg.get('model')}` (random weights){res}, {cfg.get('device')} {cfg.get('dtype')}{ref}, "
            f"{cfg.get('steps')} DDIM steps, fusion_steps {cfg.get('fusion_steps')}, batch {cfg.get('batch')}, seed "
            f"{cfg.get('seed')}. Each backend in its own process, only one computing at a time: every backend's "
            f"untimed first call (*first call*), {cfg.get('warmup')} more warm-up call(s), then "
            f"{cfg.get('repeats')} timed calls interleaved round by round; median and min-max. Total suite time "
            f"{fmt_num(results.get('elapsed_s'), 3)} s.{peak_txt}")


def _show_cpu(results: dict[str, Any]) -> bool:
    return results.get("config", {}).get("device", "cpu") == "cpu"


def _basis_note(results: dict[str, Any]) -> str:
    if results.get("time_basis") == "cpu":
        return ("*achieved* and *util.* use CPU time (runs and peak alike): with one thread per process on a "
                "shared machine, time spent descheduled does no work")
    return "*achieved* and *util.* use wall-clock time"


def e2e_table(results: dict[str, Any]) -> str:
    cpu = _show_cpu(results)
    head = ["backend", "status", "median (s)", "min-max (s)", "vs eager"]
    head += ["CPU time (s)", "vs eager (CPU)"] if cpu else []
    head += ["loop s/step", "first call (s)", "FLOP/request", "achieved", "util.", "peak mem (MB)",
             "PSNR vs ref. (dB)"]
    rows = []
    for r in results.get("e2e", []):
        if not r.get("ok"):
            reason = r.get("reason", "")
            rows.append([f"`{r['name']}`", reason if reason.startswith("failed") else f"skipped: {reason}"]
                        + [""] * (len(head) - 2))
            continue
        par = r.get("parity") or {}
        psnr = par.get("psnr_db")
        mem = r.get("peak_cuda_mb") if r.get("peak_cuda_mb") else r.get("peak_rss_mb")
        status = "reference" if r["name"] == "eager" else "ok"
        if r["name"].startswith("eager-"):
            status = "parity reference"
        row = [f"`{r['name']}`", status, fmt_num(r["median_s"]), f"{fmt_num(r['min_s'])}-{fmt_num(r['max_s'])}",
               fmt_ratio(r.get("speedup_vs_eager"))]
        if cpu:
            row += [fmt_num(r.get("cpu_median_s")), fmt_ratio(r.get("speedup_vs_eager_cpu"))]
        row += [fmt_num(r.get("loop_s_per_step")), fmt_num(r.get("first_call_s")), fmt_si(r.get("flops_per_request")),
                fmt_si(r.get("flops_per_s"), "FLOP/s"), fmt_pct(r.get("utilization")),
                fmt_num(mem, 4) if mem else "",
                ("inf (identical)" if psnr == math.inf or psnr == "inf" else fmt_num(psnr)) if par else ""]
        rows.append(row)
    return table(head, rows, "ll" + "r" * (len(head) - 2))


def stages_table(results: dict[str, Any]) -> str:
    cpu = _show_cpu(results)
    head = ["stage", "graph", "batch", "FLOP", "torch (ms)", "torch min-max", "torch achieved", "util.",
            "onnxruntime (ms)", "ort min-max", "ort vs torch"] + (["ort vs torch (CPU)"] if cpu else []) + ["ort util."]
    rows = []
    for s in results.get("stages", []):
        t, o = s.get("torch") or {}, s.get("onnxruntime") or {}

        def ms(m):
            if m.get("status") == "ok":
                return fmt_num(m["median_s"] * 1e3)
            return f"{m.get('status', '')}: {m.get('reason', '')}" if m else ""

        row = [s["stage"], f"`{s['graph']}`", str(s["batch"]), fmt_si(s.get("flops")), ms(t),
               fmt_span(t, 1e3) if t.get("status") == "ok" else "", fmt_si(t.get("flops_per_s"), "FLOP/s"),
               fmt_pct(t.get("utilization")), ms(o), fmt_span(o, 1e3) if o.get("status") == "ok" else "",
               fmt_ratio(s.get("ort_speedup"))]
        if cpu:
            row.append(fmt_ratio(s.get("ort_speedup_cpu")))
        row.append(fmt_pct(o.get("utilization")))
        rows.append(row)
    return table(head, rows, "lll" + "r" * (len(head) - 3))


def comparisons_tables(results: dict[str, Any]) -> tuple[str, str]:
    cpu = _show_cpu(results)
    comps = results.get("comparisons", [])

    def med(c, key):
        return (c.get(key) or {}).get("median_s")

    def cells(c, against: str):
        row = [c["label"], c["unet_evals_per_step"], fmt_si(c.get("flops_per_request")), fmt_num(med(c, "total_s")),
               fmt_span(c.get("total_s")), fmt_num(med(c, "loop_s") / c["steps"]) if med(c, "loop_s") else "",
               fmt_ratio(c.get(f"ratio_vs_{against}"))]
        if cpu:
            row += [fmt_num(med(c, "cpu_s")), fmt_ratio(c.get(f"ratio_vs_{against}_cpu"))]
        return row

    tail = ["CPU time (s)", "vs {} (CPU)"] if cpu else []
    head = ["mode", "UNet calls x batch / step", "FLOP/request", "median (s)", "min-max (s)", "loop s/step",
            "vs plain SD2"] + [t.format("plain") for t in tail]
    eager = [cells(c, "plain") for c in comps if c["group"] == "eager"]
    head2 = ["stages", "UNet calls x batch / step", "FLOP/request", "median (s)", "min-max (s)", "loop s/step",
             "vs minimal"] + [t.format("minimal") for t in tail] + ["max abs diff of x vs minimal"]
    fused = [cells(c, "minimal") + [f"{c['max_abs_diff_vs_minimal']:.1e}" if "max_abs_diff_vs_minimal" in c else ""]
             for c in comps if c["group"] == "fused"]
    return (table(head, eager, "ll" + "r" * (len(head) - 2)) if eager else "",
            table(head2, fused, "ll" + "r" * (len(head2) - 2)) if fused else "")


def scaling_table(results: dict[str, Any]) -> str:
    head = ["backend", "axis", "batch", "steps", "resolution", "median (s)", "min-max (s)", "s/image", "images/s",
            "loop s/step", "achieved", "util.", "peak mem (MB)"]
    rows = []
    for p in results.get("scaling", []):
        if p.get("status") != "ok":
            rows.append([f"`{p['backend']}`", p["axis"], str(p["batch"]), str(p["steps"]), str(p["resolution"]),
                         f"{p.get('status')}: {p.get('reason', '')}"] + [""] * 7)
            continue
        mem = p.get("peak_cuda_mb") or p.get("peak_rss_mb")
        rows.append([f"`{p['backend']}`", p["axis"], str(p["batch"]), str(p["steps"]), str(p["resolution"]),
                     fmt_num(p["total_s"]["median_s"]), fmt_span(p["total_s"]), fmt_num(p["s_per_image"]),
                     fmt_num(p["images_per_s"]), fmt_num(p["loop_s_per_step"]), fmt_si(p.get("flops_per_s"), "FLOP/s"),
                     fmt_pct(p.get("utilization")), fmt_num(mem, 4) if mem else ""])
    return table(head, rows, "ll" + "r" * (len(head) - 2))


def flops_table(results: dict[str, Any]) -> str:
    nf = results.get("network_flops") or {}
    return table(["network", "FLOP per forward (batch 1)"], [[f"`{k}`", fmt_si(v)] for k, v in nf.items()], "lr")


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    parts = [f"# profusion-rt benchmarks: `{results.get('machine_tag', '')}` ({results.get('suite')})", "",
             machine_line(results), "", run_line(results), ""]
    parts += ["## End to end", "",
              "One request (prepare: reference and prompt encoding, noise; the sampling loop; VAE decode). "
              "*vs eager*: the eager reference's median over this backend's, both from this invocation. "
              "*achieved*: FLOPs of the request (networks only, meta-device count) over the median time; "
              "*util.*: achieved over the measured peak; " + _basis_note(results) + ". *CPU time*: the worker "
              "process's CPU seconds per request (steadier than wall time on a loaded machine). *peak mem*: "
              "peak RSS of the backend's process on the CPU (model build included), max allocated on CUDA.",
              "", e2e_table(results), ""]
    if results.get("stages"):
        parts += ["## Per stage (one call each)", "",
                  "Each graph called on fixed random inputs of its export spec; torch modules in the eager "
                  "process, the exported ONNX graphs in the onnxruntime process. Reference encoding is "
                  "`vae_encoder` + `image_encoder`; the official-style stages are torch-only.", "",
                  stages_table(results), ""]
    eager_cmp, fused_cmp = comparisons_tables(results)
    if eager_cmp:
        parts += ["## The cost of fusion (eager reference pipeline, equal steps)", "",
                  "Plain SD2 classifier-free guidance against ProFusion at the same number of DDIM steps, "
                  "fusion_steps (R) 0, 1, 2; interleaved repeats in one process; prepare + sampling loop"
                  + ("" if any(c.get("decode") for c in results.get("comparisons", [])) else
                     " (no VAE decode: it is the same for every mode)") + ".", "", eager_cmp, ""]
    if fused_cmp:
        parts += ["## Official-style vs minimal fusion stage (fused torch loop)", "",
                  "The official code computes the C~ branch in every fusion-stage call and discards it, and "
                  "re-encodes ∅ and C~ at every stage call (docs/algorithm.md, 'Cost per denoising step'); ours does neither. "
                  "Both run in the same runtime loop; the last column checks they give the same image.", "",
                  fused_cmp, ""]
    if results.get("scaling"):
        parts += ["## Scaling", "",
                  "Batch size (images per request), step count and resolution (the preset's networks at another "
                  "sample size; PromptNet's output kernel follows so that S* stays one token). On the CPU the "
                  "peak RSS column is the process's running peak.", "", scaling_table(results), ""]
    parts += ["## FLOPs per network", "", flops_table(results), ""]
    export = results.get("export") or {}
    if export.get("graphs"):
        built = {g: ", ".join(f"{k} {v}" for k, v in d["stages"].items()) for g, d in export["graphs"].items()}
        parts += [f"ONNX artifacts for onnxruntime: {export.get('status')} in {fmt_num(export.get('seconds'))} s "
                  f"({'; '.join(f'{g}: {b}' for g, b in built.items())}).", ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    else:
        parts += ["Plots: not written (matplotlib not installed or --no-plots).", ""]
    return "\n".join(parts)


def snippet(results: dict[str, Any], out: Path, plots: list[str]) -> str:
    try:
        rel = out.resolve().relative_to(ROOT.resolve()).as_posix() + "/"
    except ValueError:
        rel = ""
    parts = [f"### Benchmarks (`{results.get('machine_tag', '')}`)", "", machine_line(results), "",
             run_line(results), "", e2e_table(results), ""]
    if "e2e.png" in plots:
        parts += [f"![end-to-end time per backend]({rel}e2e.png)", ""]
    cfg = results.get("config", {})
    flags = f"--{cfg.get('mode', 'quick')}" + (" --with-compile" if cfg.get("with_compile") and
                                                 cfg.get("mode") == "quick" else "")
    parts += [f"Per stage, the cost of fusion, official-style vs minimal fusion and scaling: "
              f"[{rel}results.md]({rel}results.md). Reproduce with `profusion-rt bench {flags}` "
              "(see `benchmarks/README.md`).", ""]
    return "\n".join(parts)


# -- plots -----------------------------------------------------------------------------------------------
def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """The PNG plots that have data; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return []
    written = []
    title_tail = f"{results.get('machine_tag', '')}, {results.get('config', {}).get('model')}"

    rows = [r for r in results.get("e2e", []) if r.get("ok") or r.get("reason") != "not selected (--backends)"]
    ok = [r for r in rows if r.get("ok")]
    if ok:
        fig, ax = plt.subplots(figsize=(7.5, 0.7 + 0.42 * len(rows)))
        rows = rows[::-1]
        names = [r["name"] for r in rows]
        med = [r.get("median_s", 0.0) if r.get("ok") else 0.0 for r in rows]
        lo = [max(r["median_s"] - r["min_s"], 0.0) if r.get("ok") else 0.0 for r in rows]
        hi = [max(r["max_s"] - r["median_s"], 0.0) if r.get("ok") else 0.0 for r in rows]
        ax.barh(names, med, xerr=[lo, hi], color="tab:blue", capsize=3)
        right = max(r["max_s"] for r in ok)
        for i, r in enumerate(rows):
            if r.get("ok"):
                label = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
                ax.text(r["max_s"] + 0.02 * right, i, label, va="center", fontsize=8)
            else:
                ax.text(0.02 * right, i, str(r.get("reason", ""))[:60], va="center", fontsize=7, color="gray")
        ax.set_xlabel("seconds per request (median, min-max); label: speed-up vs eager")
        ax.set_title(f"End to end, {title_tail}", fontsize=10)
        ax.set_xlim(0, right * 1.2)
        ax.tick_params(axis="y", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "e2e.png", dpi=110)
        plt.close(fig)
        written.append("e2e.png")

    stages = [s for s in results.get("stages", []) if (s.get("torch") or {}).get("status") == "ok"]
    if stages:
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(stages)))
        y = np.arange(len(stages))[::-1]
        t = [s["torch"]["median_s"] * 1e3 for s in stages]
        o = [(s.get("onnxruntime") or {}).get("median_s", float("nan")) * 1e3 for s in stages]
        ax.barh(y + 0.2, t, height=0.4, label="torch (eager process)", color="tab:blue")
        ax.barh(y - 0.2, o, height=0.4, label="onnxruntime", color="tab:orange")
        ax.set_yticks(y, [s["graph"] for s in stages])
        ax.set_xscale("log")
        ax.set_xlabel("ms per call (median, log scale)")
        ax.set_title(f"Per stage, {title_tail}", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=110)
        plt.close(fig)
        written.append("stages.png")

    comps = results.get("comparisons", [])
    if comps:
        groups = [g for g in ("eager", "fused") if any(c["group"] == g for c in comps)]
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.2), squeeze=False)
        for ax, g in zip(axes[0], groups):
            cs = [c for c in comps if c["group"] == g]
            labels = [c["label"].replace("fused stages, ", "").replace("fusion sampling, ", "fusion ")
                      for c in cs][::-1]
            med = [c["loop_s"]["median_s"] / c["steps"] for c in cs][::-1]
            ax.barh(labels, med, color="tab:green" if g == "eager" else "tab:purple")
            base = med[-1]  # the group's first mode: plain SD2, or our minimal stages
            for i, m in enumerate(med):
                if base:
                    ax.text(m, i, f" {m / base:.2f}x", va="center", fontsize=8)
            ax.set_xlim(0, max(med) * 1.25)
            ax.set_xlabel("sampling loop, s per step (median)\nlabel: ratio to the top bar", fontsize=9)
            ax.set_title("eager pipeline: cost of fusion" if g == "eager" else "fused loop: official vs minimal",
                         fontsize=10)
            ax.tick_params(axis="y", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "comparisons.png", dpi=110)
        plt.close(fig)
        written.append("comparisons.png")

    pts = [p for p in results.get("scaling", []) if p.get("status") == "ok"]
    if pts:
        axes_names = [a for a in ("batch", "steps", "resolution") if any(p["axis"] == a for p in pts)]
        fig, axes = plt.subplots(1, len(axes_names), figsize=(4.2 * len(axes_names), 3.2), squeeze=False)
        for ax, a in zip(axes[0], axes_names):
            for backend in sorted({p["backend"] for p in pts}):
                ps = sorted((p for p in pts if p["axis"] == a and p["backend"] == backend), key=lambda p: p["value"])
                if not ps:
                    continue
                x = [p["value"] for p in ps]
                if a == "batch":
                    y, ylabel = [p["images_per_s"] for p in ps], "images / s"
                elif a == "steps":
                    y, ylabel = [p["total_s"]["median_s"] for p in ps], "s per request"
                else:
                    y, ylabel = [p["loop_s_per_step"] for p in ps], "loop s per step"
                ax.plot(x, y, marker="o", label=backend)
                ax.set_ylabel(ylabel)
                ax.set_xticks(x)
            ax.set_ylim(bottom=0)
            ax.set_xlabel({"batch": "images per request", "steps": "DDIM steps", "resolution": "pixels (side)"}[a])
            ax.set_title(f"scaling: {a}", fontsize=10)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)
        written.append("scaling.png")
    return written


def write_all(results: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """results.json, results.md, snippet.md and the plots in ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOTS:
        (out / stale).unlink(missing_ok=True)
    names = write_plots(results, out) if plots else []
    paths = [write_json(results, out / "results.json")]
    (out / "results.md").write_text(markdown(results, names))
    (out / "snippet.md").write_text(snippet(results, out, names))
    paths += [out / "results.md", out / "snippet.md"] + [out / n for n in names]
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m profusion_rt.benchmarks.report FOLDER``: redraw results.md, snippet.md and the plots of a results
    folder from its results.json (e.g. a GPU run recorded on a machine without matplotlib)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder holding results.json")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    results = json.loads((folder / "results.json").read_text())
    for p in write_all(results, folder, plots=not args.no_plots):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
