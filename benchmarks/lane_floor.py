"""Lane floor: how fast a per-batch path in C could make the vGPU round trip.

Not product code: it measures the plan in docs/ARCHITECTURE.md "Next: the
per-batch path in C" before it is built. A C loop (``lane_floor.c``, in a
process of its own, built here with cffi) serves the control ring the way the
backend would with no Python per batch: kick eventfd -> pop and gather the
chain (the backend's vq.c) -> strip SIGNAL -> COMMAND frame on an agent
session -> response and used-ring notification -> COMPLETION -> fence word.
It leaves out the batch and resource checks, the reply buffer and the
bookkeeping, sub-µs work in C, so it is a floor, not a forecast.

The guest side is vgpu_path's (encode NOP + SIGNAL, SUBMIT_3D into guest RAM,
an indirect chain on the control ring, kick, spin on the fence word); the
baseline is vgpu_path's too: a TunnelClient NOP round trip on the same agent,
interleaved. Same placements as vgpu_path part a (one_cpu, shared_host and
spread on 2 CPUs; spread with 3+).

    .venv/bin/python benchmarks/lane_floor.py [--quick] [--json]

Needs gcc and the Python headers (setup installs them for the native module).
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
import vgpu_path as vp
from cffi import FFI

from vpcie._native import native
from vpcie.memory import GuestMemory, word_view
from vpcie.protocol import virtio_gpu as wire
from vpcie.protocol.batch import encode_batch, rec
from vpcie.protocol.codes import FRAME_MAGIC, PROTOCOL_VERSION, FrameType, Opcode
from vpcie.testing.guest_driver import hdr
from vpcie.tunnel import TunnelClient
from vpcie.virtqueue import DriverQueue, GuestAllocator, VirtQueue
from vpcie.virtqueue.native_walker import NativeWalker

HERE = Path(__file__).resolve().parent
NATIVE_DIR = HERE.parent / "vpcie" / "_native"
QUEUE_SIZE = 256
CDEF = """
long lane_floor_run(uintptr_t ring_p, uintptr_t regs_p, uint32_t nregs, int kick_fd,
                    int call_fd, int sock, uintptr_t fence_p, uint32_t session,
                    uint32_t magic, uint32_t version, uint32_t cmd_type, uint32_t comp_type,
                    uint64_t seq);
"""


def build(tmp: str) -> Any:
    """Compile lane_floor.c (which includes the backend's vq.c) into ``tmp``."""
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "_lane_floor",
        '#include "lane_floor.c"',
        include_dirs=[str(HERE), str(NATIVE_DIR)],
        extra_compile_args=["-O2", "-std=gnu11"],
    )
    ffi.compile(tmpdir=tmp, verbose=False)
    sys.path.insert(0, tmp)
    import _lane_floor  # type: ignore[import-not-found]

    return _lane_floor.lib


