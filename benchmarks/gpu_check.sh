#!/usr/bin/env bash
# One call on a lent GPU machine (see README "Test"): install what the image lacks from carried
# wheels, build and install dpt_fast against the machine's own torch, run the CUDA tests and the
# benchmarks, and write JSON + a short table under $OUT. Every step runs even if an earlier one
# failed; summary.json records each step's exit status. Keep the whole call under 8 minutes.
#
# Here, first:  bash benchmarks/fetch_wheels.sh
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SITE=/tmp/dpt_fast_site
export PYTHONUNBUFFERED=1
STATUS="$OUT/steps.tsv"
: > "$STATUS"

step() {  # step NAME TIMEOUT_S CMD... : run, log to $OUT/NAME.log, record status
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T)) ==="
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STATUS"
    echo "--- $name: exit $rc in $((SECONDS - start)) s"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name())"'

if ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# Build against the machine's torch, for Hopper only (fast), and install beside the wheels.
step build 420 env DPT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python3 -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir \
    --upgrade --target "$SITE" .

# -P: the source tree must not shadow the installed package (which has _C and kernels).
step cuda_tests 300 python3 -P -m pytest tests -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"

# The class-aware attention op vs the composition, interleaved round by round (the issue's ratio);
# before the suites, which may run into the call's time limit.
# (no -P: the script imports caa_inputs from its own folder, which holds no dpt_fast to shadow)
step caa_ratio 90 python3 benchmarks/caa_ratio.py --rounds 41 --out "$OUT/caa_ratio.json"

step benchmarks 300 python3 -P -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$OUT/benchmarks.json"

# Markdown table + PNG plots of the benchmarks (and the GPU targets) into $OUT.
step report 120 python3 -P benchmarks/report.py "$OUT/benchmarks.json" --out "$OUT" \
    --name benchmarks_report

python3 -P benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
