"""``dpt-fast report runs/``: aggregate results.json files over seeds (mean ± std)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def _key(results: dict) -> tuple:
    cfg = results.get("config", {})
    model = cfg.get("model", {})
    return (results.get("dataset", "?"), model.get("method", "?"), cfg.get("shots", "?"),
            cfg.get("subsample", "all"), cfg.get("backbone", "?"))


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def report_runs(root: Path, out: Path | None = None) -> str:
    """A markdown table with one row per (dataset, method, shots, classes, backbone)."""
    if not root.is_dir():
        raise SystemExit(f"dpt-fast report: not a folder: {root}")
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple, list] = defaultdict(list)
    for path in sorted(root.rglob("results.json")):
        results = json.loads(path.read_text())
        key = _key(results)
        seeds[key].append(results.get("config", {}).get("seed"))
        groups[key]["accuracy"].append(results["test"]["accuracy"])
        groups[key]["macro_f1"].append(results["test"]["macro_f1"])
        if "test_new" in results:
            groups[key]["new_accuracy"].append(results["test_new"]["accuracy"])
            groups[key]["harmonic_mean"].append(results["harmonic_mean"])
    if not groups:
        raise SystemExit(f"dpt-fast report: no results.json under {root}")
    lines = ["| dataset | method | shots | classes | backbone | seeds | accuracy | macro-F1 "
             "| new acc. | H |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for key in sorted(groups, key=str):
        g = groups[key]
        row = dict(zip(("dataset", "method", "shots", "subsample", "backbone"), key,
                       strict=True))
        row |= {"seeds": seeds[key], **{m: v for m, v in g.items()}}
        summary.append(row)
        lines.append(f"| {' | '.join(str(k) for k in key)} | {len(seeds[key])} | "
                     f"{_mean_std(g['accuracy'])} | {_mean_std(g['macro_f1'])} | "
                     f"{_mean_std(g.get('new_accuracy', []))} | "
                     f"{_mean_std(g.get('harmonic_mean', []))} |")
    if out is not None:
        out.write_text(json.dumps(summary, indent=2))
    return "\n".join(lines)