class Guest:
    """Guest RAM (memfd, shared with the forked loop), the control ring's
    driver side, and the fence word the loop publishes on."""

    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous([(0, 16 << 20)])
        rings = GuestAllocator(self.mem, 0x1000, 1 << 20)
        self.heap = GuestAllocator(self.mem, 1 << 20, 15 << 20)
        self.drv = DriverQueue(self.mem, QUEUE_SIZE, rings, event_idx=True)
        self.vq = VirtQueue(
            self.mem, QUEUE_SIZE, self.drv.desc_gpa, self.drv.avail_gpa, self.drv.used_gpa,
            event_idx=True,
        )  # fmt: skip
        self.req_gpa = self.heap.alloc(4096, 4096)
        self.resp_gpa = self.heap.alloc(4096, 4096)
        fence_gpa = self.heap.alloc(4096, 4096)
        self.fence_view = self.mem.view(fence_gpa, 8)
        self.fence = word_view(self.fence_view, "Q")
        self.kick_fd = os.eventfd(0)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.seq = 0
        self._templates: dict[tuple[Any, ...], vp.SubmitTemplate] = {}

    def pointers(self) -> tuple[int, int, int, int]:
        """ring, region table, region count, fence word: addresses the forked
        loop uses (the mappings are shared, the pointers inherited)."""
        ffi, _ = native()
        ring = self.vq._ring
        if ring is None:
            raise SystemExit("lane_floor: needs the native virtqueue (build vpcie._native)")
        regs = NativeWalker.regions(self.mem)
        fence = ffi.from_buffer(self.fence_view, require_writable=True)
        self._keep = fence
        return (
            int(ffi.cast("uintptr_t", ring.r)),
            int(ffi.cast("uintptr_t", regs.table)),
            int(regs.n),
            int(ffi.cast("uintptr_t", fence)),
        )

    def submit(self, records: list[Any]) -> int:
        """SUBMIT_3D of ``records`` + SIGNAL as vgpu_path's guest does; its seq."""
        self.seq += 1
        template = self._templates.get(tuple(records))
        if template is None:
            template = self._templates[tuple(records)] = vp.SubmitTemplate(records, 1, 1, 0)
        req = template.request(self.seq, self.seq)
        self.mem.write(self.req_gpa, req)
        self.drv.add(
            readable=[(self.req_gpa, len(req))], writable=[(self.resp_gpa, 24)], indirect=True
        )
        if self.drv.kick():
            os.eventfd_write(self.kick_fd, 1)
        return self.seq

    def spin(self, n: int) -> list[float]:
        """``n`` NOP + SIGNAL round trips (µs) after n/10 warm-up ones."""
        nop = [rec(Opcode.NOP, stream=1)]
        out = []
        for i in range(n + n // 10):
            t0 = time.perf_counter_ns()
            seq = self.submit(nop)
            deadline = time.monotonic() + vp.OP_TIMEOUT
            while self.fence[0] < seq:
                if time.monotonic() > deadline:
                    raise SystemExit(f"lane_floor: fence never reached {seq}")
                os.sched_yield()
            if i >= n // 10:
                out.append((time.perf_counter_ns() - t0) / 1000)
            self.drv.get_used()  # untimed, as vgpu_path's wait_used
        return out

    def stop(self) -> None:
        """An empty batch ends the loop."""
        empty = encode_batch([])
        req = hdr(wire.Cmd.SUBMIT_3D, ctx_id=1) + struct.pack("<II", len(empty), 0) + empty
        self.mem.write(self.req_gpa, req)
        self.drv.add(
            readable=[(self.req_gpa, len(req))], writable=[(self.resp_gpa, 24)], indirect=True
        )
        self.drv.kick()
        os.eventfd_write(self.kick_fd, 1)


async def detach(client: TunnelClient) -> int:
    """The client's session socket, for the loop: its own reading and pings
    stop (the loop's COMMANDs keep the agent's side alive)."""
    if client._timer is not None:
        client._timer.cancel()
    transport = client._transport
    assert transport is not None
    transport.pause_reading()
    fd = os.dup(transport.get_extra_info("socket").fileno())
    os.set_blocking(fd, True)
    return fd


async def run(quick: bool, tmp: str) -> dict[str, Any]:
    lib = build(tmp)
    n = 1000 if quick else 5000
    rounds = 2 if quick else 4
    out: dict[str, Any] = {"placements": {}}
    with vp.processes() as procs:
        port, _ = vp.start_agent(procs)
        agent = procs.started[-1].pid
        direct = await TunnelClient.connect("127.0.0.1", port, psk=vp.PSK, name="floor-direct")
        lane = await TunnelClient.connect("127.0.0.1", port, psk=vp.PSK, name="floor-lane")
        await asyncio.sleep(vp.SETTLE_S)  # as vgpu_path: the new workers settle first
        guest = Guest()
        ring, regs, nregs, fence = guest.pointers()
        sock = await detach(lane)
        pid = os.fork()
        if pid == 0:  # the loop: C only from here on
            rc = lib.lane_floor_run(
                ring, regs, nregs, guest.kick_fd, guest.call_fd, sock, fence, lane.session,
                FRAME_MAGIC, PROTOCOL_VERSION, int(FrameType.COMMAND),
                int(FrameType.COMPLETION), lane._seq,
            )  # fmt: skip
            os._exit(0 if rc >= 0 else 100 + min(-rc, 100))
        everywhere = os.sched_getaffinity(0)
        try:
            placements, judged = vp.part_a_placements()
            out["judged_placement"] = judged
            for name, cpus in placements:
                vp.place(cpus, pid, agent, everywhere)
                out["placements"][name] = [sorted(c) for c in cpus] if cpus is not None else None
                floor: list[float] = []
                rtt: list[float] = []
                for _ in range(rounds):
                    rtt += await vp.timed(n // rounds, direct.send_nop)
                    floor += guest.spin(n // rounds)
                sfx = "" if name == judged else f"_{name}"
                for key in {sfx, f"_{name}"}:
                    out[f"floor_rtt{key}_p50_us"] = common.percentile(floor, 50)
                    out[f"direct_rtt{key}_p50_us"] = common.percentile(rtt, 50)
                    out[f"ratio{key}"] = common.percentile(floor, 50) / common.percentile(rtt, 50)
        finally:
            vp.place(None, pid, agent, everywhere)
            guest.stop()
            _, status = os.waitpid(pid, 0)
            await direct.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"lane_floor: the C loop failed ({status:#x})")
    out["floor_meets_1_3x"] = out["ratio"] <= 1.3
    return out


def main() -> int:
    args = common.parser((__doc__ or "").split("\n")[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="lane-floor-") as tmp:
        res = asyncio.run(run(args.quick, tmp))
    res["quick"] = args.quick
    res["machine"] = m = common.machine()
    common.say("lane_floor benchmark (a C per-batch loop, not product code; CPU agent, PSK)")
    common.say(f"machine: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    common.table(
        [
            [f"NOP+SIGNAL p50 (µs), {name}" + (" *" if name == res["judged_placement"] else ""),
             res[f"floor_rtt_{name}_p50_us"], res[f"direct_rtt_{name}_p50_us"],
             res[f"ratio_{name}"]]
            for name in res["placements"]
        ],
        ["measure", "C loop", "TunnelClient", "ratio"],
    )  # fmt: skip
    common.say("* the placement vgpu_path judges its latency target in")
    common.say(
        "the C loop's path: guest kick -> C pop, frame, send -> agent -> C fence word; "
        "baseline: TunnelClient NOP round trip on the same agent"
    )
    if args.json:
        common.emit_json(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
