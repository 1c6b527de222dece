"""The toy demo's training under several floating-point rounding environments: the full table.

    python benchmarks/toy_robustness.py --out benchmarks/results/toy_robustness_DATE.json

For every environment of ``dpt_fast.toy.robustness.ENVIRONMENTS`` (default: all four), one
subprocess runs the demo's training (``python -m dpt_fast.toy.demo --no-timing``) for every
method and seed; the table gives, per (method, seed), the test accuracy in each environment,
the spread across environments and the largest epoch-over-epoch rise of the training loss after
the warm-up, then checks the issue's criteria (``robustness.failures``). The JSON (rows, table,
failures, machine) is written after each environment, so a long run can be watched; the
markdown table goes next to it (``.md``). Exit status 1 when a criterion fails.

36 training runs with the defaults (4 environments x 3 seeds x 3 methods, each a demo run of
12 epochs and two evaluations of the 2400 test images). Run again with the same ``--out``, it
keeps the environments that file already holds (for the same recipe, torch and CPU, and at least
these methods and seeds) and runs the others: an interrupted run loses at most one environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from json_report import emit, write_json

from dpt_fast.toy import robustness, task
from dpt_fast.toy.options import DEFAULT_METHODS


def cpu_description() -> dict:
    """The CPU model and the SIMD flags that decide which kernels run (Linux ``lscpu``)."""
    info = {"machine": platform.machine(), "model": platform.processor() or "unknown"}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    info.update(model=fields.get("Model name", info["model"]), cpus=fields.get("CPU(s)"),
                avx2="avx2" in flags, avx512f="avx512f" in flags)
    return info


def demo_recipe() -> dict:
    """The demo's training recipe, as its results.json records it, with the epochs."""
    from dpt_fast.toy import demo
    from dpt_fast.toy.options import DEFAULT_EPOCHS

    return {"epochs": DEFAULT_EPOCHS, "batch_size": demo.BATCH_SIZE, "lr": demo.LR,
            "text_lr": demo.TEXT_LR, "warmup_epochs": demo.WARMUP_EPOCHS,
            "model": demo.MODEL_OVERRIDES}


def _previous_results(out: str | None, report: dict) -> dict:
    """The results and times of an earlier run written to ``out`` with the same recipe, torch
    and CPU that covered at least this run's methods and seeds (its other runs are left out);
    otherwise nothing to keep."""
    empty = {"results": {}, "wall_s": {}}
    if not out or not Path(out).is_file():
        return empty
    previous = json.loads(Path(out).read_text())
    if any(previous.get(key) != report[key] for key in ("torch", "cpu", "recipe")) \
            or not set(report["methods"]) <= set(previous.get("methods", ())) \
            or not set(report["seeds"]) <= set(previous.get("seeds", ())):
        return empty
    for results in previous["results"].values():
        results["runs"] = [run for run in results["runs"] if run["method"] in report["methods"]
                           and run["seed"] in report["seeds"]]
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--environments", nargs="+", default=list(robustness.ENVIRONMENTS),
                        choices=list(robustness.ENVIRONMENTS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--work-dir", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON report here (and the table to .md)")
    args = parser.parse_args(argv)

    import torch

    report = {"date": datetime.date.today().isoformat(), "cpu": cpu_description(),
              "torch": torch.__version__, "python": platform.python_version(),
              "recipe": demo_recipe(),
              "environments": {n: robustness.ENVIRONMENTS[n] for n in args.environments},
              "methods": args.methods, "seeds": args.seeds,
              "criteria": {"min_gain": robustness.MIN_GAIN,
                           "max_loss_increase": robustness.MAX_LOSS_INCREASE,
                           "max_spread": robustness.MAX_SPREAD},
              "wall_s": {}, "results": {}}
    previous = _previous_results(args.out, report)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data = work / "data"
        task.write_task(data)  # once, before the subprocesses share it
        for name in args.environments:
            if name in previous["results"]:
                print(f"{name}: kept from {args.out}", file=sys.stderr)
                report["results"][name] = previous["results"][name]
                report["wall_s"][name] = previous["wall_s"][name]
            else:
                start = time.perf_counter()
                report["results"][name] = robustness.run_demo_in(
                    name, work / name, methods=tuple(args.methods), seeds=tuple(args.seeds),
                    data_dir=data)
                report["wall_s"][name] = time.perf_counter() - start
            rows = robustness.table(report["results"])
            report.update(rows=rows, table=robustness.markdown(rows),
                          failures=robustness.failures(rows))
            print(f"{name}: {report['wall_s'][name]:.0f}s", file=sys.stderr)
            if args.out:
                write_json(report, args.out)
    emit({k: report[k] for k in ("date", "cpu", "wall_s", "failures")}, None)
    print(report["table"])
    if args.out:
        write_json(report, args.out)
        Path(args.out).with_suffix(".md").write_text(report["table"] + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
