#!/usr/bin/env bash
# The check on a lent GPU machine (docs/gpu-check.md), in steps that two calls of the device
# tool share:
#
#   bash benchmarks/gpu_check.sh build tests   # call 1: build and install, CUDA tests
#   bash benchmarks/gpu_check.sh bench         # call 2, on the still-warm machine: benchmarks
#   bash benchmarks/gpu_check.sh               # all three steps in one call
#
# The machine has no network: run `bash benchmarks/fetch_wheels.sh` here first and carry .whl.
#
# - Every call first checks the environment (GPU, driver, torch with CUDA, Triton, nvcc): when
#   torch cannot use the GPU, nothing else runs and the call fails (a CUDA test suite that skips
#   everything must not read as a pass).
# - Kept on the machine between calls: the install (wheels + dpt_fast with its extension, in
#   $GPU_CHECK_SITE, stamped with a hash of the sources it was built from), the build folder in
#   the tree, and the Triton and Inductor caches. `bench` reuses an install whose stamp matches
#   the sources and builds first only when it does not (a fresh machine, changed sources).
# - The call ends within GPU_CHECK_BUDGET_S (default 540 s; give the tool a timeout_s above it):
#   each step gets at most what is left (less 30 s), a step with under 30 s left is skipped,
#   and steps are stopped with SIGINT, on which pytest still writes its XML/JSON.
# - The tool returns at most 8 files from $OUT, so logs go to $GPU_CHECK_LOGS and come back
#   packed in $OUT/logs.tgz. Each call writes its own $OUT/summary.json (rewritten after every
#   step, so whatever kills the call, what finished comes back). $OUT holds at most 7 files:
#   summary.json, logs.tgz, cuda_tests.xml (tests), caa_ratio.json, bench_kernels.json,
#   bench_dpt.json, bench_dpt_more.json (bench).
# - Exit status: 0 every step ran and passed; 1 a step failed (or no CUDA, or no wheels);
#   2 none failed but some were skipped for lack of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
LOGS=${GPU_CHECK_LOGS:-/tmp/gpu_check_logs}
SITE=${GPU_CHECK_SITE:-/tmp/dpt_fast_site}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/dpt_fast_triton_cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dpt_fast_inductor_cache}
export PYTHONUNBUFFERED=1

STEPS=("$@")
((${#STEPS[@]})) || STEPS=(build tests bench)
for s in "${STEPS[@]}"; do
    case $s in
        build | tests | bench) ;;
        *) echo "unknown step '$s': the steps are build, tests, bench" >&2; exit 1 ;;
    esac
done
wants() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

rm -rf "$LOGS"  # a rerun on a warm machine must not pack the last call's logs
mkdir -p "$OUT" "$LOGS" "$SITE"
: > "$LOGS/steps.tsv"
echo "${STEPS[*]}" > "$LOGS/call.txt"

collect() {  # pack the logs and rewrite the summary (cheap: runs after every step)
    tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
    python3 -P benchmarks/gpu_summary.py "$OUT" "$LOGS" > "$LOGS/summary.md" 2>&1
}

record() {  # record NAME RESULT SECONDS: a step that did not run its command
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$LOGS/steps.tsv"
    collect
}

step() {  # step NAME LIMIT_S CMD... : run within the budget, log to $LOGS/NAME.log, record exit
    local name=$1 limit=$2
    shift 2
    # The margin covers a stopped step's 20 s grace before the kill, then the summary.
    local left=$((BUDGET - SECONDS - 30))
    if ((left < 30)); then
        echo "--- $name: skipped, ${left} s left of the budget"
        record "$name" skipped 0
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "=== $name ($(date +%T), limit ${limit} s) ==="
    local start=$SECONDS
    timeout -s INT -k 20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$LOGS/$name.log"
    echo "--- $name: exit $rc in $((SECONDS - start)) s"
    record "$name" "$rc" "$((SECONDS - start))"
    return $rc
}

finish() {  # print the summary, exit with the status it computed
    cat "$LOGS/summary.md"
    local status
    status=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['status'])" \
        "$OUT/summary.json" 2>/dev/null)
    case $status in
        passed) exit 0 ;;
        incomplete) exit 2 ;;
        *) exit 1 ;;
    esac
}

command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"

