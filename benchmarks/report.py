"""Markdown tables and PNG plots from pytest-benchmark JSON files of the benchmark suites.

Usage (a plain script, from the repo root; it imports nothing from the repo):

    python benchmarks/report.py RESULTS.json [MORE.json ...] --out FOLDER [--name STEM]

Writes FOLDER/STEM.md (STEM defaults to the first JSON's stem) and FOLDER/STEM_*.png, and prints
the markdown. Tables: the DPT model suite (case, impl, classes, batch, mean ms, images/s,
speed-up over the eager reference of the same case, model TFLOP/s, peak memory) and the kernel
suites (speed-up over SDPA / the PyTorch composition). Plots (log-log): time per DPT training
step, eval pass and eval epoch vs number of classes, one line per implementation; kernel time vs
batch size, one line per implementation. Speed-ups compare rows of the same JSON file only.

Targets, checked when their rows are present: on the GPU, the fast training step at batch 256
with 100 classes reaches >= 40 % model FLOP utilisation of 790 TFLOP/s (dense bf16, H200), and the
fused ``prompt_attention`` forward + backward beats SDPA over the concatenated K/V at every shape;
on every device, the ``class_aware_attention`` op's forward + backward is at least as fast as the
PyTorch composition and its torch.compile at every batch size (compared by median time, which a
busy machine's outlier rounds move less than the mean).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

try:  # the GPU machine's image may lack matplotlib: then tables only, plots made here later
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
except ImportError:
    plt = None

PEAK_BF16_TFLOPS = 790.0  # H200 dense bf16
MFU_TARGET = 0.40
IMPL_ORDER = ["reference", "reference_compiled", "fast", "fast_compiled",
              "naive", "sdpa", "triton", "composition", "compiled", "op"]
MODE_ORDER = ["train", "eval_pass", "eval_epoch"]


# ------------------------------------------------------------------------------ reading
def suite_of(fullname: str) -> str:
    """'dpt', 'prompt_attention', 'class_aware_attention' or 'other' from a test's fullname."""
    for suite in ("dpt", "prompt_attention", "class_aware_attention"):
        if f"test_bench_{suite}.py" in fullname:
            return suite
    return "other"


def load_rows(paths: list[Path]) -> list[dict]:
    """One flat dict per benchmark: suite, source (file stem), mean_s, rounds and extra_info."""
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info", {}))
            rows.append(info | {
                "suite": suite_of(bench["fullname"]), "source": path.stem,
                "name": bench["name"], "mean_s": bench["stats"]["mean"],
                "stddev_s": bench["stats"]["stddev"], "rounds": bench["stats"]["rounds"],
                "median_s": bench["stats"]["median"],
            })
    return rows


def _order(value: str, order: list[str]) -> int:
    return order.index(value) if value in order else len(order)


# ------------------------------------------------------------------------------ DPT suite
def dpt_key(row: dict) -> tuple:
    """Rows with the same key are the same case run by different implementations."""
    return (row["source"], row.get("arch"), row["mode"], row["batch"], row["n_classes"])


