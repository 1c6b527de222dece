"""gpu_summary.py on the files a gpu_check.sh run leaves, including a run cut short."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load

gpu_summary = load("gpu_summary")

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3"
failures="1" errors="0" skipped="1"><testcase classname="tests.test_x" name="test_ok"/>
<testcase classname="tests.test_x" name="test_bad"><failure message="boom"/></testcase>
<testcase classname="tests.test_x" name="test_skip"><skipped/></testcase></testsuite></testsuites>
"""


def _run(out: Path, logs: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    argv = sys.argv
    sys.argv = ["gpu_summary.py", str(out), str(logs)]
    try:
        assert gpu_summary.main() == 0
    finally:
        sys.argv = argv
    return json.loads((out / "summary.json").read_text()), capsys.readouterr().out


def test_summary_of_a_run_cut_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    (logs / "steps.tsv").write_text("env\t0\t5\nwheels\tmissing\t0\nbuild\t1\t80\n"
                                    "bench_dpt_more\tskipped\t0\n")
    (logs / "env.log").write_text("torch 2.11\n")
    (logs / "call.txt").write_text("build tests bench\n")
    (out / "cuda_tests.xml").write_text(JUNIT)
    (out / "caa_ratio.json").write_text(json.dumps(
        {"cases": [{"B": 32, "op/composition": {"median": 0.5, "q1": 0.4, "q3": 0.6}}]}))
    bench = {"fullname": "benchmarks/test_bench_x.py::test_a[op]",
             "stats": {"mean": 2e-3, "stddev": 1e-4, "rounds": 10}, "extra_info": {"impl": "op"}}
    (out / "bench_kernels.json").write_text(json.dumps({"benchmarks": [bench]}))
    (out / "bench_dpt.json").write_text('{"benchmarks": [')  # torn by a kill

    summary, text = _run(out, logs, capsys)
    assert [s["exit"] for s in summary["steps"]] == [0, "missing", 1, "skipped"]
    assert summary["call"] == ["build", "tests", "bench"] and summary["status"] == "failed"
    assert summary["environment"] == "torch 2.11\n"
    assert summary["cuda_tests"]["failed"] == ["tests.test_x::test_bad"]
    assert summary["cuda_tests"]["tests"] == 3 and summary["cuda_tests"]["skipped"] == 1
    assert summary["benchmarks"]["bench_kernels"][0]["mean_ms"] == 2.0
    assert "unreadable" in summary["benchmarks"]["bench_dpt"]
    assert text.startswith("gpu_check.sh build tests bench: failed")
    assert "FAILED tests.test_x::test_bad" in text
    assert "class_aware_attention B=32: op/composition 0.500" in text


def test_summary_of_an_empty_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary, text = _run(tmp_path, tmp_path, capsys)
    assert summary["steps"] == [] and summary["cuda_tests"] == {}
    assert summary["caa_ratio"] is None and summary["benchmarks"] == {}
    assert summary["status"] == "failed"  # nothing ran, nothing was checked
    assert "| step | exit | seconds |" in text


@pytest.mark.parametrize(
    ("steps", "junit", "status"),
    [
        ("env\t0\t5\nwheels\treused\t0\nbuild\treused\t0\ncaa_ratio\t0\t90\n", None,
         "passed"),
        ("env\t0\t5\nbuild\t0\t100\ncuda_tests\t0\t200\n", JUNIT, "failed"),
        ("env\t0\t5\nbuild\t0\t100\nbench_dpt_more\tskipped\t0\n", None, "incomplete"),
        ("env\t1\t5\n", None, "failed"),  # e.g. torch.cuda.is_available() is False
    ],
    ids=["reused-install", "test-failure-in-xml", "skipped-for-time", "no-cuda"],
)
def test_call_status(tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: str,
                     junit: str | None, status: str) -> None:
    (tmp_path / "steps.tsv").write_text(steps)
    if junit:
        (tmp_path / "cuda_tests.xml").write_text(junit)
    summary, text = _run(tmp_path, tmp_path, capsys)
    assert summary["status"] == status
    assert text.startswith(f"gpu_check.sh: {status}")
