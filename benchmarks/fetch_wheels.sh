#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks (open_clip and its pure-Python needs),
# for its Python 3.12, into .whl/ (git-ignored). Carry .whl when calling benchmarks/gpu_check.sh.
# Downloads into a temporary folder first: a failed download leaves the previous .whl/ in place.
set -euo pipefail
cd "$(dirname "$0")/.."
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$staging" "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.13"
rm -rf .whl && mv "$staging" .whl
ls -l .whl