def add_speedups(rows: list[dict]) -> None:
    """Set ``speedup`` = eager reference mean / mean for every DPT row that has a reference."""
    reference = {dpt_key(r): r["mean_s"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        ref = reference.get(dpt_key(r))
        r["speedup"] = ref / r["mean_s"] if ref else None


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def dpt_table(rows: list[dict], with_source: bool) -> str:
    """Markdown table of the DPT suite, sorted by arch, mode, batch, classes, impl."""
    rows = sorted(rows, key=lambda r: (r["source"], r.get("arch", ""),
                                       _order(r["mode"], MODE_ORDER), r["batch"],
                                       r["n_classes"], _order(r["impl"], IMPL_ORDER)))
    head = ["case", "impl", "classes", "batch", "mean ms", "± ms", "images/s",
            "speed-up vs eager ref", "TFLOP/s", "peak GiB"]
    if with_source:
        head.insert(0, "run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r.get('arch')} {r['mode']}", r["impl"], str(r["n_classes"]), str(r["batch"]),
                 f"{r['mean_s'] * 1e3:.2f}", f"{r['stddev_s'] * 1e3:.2f}",
                 _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("speedup"), ".2f"),
                 _fmt(r.get("tflops"), ".4f" if r.get("device") == "cpu" else ".1f"),
                 _fmt(r.get("peak_mem_gib"), ".2f", "n/a")]
        if with_source:
            cells.insert(0, r["source"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _loglog(ax, title: str, xlabel: str, xs: set) -> None:
    """Log-log axes with the benchmarked x values as plain tick labels."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(xs))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean time per call (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_dpt(rows: list[dict], out: Path, stem: str) -> list[Path]:
    """One PNG per (run, arch, batch) with 2+ class counts: a panel per mode, time vs classes,
    a line per implementation."""
    if plt is None:
        return []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["source"], r.get("arch"), r["batch"])].append(r)
    written = []
    for (source, arch, batch), group in sorted(groups.items(), key=str):
        if len({r["n_classes"] for r in group}) < 2:
            continue  # a single class count (batch 256, ViT-L/14): in the table only
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in group)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            by_impl = defaultdict(list)
            for r in group:
                if r["mode"] == mode:
                    by_impl[r["impl"]].append((r["n_classes"], r["mean_s"] * 1e3))
            for impl in sorted(by_impl, key=lambda i: _order(i, IMPL_ORDER)):
                xs, ys = zip(*sorted(by_impl[impl]), strict=True)
                ax.plot(xs, ys, marker="o", label=impl)
            _loglog(ax, f"{mode} ({arch}, batch {batch})", "number of classes",
                    {r["n_classes"] for r in group})
        fig.suptitle(f"DPT time vs classes — {source}", fontsize=11)
        fig.tight_layout()
        path = out / f"{stem}_dpt_{arch}_b{batch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ kernel suites
KERNEL_BASELINE = {"prompt_attention": "sdpa", "class_aware_attention": "composition"}


def kernel_family(row: dict) -> str:
    """Rows of one family share everything but the batch size and the implementation."""
    shape = row.get("shape", {})
    if row["suite"] == "prompt_attention":
        kind = "text (causal)" if shape.get("causal") else "vision"
        return f"{kind} H{shape.get('H')} N{shape.get('N')} P{shape.get('P')} D{shape.get('D')}"
    return f"K{shape.get('K')} M{shape.get('M')} dk{shape.get('dk')} dv{shape.get('dv')}"


def kernel_table(rows: list[dict], suite: str) -> str:
    """Markdown table of one kernel suite with the speed-up over its PyTorch baseline."""
    base_impl = KERNEL_BASELINE[suite]
    base = {(r["source"], r.get("mode"), kernel_family(r), r["shape"]["B"]): r["mean_s"]
            for r in rows if r["impl"] == base_impl}
    head = ["shape", "mode", "B", "impl", "mean ms", "± ms", f"speed-up vs {base_impl}",
            "TFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(rows, key=lambda r: (r["source"], kernel_family(r), r.get("mode", ""),
                                       r["shape"]["B"], _order(r["impl"], IMPL_ORDER)))
    for r in rows:
        ref = base.get((r["source"], r.get("mode"), kernel_family(r), r["shape"]["B"]))
        lines.append("| " + " | ".join([
            kernel_family(r), r.get("mode", "fwd_bwd"), str(r["shape"]["B"]), r["impl"],
            f"{r['mean_s'] * 1e3:.3f}", f"{r['stddev_s'] * 1e3:.3f}",
            _fmt(ref / r["mean_s"] if ref else None, ".2f"), _fmt(r.get("tflops"), ".2f"),
        ]) + " |")
    return "\n".join(lines)


def _kernel_panel(ax, rows: list[dict], title: str) -> None:
    """Time vs batch size, a line per impl; bars per impl when only one batch size was run."""
    by_impl = defaultdict(list)
    for r in rows:
        by_impl[r["impl"]].append((r["shape"]["B"], r["mean_s"] * 1e3))
    impls = sorted(by_impl, key=lambda i: _order(i, IMPL_ORDER))
    batches = {r["shape"]["B"] for r in rows}
    if len(batches) == 1:
        ax.bar(impls, [by_impl[i][0][1] for i in impls], color=[f"C{n}" for n in range(len(impls))])
        ax.set_title(f"{title} (B={batches.pop()} only)", fontsize=10)
        ax.set_ylabel("mean time per call (ms)")
        ax.grid(True, axis="y", alpha=0.3)
        return
    for impl in impls:
        xs, ys = zip(*sorted(by_impl[impl]), strict=True)
        ax.plot(xs, ys, marker="o", label=impl)
    _loglog(ax, title, "batch size B", batches)


def plot_kernels(rows: list[dict], suite: str, out: Path, stem: str) -> Path | None:
    """Time vs batch size, a panel per (family, mode), a line per implementation."""
    panels = defaultdict(list)
    for r in rows:
        panels[(r["source"], kernel_family(r), r.get("mode", "fwd_bwd"))].append(r)
    if not panels or plt is None:
        return None
    keys = sorted(panels)
    n_cols = min(len(keys), 2)
    n_rows = -(-len(keys) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6 * n_cols, 4 * n_rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        _kernel_panel(ax, panels[key], f"{key[1]}\n{key[2]}")
    fig.suptitle(f"{suite} — time vs batch size ({keys[0][0]})", fontsize=11)
    fig.tight_layout()
    path = out / f"{stem}_{suite}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ targets
def mfu_target(dpt_rows: list[dict]) -> list[str]:
    """Model FLOP utilisation of the GPU fast training steps at batch 256, 100 classes."""
    lines = []
    for r in dpt_rows:
        if (r.get("device") == "cuda" and r["mode"] == "train" and r["batch"] == 256
                and r["n_classes"] == 100 and r["impl"].startswith("fast")):
            mfu = r["tflops"] / PEAK_BF16_TFLOPS
            verdict = "MET" if mfu >= MFU_TARGET else "NOT met"
            lines.append(f"- training-step MFU, {r['impl']} {r.get('arch')} batch 256, 100 "
                         f"classes: {r['tflops']:.1f} TFLOP/s = {mfu:.1%} of "
                         f"{PEAK_BF16_TFLOPS:.0f} (target >= {MFU_TARGET:.0%}): {verdict}")
    return lines


def prompt_attention_target(rows: list[dict]) -> list[str]:
    """Is the fused prompt_attention fwd+bwd faster than SDPA at every benchmarked shape?"""
    sdpa = {(r["source"], kernel_family(r), r["shape"]["B"]): r["mean_s"] for r in rows
            if r["impl"] == "sdpa" and r.get("mode") == "fwd_bwd"}
    results = []
    for r in rows:
        key = (r["source"], kernel_family(r), r["shape"]["B"])
        if r["impl"] == "triton" and r.get("mode") == "fwd_bwd" and key in sdpa:
            results.append((key, sdpa[key] / r["mean_s"]))
    if not results:
        return []
    ok = all(s > 1.0 for _, s in results)
    lines = [f"- prompt_attention fwd+bwd faster than SDPA at every shape: "
             f"{'MET' if ok else 'NOT met'}"]
    lines += [f"  - {fam}, B={b}: {s:.2f}x" for (_, fam, b), s in sorted(results)]
    return lines


def class_aware_attention_target(rows: list[dict]) -> list[str]:
    """Is the op's fwd+bwd at least as fast as the composition and its compile, per device?"""
    median = {(r["source"], r.get("device", "?"), r["shape"]["B"], r["impl"]): r["median_s"]
              for r in rows if r.get("mode", "fwd_bwd") == "fwd_bwd" and "median_s" in r}
    lines = []
    for source, device in sorted({key[:2] for key in median}):
        ratios = []  # (B, baseline, op median / baseline median)
        for (src, dev, batch, impl), op_s in sorted(median.items()):
            if (src, dev) != (source, device) or impl != "op":
                continue
            ratios += [(batch, base, op_s / median[(src, dev, batch, base)])
                       for base in ("composition", "compiled") if (src, dev, batch, base) in median]
        if not ratios:
            continue
        ok = all(ratio <= 1.0 for _, _, ratio in ratios)
        lines.append(f"- class_aware_attention fwd+bwd ({device}) at least as fast as the "
                     f"composition and its compile: {'MET' if ok else 'NOT met'} "
                     "(op median / baseline median; <= 1 is as fast or faster)")
        lines += [f"  - B={batch}: op / {base} = {ratio:.3f}" for batch, base, ratio in ratios]
    return lines


# ------------------------------------------------------------------------------ main
def build_report(rows: list[dict], out: Path, stem: str) -> str:
    """Write the plots and return the markdown."""
    with_source = len({r["source"] for r in rows}) > 1
    dpt_rows = [r for r in rows if r["suite"] == "dpt"]
    add_speedups(dpt_rows)
    parts = [f"# Benchmark report: {', '.join(sorted({r['source'] for r in rows}))}", ""]
    images = []
    if dpt_rows:
        parts += ["## DPT model (train step, eval pass with warm text cache, eval epoch of 4 "
                  "batches from a cold cache)", "", dpt_table(dpt_rows, with_source), ""]
        images += plot_dpt(dpt_rows, out, stem)
    for suite in KERNEL_BASELINE:
        suite_rows = [r for r in rows if r["suite"] == suite]
        if suite_rows:
            parts += [f"## {suite}", "", kernel_table(suite_rows, suite), ""]
            path = plot_kernels(suite_rows, suite, out, stem)
            images += [path] if path else []
    targets = mfu_target(dpt_rows) + prompt_attention_target(
        [r for r in rows if r["suite"] == "prompt_attention"])
    if not targets:
        targets = ["- GPU targets not evaluated: no GPU (CUDA) rows in these results"]
    targets += class_aware_attention_target(
        [r for r in rows if r["suite"] == "class_aware_attention"])
    parts += ["## Targets", "", *targets]
    parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    if plt is None:
        parts.append("(no plots: matplotlib is not installed; rerun report.py where it is)")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--name", help="file stem of the outputs (default: first JSON's stem)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.json[0].stem
    markdown = build_report(load_rows(args.json), args.out, stem)
    (args.out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
