"""The guest half of ``vpcie demo``: runs inside the QEMU guest.

Through the stock Linux virtio_gpu driver and the vGPU: a fp32 GEMM whose
result is checked against a pure-Python reference, and a 1 MiB round trip
(guest buffer -> remote memory -> another guest buffer) checked by SHA-256.
Every line it prints starts with ``vpcie-guest:``; the last one is
``vpcie-guest: demo ok`` or the error. Exit status 0 only when all checks hold.

    python3 -m guest_tools.demo [N]
"""

from __future__ import annotations

import array
import hashlib
import sys
import time

from guest_tools.vgpu import Device
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import DType, Opcode


def say(line: str) -> None:
    print(f"vpcie-guest: {line}", flush=True)


def matrix(n: int, seed: int) -> array.array[float]:
    """Deterministic values in [-1, 1) (a small LCG: no NumPy in the guest)."""
    out = array.array("f", bytes(4 * n * n))
    x = seed
    for i in range(n * n):
        x = (x * 1103515245 + 12345) & 0x7FFF_FFFF
        out[i] = x / 0x4000_0000 - 1.0
    return out


def reference_gemm(a: array.array[float], b: array.array[float], n: int) -> list[float]:
    c = [0.0] * (n * n)
    for i in range(n):
        row = a[i * n : (i + 1) * n]
        for j in range(n):
            c[i * n + j] = sum(row[k] * b[k * n + j] for k in range(n))
    return c


def gemm(dev: Device, n: int) -> float:
    """C = A @ B on the vGPU; returns the largest difference to the reference."""
    nbytes = 4 * n * n
    a, b = matrix(n, 7), matrix(n, 11)
    bufs = [dev.buffer(nbytes) for _ in range(3)]
    bufs[0].write(a.tobytes())
    bufs[1].write(b.tobytes())
    alloc = dev.run([rec(Opcode.MEM_ALLOC, nbytes, 0) for _ in range(3)]).check()
    ha, hb, hc = (alloc.value(i) for i in range(3))
    t0 = time.monotonic()
    dev.run(
        [
            rec(Opcode.COPY_H2D, ha, bufs[0].resource_id, 0, 0, nbytes),
            rec(Opcode.COPY_H2D, hb, bufs[1].resource_id, 0, 0, nbytes),
            rec(Opcode.GEMM, DType.F32, 0, 0, n, n, n, 1.0, 0.0, ha, hb, hc, 0, 0, 0),
            rec(Opcode.COPY_D2H, hc, bufs[2].resource_id, 0, 0, nbytes),
        ]
    ).check()
    ms = (time.monotonic() - t0) * 1e3
    c = array.array("f", bufs[2].read(0, nbytes))
    want = reference_gemm(a, b, n)
    err = max(abs(x - y) for x, y in zip(c, want, strict=True))
    say(f"GEMM {n}x{n} fp32: copies in + GEMM + copy out in {ms:.1f} ms, max abs error {err:.2e}")
    dev.run([rec(Opcode.MEM_FREE, h) for h in (ha, hb, hc)]).check()
    for buf in bufs:
        buf.close()
    return err


def round_trip(dev: Device, size: int) -> bool:
    src, dst = dev.buffer(size), dev.buffer(size)
    data = hashlib.shake_256(b"vpcie").digest(size)
    src.write(data)
    h = dev.run([rec(Opcode.MEM_ALLOC, size, 0)]).check().value(0)
    t0 = time.monotonic()
    dev.run(
        [
            rec(Opcode.COPY_H2D, h, src.resource_id, 0, 0, size),
            rec(Opcode.COPY_D2H, h, dst.resource_id, 0, 0, size),
        ]
    ).check()
    ms = (time.monotonic() - t0) * 1e3
    same = hashlib.sha256(dst.read()).digest() == hashlib.sha256(data).digest()
    say(f"{size >> 10} KiB out and back in {ms:.1f} ms, sha256 {'matches' if same else 'DIFFERS'}")
    dev.run([rec(Opcode.MEM_FREE, h)]).check()
    src.close()
    dst.close()
    return same


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 32
    t0 = time.monotonic()
    try:
        with Device() as dev:
            say(f"capset at driver load: {dev.info.describe()}")
            t1 = time.monotonic()
            info = dev.query()
            say(f"vGPU: {info.describe()}; first batch {(time.monotonic() - t1) * 1e3:.1f} ms")
            rtts = []
            for _ in range(21):
                t1 = time.monotonic()
                dev.run([rec(Opcode.NOP)]).check()
                rtts.append(time.monotonic() - t1)
            say(f"NOP round trip p50 {sorted(rtts)[10] * 1e6:.0f} µs (guest clock, TCG)")
            err = gemm(dev, n)
            same = round_trip(dev, 1 << 20)
    except Exception as exc:  # the host reads the verdict from the console
        say(f"demo FAILED: {type(exc).__name__}: {exc}")
        return 1
    if err > 1e-3 * n or not same:
        say("demo FAILED: wrong results")
        return 1
    say(f"demo ok in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
