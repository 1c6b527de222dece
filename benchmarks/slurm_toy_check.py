"""The SLURM path as a new user meets it, on the toy task: a single-node SLURM on localhost
(``tests/slurm_cluster.py``; needs root and Debian's ``slurm-wlm`` + ``munge``), a fresh folder
with the toy task under the relative root ``data``, the script emitted there with ``--device
cpu --slurm-gpus 0``, submitted with ``sbatch`` from another folder; then the same grid by a
local ``dpt-fast sweep``, and every run's ``results.json`` compared (less where and how fast it
ran). Exit status 0 when every task completed and every run is equal.

    python benchmarks/slurm_toy_check.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slurm_cluster import LocalSlurm  # the tests' helper, found through sys.path

GRID = ["--datasets", "dtd", "--shots", "1", "2", "--seeds", "1", "--epochs", "2"]
FLAGS = ["sweep", "--root", "data", "--backbone", "toy", "--pretrained", "toy", "--recipe", "toy",
         *GRID, "--device", "cpu", "--num-workers", "0", "--progress", "none"]
SHARDS = 2
JOB_TIMEOUT_S = 1800.0
WHERE_AND_WHEN = ("output_dir", "images_per_s")  # fields that say where and how fast it ran


def comparable(value: object) -> object:
    """``results.json`` less :data:`WHERE_AND_WHEN`."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in WHERE_AND_WHEN}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def dpt_fast(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "dpt_fast", *args], cwd=cwd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the folders (printed)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="slurm-toy-check-"))
    work, elsewhere = base / "fresh", base / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    try:
        subprocess.run([sys.executable, "-m", "dpt_fast.toy.task", "data"], cwd=work,
                       check=True, capture_output=True)
        dpt_fast(*FLAGS, "--output-dir", "sl", "--emit-slurm", "job.sh", "--slurm-shards",
                 str(SHARDS), "--slurm-gpus", "0", "--slurm-cpus", "1", "--slurm-time", "30",
                 cwd=work)
        with LocalSlurm.start() as cluster:
            print(cluster.run("sinfo", "--version").stdout.strip(), "| single node, localhost")
            start = time.monotonic()
            job = cluster.sbatch(work / "job.sh", cwd=elsewhere)
            states = cluster.wait(job, JOB_TIMEOUT_S)
            print(f"array job {job}: {states}, {time.monotonic() - start:.0f} s from sbatch "
                  "to the last task's end")
        start = time.monotonic()
        dpt_fast(*FLAGS, "--output-dir", "local", cwd=work)
        print(f"local sweep: {time.monotonic() - start:.0f} s")
        ok = set(states.values()) == {"COMPLETED"} and not list(elsewhere.iterdir())
        for results in sorted((work / "local").glob("dpt/**/results.json")):
            name = results.relative_to(work / "local")
            swept = work / "sl" / name
            same = swept.is_file() and comparable(json.loads(swept.read_text())) == comparable(
                json.loads(results.read_text()))
            ok &= same
            print(f"{name}: {'equal' if same else 'DIFFERENT or missing'}")
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
