"""Summarise a gpu_check.sh run: steps, CUDA test results and benchmark means.

Usage: python benchmarks/gpu_summary.py OUT_DIR  -> OUT_DIR/summary.json, markdown on stdout.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split("\t")
        steps.append({"step": name, "exit": int(rc), "seconds": int(seconds)})
    return steps


def read_tests(out: Path) -> dict:
    path = out / "cuda_tests.xml"
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "failed": failed
    }


def read_benchmarks(out: Path) -> dict:
    path = out / "benchmarks.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    rows = [
        {"name": b["fullname"], "mean_ms": b["stats"]["mean"] * 1e3,
         "stddev_ms": b["stats"]["stddev"] * 1e3, "rounds": b["stats"]["rounds"],
         "extra_info": b.get("extra_info", {})}
        for b in data.get("benchmarks", [])
    ]
    return {"machine_info": data.get("machine_info", {}), "rows": rows}


def main() -> int:
    out = Path(sys.argv[1])
    env_log = out / "env.log"
    summary = {
        "environment": env_log.read_text() if env_log.exists() else "",
        "steps": read_steps(out),
        "cuda_tests": read_tests(out),
        "benchmarks": read_benchmarks(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| step | exit | seconds |\n|---|---|---|")
    for s in summary["steps"]:
        print(f"| {s['step']} | {s['exit']} | {s['seconds']} |")
    tests = summary["cuda_tests"]
    if tests:
        print(f"\nCUDA tests: {tests['tests']} run, {tests['failures']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped")
        for name in tests["failed"]:
            print(f"- FAILED {name}")
    rows = summary["benchmarks"].get("rows", [])
    if rows:
        print("\n| benchmark | mean (ms) | ± (ms) |\n|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['mean_ms']:.3f} | {r['stddev_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
