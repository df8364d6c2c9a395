"""A guest program for tests/integration/test_guest_migrate.py (runs inside
the guest, stdlib + guest_tools only): a loop of H2D / AXPY / D2H on the
vGPU, each result checked, while the host moves the vGPU between agents.

    migrate_guest_job.py run SECONDS   loop that long; any error -> exit 1
    migrate_guest_job.py lost SECONDS  loop until a batch fails DEVICE_LOST,
                                       then open a new context until one works

Every line starts with ``job:`` so the host can follow it on the console.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from array import array

from guest_tools.vgpu import Device
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import DType, Opcode

N = 4096  # floats per vector
KEEP = 1 << 20  # a buffer written once, read back at the end


def say(*parts: object) -> None:
    print("job:", *parts, flush=True)


def step(dev: Device, i: int, hx: int, hy: int, bx, by, acc: list[float]) -> None:  # type: ignore[no-untyped-def]
    """x (new each time) goes up, y += 0.5 x on the device, y comes back and
    must equal ``acc``, the guest's own running sum: y lives on the device
    across iterations, so an update lost (or run twice) shows."""
    x = array("f", [float((i + j) % 251) for j in range(N)])
    bx.write(x.tobytes())
    dev.run(
        [
            rec(Opcode.COPY_H2D, hx, bx.resource_id, 0, 0, 4 * N),
            rec(Opcode.AXPY, int(DType.F32), hx, hy, 0.5, N, 0, 0),
            rec(Opcode.COPY_D2H, hy, by.resource_id, 0, 0, 4 * N),
        ]
    ).check()
    for j in range(N):
        acc[j] += 0.5 * x[j]
    got = array("f")
    got.frombytes(by.read(0, 4 * N))
    if list(got) != acc:
        bad = next(j for j in range(N) if got[j] != acc[j])
        raise SystemExit(f"job: WRONG result at iteration {i}, element {bad}")


def main() -> int:
    mode, seconds = sys.argv[1], float(sys.argv[2])
    dev = Device()
    keep = os.urandom(KEEP)
    bk = dev.buffer(KEEP)
    bk.write(keep)
    made = dev.run([rec(Opcode.MEM_ALLOC, n, 0) for n in (KEEP, 4 * N, 4 * N)]).check()
    hk, hx, hy = (made.value(k) for k in range(3))
    dev.run(
        [
            rec(Opcode.COPY_H2D, hk, bk.resource_id, 0, 0, KEEP),
            rec(Opcode.MEMSET, hy, 0, 0, 4 * N),
        ]
    ).check()
    bx, by = dev.buffer(4 * N), dev.buffer(4 * N)
    acc = [0.0] * N
    t0 = time.monotonic()
    last, gap, i = t0, 0.0, 0
    while time.monotonic() - t0 < seconds:
        i += 1
        try:
            step(dev, i, hx, hy, bx, by, acc)
        except VgpuError as exc:
            if mode == "lost" and exc.code == ErrorCode.DEVICE_LOST:
                since = time.monotonic() - last
                say(f"DEVICE_LOST at iteration {i}, {since:.3f} s after the last good one")
                return reopen()
            say(f"ERROR at iteration {i}: {exc}")
            return 1
        now = time.monotonic()
        gap, last = max(gap, now - last), now
        say(f"iter {i}")
    bk.write(bytes(KEEP))
    dev.run([rec(Opcode.COPY_D2H, hk, bk.resource_id, 0, 0, KEEP)]).check()
    same = hashlib.sha256(bk.read(0, KEEP)).digest() == hashlib.sha256(keep).digest()
    kept = "intact" if same else "CHANGED"
    say(f"done {i} iterations, longest gap {gap * 1e3:.1f} ms, kept buffer {kept}")
    return 0 if same else 1


def reopen() -> int:
    """After DEVICE_LOST: a new context, tried until the vGPU serves again."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with Device() as dev:
                made = dev.run([rec(Opcode.MEM_ALLOC, 4 * N, 0)] * 2).check()
                dev.run([rec(Opcode.MEMSET, made.value(1), 0, 0, 4 * N)]).check()
                bx, by = dev.buffer(4 * N), dev.buffer(4 * N)
                step(dev, 1, made.value(0), made.value(1), bx, by, [0.0] * N)
                say("new context works")
                return 0
        except VgpuError as exc:
            say(f"not yet: {exc.code.name}")
            time.sleep(0.5)
    return 1


if __name__ == "__main__":
    sys.exit(main())