# --- environment: every check counts in the exit status --------------------------------------
env_checks() {
    local rc=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || rc=1
    python3 - <<'EOF' || rc=1
import sys
import torch
import triton
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: torch cannot use the GPU here")
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "no nvcc"; rc=1; fi
    ninja --version || rc=1
    echo "cpus: $(nproc)"
    echo "kept from an earlier call: install $(du -sh "$SITE" | cut -f1)," \
         "Triton cache $(find "$TRITON_CACHE_DIR" -type f 2>/dev/null | wc -l) files"
    return $rc
}
export -f env_checks
export SITE TRITON_CACHE_DIR
if ! step env 60 bash -c env_checks; then
    echo "THE ENVIRONMENT CHECK FAILED (see env above): nothing else runs"
    finish
fi

# --- install: carried wheels, then dpt_fast built against the machine's torch -----------------
source_stamp() {  # what the install was built from: a hash of every source file's content
    find setup.py pyproject.toml build_backend csrc dpt_fast kernels -type f \
        \( -name '*.py' -o -name '*.toml' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' \
        -o -name '*.json' -o -name '*.md' -o -name '*.safetensors' \) -print0 \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
STAMP="$SITE/.dpt_fast_source_stamp"

if ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl
elif compgen -G "$SITE/open_clip*" >/dev/null; then
    record wheels reused 0
else
    echo "NO .whl CARRIED: open_clip/ftfy are missing on the image and dpt_fast will not" \
         "import. Here, first: bash benchmarks/fetch_wheels.sh; then carry .whl"
    record wheels missing 0
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

install_up_to_date() {
    compgen -G "$SITE/dpt_fast/_C*.so" >/dev/null && [[ -f $STAMP ]] \
        && [[ $(cat "$STAMP") == "$(source_stamp)" ]]
}

# Built for Hopper only (fast), against the machine's own torch. --no-build-isolation: the
# machine has no network to fetch build requirements, and its image has them. If the build
# fails, the pure-Python package is installed, so the Triton tests and benchmarks still run.
build() {
    rm -f "$STAMP"
    if step build 300 env DPT_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
        python3 -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir \
        --upgrade --target "$SITE" . \
        && compgen -G "$SITE/dpt_fast/_C*.so" >/dev/null; then
        source_stamp > "$STAMP"
    else
        step build_python_only 60 env DPT_FAST_SKIP_EXT=1 python3 -m pip install \
            --no-build-isolation --no-deps --no-index --no-cache-dir --upgrade --target "$SITE" .
    fi
}
if wants build; then
    build
elif install_up_to_date; then
    record build reused 0
else
    build  # tests or bench asked for on a machine without a current install
fi

# --- CUDA tests ---------------------------------------------------------------------------
# -P: the source tree must not shadow the installed package (which has _C and kernels).
if wants tests; then
    TIMEOUT_FLAGS=()
    python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAGS=(-p timeout --timeout 150)
    step cuda_tests 300 env DPT_FAST_REQUIRE_CUDA=1 python3 -P -m pytest tests -m cuda -q -rs \
        -p no:cacheprovider --continue-on-collection-errors "${TIMEOUT_FLAGS[@]}" \
        --junitxml="$OUT/cuda_tests.xml"
fi

# --- benchmarks, most valuable first ------------------------------------------------------------
if wants bench; then
    # The class-aware attention op vs the composition, interleaved round by round. (No -P: the
    # script imports caa_inputs from its own folder, which holds no dpt_fast to shadow.)
    step caa_ratio 150 python3 benchmarks/caa_ratio.py --rounds 42 --out "$OUT/caa_ratio.json"
    step bench_kernels 150 python3 -P -m pytest benchmarks/test_bench_class_aware_attention.py \
        benchmarks/test_bench_prompt_attention.py -q -p no:cacheprovider --benchmark-only \
        --benchmark-json="$OUT/bench_kernels.json"
    step bench_dpt 180 python3 -P -m pytest benchmarks/test_bench_dpt.py -q -p no:cacheprovider \
        --benchmark-only -k "vit_b16 and not compiled" --benchmark-json="$OUT/bench_dpt.json"
    step bench_dpt_more 300 python3 -P -m pytest benchmarks/test_bench_dpt.py -q \
        -p no:cacheprovider --benchmark-only -k "compiled or vit_l14" \
        --benchmark-json="$OUT/bench_dpt_more.json"
fi

finish
