#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one short script for a lent GPU host
# (no internet, a system Python with CuPy): the `gpu`-marked tests, then the
# tunnel, vgpu_path and lane_floor benchmarks. Output goes to $OUT (default ./device-out).
#
# Wheels the host lacks (construct, cffi, pycparser, pytest-asyncio, ...) may
# be put in .whl/ beforehand (`pip download --python-version 3.12
# --only-binary=:all: -d .whl ...` on a machine with PyPI); they are installed
# into /tmp/site without touching the host's Python.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
PY=${PY:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$OUT/gpu.txt"
"$PY" -m vpcie._native._build >"$OUT/native_build.txt" 2>&1
"$PY" -c "from vpcie._native import native_available as n; print('native module:', n())"

timeout 200 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o addopts="-ra" \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -3
timeout 90 "$PY" benchmarks/tunnel.py --executor cuda --json 2>&1 | tee "$OUT/tunnel_cuda.txt" | tail -9
for run in 1 2; do
    timeout 120 "$PY" benchmarks/vgpu_path.py --json 2>&1 | tee "$OUT/vgpu_path$run.txt" |
        grep -v '^{' | grep -E 'benchmark|machine|NOP|H2D\+D2H|targets'
done
timeout 90 "$PY" benchmarks/lane_floor.py --json 2>&1 | tee "$OUT/lane_floor.txt" |
    grep -v '^{' | grep -E 'benchmark|NOP'
