"""Summarise one gpu_check.sh call: steps, CUDA test results, the op ratio and benchmark means.

Usage: python benchmarks/gpu_summary.py OUT_DIR [LOG_DIR]
  -> OUT_DIR/summary.json, markdown on stdout. LOG_DIR (default OUT_DIR) holds steps.tsv,
  call.txt (the steps asked for) and env.log; OUT_DIR holds cuda_tests.xml, caa_ratio.json and
  bench_*.json. Any of them may be missing or cut short (gpu_check.sh rewrites the summary after
  every step).

The call's status: "failed" when a step exited non-zero, the carried wheels were missing, a CUDA
test failed, or no step ran; else "incomplete" when a step was skipped for lack of time; else
"passed".
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_steps(logs: Path) -> list[dict]:
    """steps.tsv rows: name, exit status (an int, or "skipped"/"missing"/"reused"), seconds."""
    path = logs / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split("\t")
        steps.append({"step": name, "exit": int(rc) if rc.lstrip("-").isdigit() else rc,
                      "seconds": int(seconds)})
    return steps


def read_tests(out: Path) -> dict:
    """Counts and failed test names from the junit XML; {} without it (or when it is torn)."""
    path = out / "cuda_tests.xml"
    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"unreadable": str(exc)}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "failed": failed
    }


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {"unreadable": str(exc)}


def read_benchmarks(out: Path) -> dict[str, list[dict] | dict]:
    """Rows (name, mean, stddev, rounds, extra_info) of every bench_*.json, by file stem; a file
    that does not parse (cut by a kill) gives {"unreadable": reason}."""
    suites: dict[str, list[dict] | dict] = {}
    for path in sorted(out.glob("bench_*.json")):
        data = read_json(path) or {}
        if "unreadable" in data:
            suites[path.stem] = data
            continue
        suites[path.stem] = [
            {"name": b["fullname"], "mean_ms": b["stats"]["mean"] * 1e3,
             "stddev_ms": b["stats"]["stddev"] * 1e3, "rounds": b["stats"]["rounds"],
             "extra_info": b.get("extra_info", {})}
            for b in data.get("benchmarks", [])
        ]
    return suites


def call_status(steps: list[dict], tests: dict) -> str:
    """passed, incomplete (a step skipped for lack of time) or failed (see the module doc)."""
    failed = [s for s in steps if s["exit"] == "missing"
              or (isinstance(s["exit"], int) and s["exit"] != 0)]
    if failed or not steps or tests.get("failures") or tests.get("errors") or "unreadable" in tests:
        return "failed"
    return "incomplete" if any(s["exit"] == "skipped" for s in steps) else "passed"


def main() -> int:
    out = Path(sys.argv[1])
    logs = Path(sys.argv[2]) if len(sys.argv) > 2 else out
    env_log = logs / "env.log"
    call = logs / "call.txt"
    steps = read_steps(logs)
    tests = read_tests(out)
    summary = {
        "call": call.read_text().split() if call.exists() else [],
        "status": call_status(steps, tests),
        "environment": env_log.read_text() if env_log.exists() else "",
        "steps": steps,
        "cuda_tests": tests,
        "caa_ratio": read_json(out / "caa_ratio.json"),
        "benchmarks": read_benchmarks(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(" ".join(["gpu_check.sh", *summary["call"]]) + f": {summary['status']}\n")
    print("| step | exit | seconds |\n|---|---|---|")
    for s in summary["steps"]:
        print(f"| {s['step']} | {s['exit']} | {s['seconds']} |")
    tests = summary["cuda_tests"]
    if "tests" in tests:
        print(f"\nCUDA tests: {tests['tests']} run, {tests['failures']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped")
        for name in tests["failed"]:
            print(f"- FAILED {name}")
    for case in (summary["caa_ratio"] or {}).get("cases", []):
        ratios = ", ".join(f"{k} {v['median']:.3f}" for k, v in case.items() if k.startswith("op/"))
        print(f"\nclass_aware_attention B={case['B']}: {ratios}")
    for suite, rows in summary["benchmarks"].items():
        if isinstance(rows, dict):
            print(f"\n{suite}: unreadable ({rows['unreadable']})")
        elif rows:
            print(f"\n| {suite} | mean (ms) | ± (ms) |\n|---|---|---|")
            for r in rows:
                print(f"| {r['name']} | {r['mean_ms']:.3f} | {r['stddev_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
