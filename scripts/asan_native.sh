#!/usr/bin/env bash
# The cffi hot path (vpcie/_native/*.c) under AddressSanitizer: build it with
# -fsanitize=address in a scratch copy of the tree and run the tests that drive
# it (walker and ring differential tests with hostile rings, the virtqueue, the
# vGPU device in-process, the lane thread, the fuzz targets). Any ASan report fails the run.
# Used by .ci/run after the test suite; needs gcc's libasan (installed with gcc).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY="$ROOT/.venv/bin/python"
LIBASAN="$(gcc -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
    echo "asan_native.sh: gcc's libasan.so not found ($LIBASAN)" >&2
    exit 1
fi

WORK="$(mktemp -d /tmp/vpcie-asan.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$WORK"
cd "$WORK"
CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1" LDFLAGS="-fsanitize=address" \
    "$PY" -m vpcie._native._build

REPORTS="$WORK/asan-report"
rc=0
PYTHONPATH="$WORK" LD_PRELOAD="$LIBASAN" PYTHONMALLOC=malloc \
    ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS" \
    "$PY" -m pytest -q -p no:cacheprovider \
    tests/unit/test_native.py tests/unit/test_batchcheck.py tests/unit/test_virtqueue.py \
    tests/unit/test_shared_stores.py tests/unit/test_lane.py \
    tests/unit/test_gpu_device.py tests/integration/test_vgpu_device.py \
    tests/integration/test_vgpu_lane.py tests/fuzz || rc=$?
if compgen -G "$REPORTS*" >/dev/null; then
    echo "asan_native.sh: AddressSanitizer reported:" >&2
    cat "$REPORTS"* >&2
    exit 1
fi
exit "$rc"
