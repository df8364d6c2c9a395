"""Virtqueue throughput: chains per second through driver + device queues, cffi vs Python.

Guest RAM is a memfd (as QEMU's memory-backend-memfd). The driver side adds a
batch of chains and kicks (not timed); the device side pops, reads the request,
writes a reply and pushes every chain (timed), then the driver collects them.

    .venv/bin/python -m vpcie._native._build      # the cffi module
    .venv/bin/python benchmarks/virtqueue.py [--quick] [--json]

Figures: 16-descriptor chains (one indirect table, as Linux guests send with
INDIRECT_DESC: 15 readable + 1 writable), 1-descriptor chains, and the
per-request cost (pop + read + push, 1-descriptor chain, native path) in µs.
Targets: cffi >= 5x Python on 16-descriptor chains; per request < 10 µs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vpcie._native import native_available
from vpcie.memory import GuestMemory
from vpcie.virtqueue import DriverQueue, GuestAllocator, VirtQueue

NUM = 256
SEG = 64


def run(impl: str, descs: int, seconds: float) -> float:
    """Chains per second of device-side work for ``descs``-descriptor chains."""
    with GuestMemory.anonymous([(0, 64 << 20)]) as mem:
        alloc = GuestAllocator(mem, 0x1000, (64 << 20) - 0x1000)
        drv = DriverQueue(mem, NUM, alloc)
        dev = VirtQueue(mem, NUM, drv.desc_gpa, drv.avail_gpa, drv.used_gpa, impl=impl)  # type: ignore[arg-type]
        readable = [(alloc.alloc(SEG), SEG) for _ in range(max(1, descs - 1))]
        writable = [(alloc.alloc(SEG), SEG)] if descs > 1 else []
        for gpa, n in readable:
            mem.write(gpa, bytes([gpa & 0xFF]) * n)
        reply = b"R" * SEG
        indirect = descs > 1
        done, spent = 0, 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(NUM):
                drv.add(readable, writable, indirect=indirect)
            drv.kick()
            t0 = time.perf_counter()
            pop, push = dev.pop, dev.push
            while (chain := pop()) is not None:
                chain.read_all()
                if chain.write_len:
                    chain.write(reply)
                push(chain.head, chain.write_len)
            dev.needs_notify()
            spent += time.perf_counter() - t0
            done += len(drv.get_used())
        return done / spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args()
    secs = 1.0 if args.quick else 4.0
    if not native_available():
        print("native module not built: python -m vpcie._native._build", file=sys.stderr)
        return 2
    res = {
        "cffi_chains_per_s": run("native", 16, secs),
        "python_chains_per_s": run("python", 16, secs),
        "cffi_1desc_chains_per_s": run("native", 1, secs),
        "python_1desc_chains_per_s": run("python", 1, secs),
    }
    res["ratio"] = res["cffi_chains_per_s"] / res["python_chains_per_s"]
    res["ratio_1desc"] = res["cffi_1desc_chains_per_s"] / res["python_1desc_chains_per_s"]
    res["per_request_us"] = 1e6 / res["cffi_1desc_chains_per_s"]
    res["targets_met"] = res["ratio"] >= 5.0 and res["per_request_us"] < 10.0
    print(
        f"16-descriptor chains (indirect): cffi {res['cffi_chains_per_s']:>10,.0f}/s   "
        f"python {res['python_chains_per_s']:>10,.0f}/s   ratio {res['ratio']:.1f}x (target >= 5x)"
    )
    print(
        f" 1-descriptor chains:            cffi {res['cffi_1desc_chains_per_s']:>10,.0f}/s   "
        f"python {res['python_1desc_chains_per_s']:>10,.0f}/s   ratio {res['ratio_1desc']:.1f}x"
    )
    print(f"per request (pop + read + push, native): {res['per_request_us']:.2f} µs (target < 10)")
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
