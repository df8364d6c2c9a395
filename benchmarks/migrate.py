"""Live migration benchmark: the stun a guest sees when its vGPU moves.

One run, on loopback (docs/BENCHMARKS.md "migrate"): two ``vpcie-agent``
subprocesses (CPU executor, PSK), a ``vpcie-backend`` subprocess bound to the
first, and in this process the harness playing QEMU + the guest driver
(VhostUserFrontend + GuestGpu). The guest's context holds STATE_MiB of
device memory (random contents) and runs a workload: a MEMSET batch after
batch, two outstanding, each completion's time taken from the fence page. The
workload's dirty set is one 4 KiB scratch buffer; with ``--dirty-all`` each
batch rewrites a whole 32 MiB piece of the state in turn (all of it,
continuously: the case pre-copy cannot help, reported separately). Then
``migrate`` on the control socket, ROUNDS times (there and back).

Per round:
  stun_ms        guest-side: last batch done before the migration -> first
                 batch done after it (the longest gap between completions)
  report_stun_ms the backend's own (hold start -> release), copy_ms within it
  state_MiB      what moved; precopy_MiB of it copied while the guest ran
                 (precopy_ms, in ``rounds`` rounds), stun_MiB during the hold
and once per run copy_MBps: the tunnel's own one-way copy rate (a
TunnelClient in this process, COPY_H2D and COPY_D2H of 64 MiB on the first
agent, the slower of the two, best of 3), the rate a migration's pipeline
(D2H from the source overlapping H2D to the target) can at best reach when
source, backend and target are on hosts of their own; and relay_MBps, the
same copy as a migration's (64 MiB, 4 MiB pieces, 8 in flight, agent ->
this process -> agent) without the backend: on one machine the three
processes share its CPUs, and this is the ceiling there.

Target: stun_ms <= 100 ms + state / (0.8 x copy_MBps).

    .venv/bin/python benchmarks/migrate.py [--quick] [--dirty-all] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit_json, machine, median, parser, say, table
from _procs import Procs, free_port, processes

from vpcie.control.client import control_request
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode
from vpcie.testing.frontend import VhostUserFrontend
from vpcie.testing.guest_driver import FrontendTransport, GuestContext, GuestGpu
from vpcie.tunnel import TunnelClient

PSK = b"bench-migrate-0123456789abcdef"
PIECE = 32 << 20  # device buffers of this size make up the state
GUEST_RAM = 128 << 20
START_TIMEOUT = 30.0
COPY_SIZE = 64 << 20


def wait_listening(procs: Procs, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{procs.log(name)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"{name} does not listen on {port}:\n{procs.log(name)}")


def start_agent(procs: Procs, name: str, psk_file: Path) -> str:
    port = free_port()
    proc = procs.spawn(
        name,
        [
            sys.executable, "-m", "host_agent.main", "serve", "--listen", f"127.0.0.1:{port}",
            "--psk-file", str(psk_file), "--executor", "cpu", "--name", name,
        ],
    )  # fmt: skip
    wait_listening(procs, name, proc, port)
    return f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def guest(sock: str) -> AsyncIterator[GuestGpu]:
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise SystemExit(f"no backend socket at {sock}")
        await asyncio.sleep(0.05)
    async with VhostUserFrontend.connect(sock, mem_size=GUEST_RAM) as fe:
        gpu = GuestGpu(FrontendTransport(fe), fe.mem, fe.alloc)
        await gpu.load()
        yield gpu


async def fill(ctx: GuestContext, state: int) -> tuple[list[int], list[bytes]]:
    """STATE bytes of device memory in PIECE buffers, random contents."""
    rng = np.random.default_rng(11)
    bo = await ctx.create_bo(PIECE)
    handles, digests = [], []
    for off in range(0, state, PIECE):
        n = min(PIECE, state - off)
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        bo.write(data)
        h = (await ctx.run([rec(Opcode.MEM_ALLOC, n, 0)])).value(0)
        reply = await ctx.run([rec(Opcode.COPY_H2D, h, bo.resource_id, 0, 0, n)], timeout=60)
        if reply.status != ErrorCode.OK:
            raise SystemExit(f"migrate: filling the state failed: {reply}")
        handles.append(h)
        digests.append(hashlib.sha256(data).digest())
    await ctx.close_bo(bo)
    return handles, digests


async def verify(ctx: GuestContext, handles: list[int], digests: list[bytes], state: int) -> None:
    bo = await ctx.create_bo(PIECE)
    for k, (h, digest) in enumerate(zip(handles, digests, strict=True)):
        n = min(PIECE, state - k * PIECE)
        reply = await ctx.run([rec(Opcode.COPY_D2H, h, bo.resource_id, 0, 0, n)], timeout=60)
        if reply.status != ErrorCode.OK or hashlib.sha256(bo.read(0, n)).digest() != digest:
            raise SystemExit(f"migrate: device memory differs after the migration ({reply})")
    await ctx.close_bo(bo)


@dataclass
class Workload:
    """MEMSET batches, two outstanding, each on the next of ``targets``
    (handle, bytes): the scratch buffer, or every piece of the state."""

    ctx: GuestContext
    targets: list[tuple[int, int]]
    times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: bool = False

    async def run(self) -> None:
        outstanding: list[int] = []
        turn = itertools.cycle(self.targets)
        while not self.stop or outstanding:
            if not self.stop and len(outstanding) < 2:
                h, n = next(turn)
                outstanding.append(await self.ctx.start([rec(Opcode.MEMSET, h, 1, 0, n)]))
                continue
            seq = outstanding.pop(0)
            reply = await self.ctx.wait(0, seq, timeout=120)
            self.times.append(time.perf_counter())
            if reply.status != ErrorCode.OK:
                self.errors.append(f"{reply.status.name} {reply.message}")

    def gap_ms(self, t0: float, t1: float) -> float:
        """Last completion before ``t0`` -> first after ``t1``, the longest
        gap between completions that spans the migration."""
        ts = self.times
        before = max((t for t in ts if t <= t0), default=t0)
        after = min((t for t in ts if t >= t1), default=t1)
        inner = [before, *[t for t in ts if before < t < after], after]
        return max(b - a for a, b in itertools.pairwise(inner)) * 1e3


async def tunnel_copy_MBps(address: str, psk: bytes, reps: int) -> dict[str, float]:
    host, port = address.rsplit(":", 1)
    data = np.random.default_rng(3).integers(0, 256, COPY_SIZE, dtype=np.uint8)
    out = np.zeros(COPY_SIZE, np.uint8)
    best = {"h2d": 0.0, "d2h": 0.0}
    async with await TunnelClient.connect(host, int(port), psk=psk, name="bench-copy") as c:
        h = await c.alloc(COPY_SIZE)
        for _ in range(reps):
            t0 = time.perf_counter()
            await c.copy_h2d(h, 0, data)
            t1 = time.perf_counter()
            await c.copy_d2h(h, 0, out)
            t2 = time.perf_counter()
            best["h2d"] = max(best["h2d"], COPY_SIZE / (t1 - t0) / 1e6)
            best["d2h"] = max(best["d2h"], COPY_SIZE / (t2 - t1) / 1e6)
        await c.free(h)
    if not np.array_equal(data, out):
        raise SystemExit("migrate: the tunnel copy read back different bytes")
    return best


async def relay_MBps(agents: list[str], psk: bytes, reps: int) -> float:
    """COPY_SIZE read from one agent and written to the other by this
    process, 4 MiB pieces, 8 in flight: the copy a migration does, without
    the backend around it (a machine's ceiling for the three processes)."""
    piece, depth = 4 << 20, 8
    (h0, p0), (h1, p1) = (a.rsplit(":", 1) for a in agents)
    best = 0.0
    async with (
        await TunnelClient.connect(h0, int(p0), psk=psk, name="bench-relay-src") as src,
        await TunnelClient.connect(h1, int(p1), psk=psk, name="bench-relay-dst") as dst,
    ):
        hs, hd = await src.alloc(COPY_SIZE), await dst.alloc(COPY_SIZE)
        bufs = [np.zeros(piece, np.uint8) for _ in range(depth)]
        gate = asyncio.Semaphore(depth)

        async def one(off: int) -> None:
            async with gate:
                buf = bufs.pop()
                await src.copy_d2h(hs, off, buf)
                await dst.copy_h2d(hd, off, buf)
                bufs.append(buf)

        for _ in range(reps):
            t0 = time.perf_counter()
            await asyncio.gather(*(one(off) for off in range(0, COPY_SIZE, piece)))
            best = max(best, COPY_SIZE / (time.perf_counter() - t0) / 1e6)
        await src.free(hs)
        await dst.free(hd)
    return best


async def run(quick: bool, dirty_all: bool = False) -> dict[str, Any]:
    state = (32 if quick else 256) << 20
    rounds = 3
    with processes("vpcie-migrate-") as procs:
        psk_file = procs.tmp / "psk"
        psk_file.write_bytes(PSK)
        psk_file.chmod(0o600)
        agents = [start_agent(procs, f"agent{k}", psk_file) for k in range(2)]
        sock = str(procs.tmp / "vgpu.sock")
        procs.spawn(
            "backend",
            [
                sys.executable, "-m", "vpcie.backend_main", "--socket-path", sock,
                "--bind", agents[0], "--psk-file", str(psk_file),
            ],
        )  # fmt: skip
        copy = await tunnel_copy_MBps(agents[0], PSK, 1 if quick else 3)
        copy_MBps = min(copy.values())
        relay = await relay_MBps(agents, PSK, 1 if quick else 3)
        results = []
        async with guest(sock) as gpu:
            ctx = await gpu.open("bench")
            handles, digests = await fill(ctx, state)
            scratch = (await ctx.run([rec(Opcode.MEM_ALLOC, 4096, 0)])).value(0)
            pieces = [(h, min(PIECE, state - k * PIECE)) for k, h in enumerate(handles)]
            targets = pieces if dirty_all else [(scratch, 4096)]
            w = Workload(ctx, targets)
            task = asyncio.create_task(w.run())
            try:
                for r in range(rounds):
                    to = agents[(r + 1) % 2]
                    await asyncio.sleep(0.3)  # the workload runs a while before
                    t0 = time.perf_counter()
                    rep = await control_request(
                        sock + ".ctl",
                        {"op": "migrate", "agent": to, "psk_file": str(psk_file)},
                        timeout=600,
                    )
                    t1 = time.perf_counter()
                    if not rep.get("ok"):
                        raise SystemExit(f"migrate: refused: {rep.get('error')}")
                    await asyncio.sleep(0.3)  # and after
                    results.append(
                        {
                            "to": to,
                            "stun_ms": w.gap_ms(t0, t1),
                            "report_stun_ms": rep["stun_ms"],
                            "copy_ms": rep["copy_ms"],
                            "control_ms": (t1 - t0) * 1e3,
                            "state_MiB": rep["state_bytes"] / (1 << 20),
                            "precopy_MiB": rep["precopy_bytes"] / (1 << 20),
                            "precopy_ms": rep["precopy_ms"],
                            "stun_MiB": rep["stun_bytes"] / (1 << 20),
                            "precopy_rounds": rep["rounds"],
                        }
                    )
            finally:
                w.stop = True
                await asyncio.wait_for(task, 120)
            if w.errors:
                raise SystemExit(f"migrate: the workload saw errors: {w.errors[:3]}")
            if not dirty_all:  # (--dirty-all rewrote the state: nothing to compare)
                await verify(ctx, handles, digests, state)
    state_mib = state / (1 << 20)
    target_ms = 100 + state / 1e6 / (0.8 * copy_MBps) * 1e3
    stuns = [x["stun_ms"] for x in results]
    return {
        "state_MiB": state_mib,
        "copy_MBps": copy_MBps,
        "tunnel_h2d_MBps": copy["h2d"],
        "tunnel_d2h_MBps": copy["d2h"],
        "relay_MBps": relay,
        "dirty_all": dirty_all,
        "dirty_set_bytes": sum(n for _h, n in targets),
        # The stun's copy rate (what it moved / its copy time) and the pre-copy's.
        "migrate_copy_MBps": [
            x["stun_MiB"] * (1 << 20) / 1e3 / x["copy_ms"] for x in results if x["stun_MiB"] > 1
        ],
        "precopy_MBps": [
            x["precopy_MiB"] * (1 << 20) / 1e3 / x["precopy_ms"] for x in results if x["precopy_ms"]
        ],
        "rounds": results,
        "stun_ms_median": median(stuns),
        "stun_ms_min": min(stuns),
        "stun_ms_max": max(stuns),
        "target_stun_ms": target_ms,
        "meets_target": max(stuns) <= target_ms,
        "batches": len(w.times),
        "machine": machine(),
    }


def main() -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--dirty-all", action="store_true", help="the workload rewrites all its memory continuously"
    )
    args = ap.parse_args()
    result = asyncio.run(run(args.quick, args.dirty_all))
    say(
        f"state {result['state_MiB']:.0f} MiB; tunnel copy {result['tunnel_h2d_MBps']:.0f} MB/s "
        f"H2D, {result['tunnel_d2h_MBps']:.0f} MB/s D2H (copy_MBps = the slower); "
        f"relay agent -> this process -> agent {result['relay_MBps']:.0f} MB/s; "
        f"the workload's dirty set {result['dirty_set_bytes'] / (1 << 20):.3f} MiB"
        + (" (--dirty-all: all of it, continuously)" if result["dirty_all"] else "")
    )
    table(
        [
            [
                r["to"], r["stun_ms"], r["report_stun_ms"], r["copy_ms"], r["stun_MiB"],
                r["state_MiB"], r["precopy_MiB"], r["precopy_ms"], r["precopy_rounds"],
            ]
            for r in result["rounds"]
        ],
        [
            "migrate to", "stun ms (guest)", "stun ms (backend)", "stun copy ms", "stun MiB",
            "state MiB", "pre-copied MiB", "pre-copy ms", "rounds",
        ],
    )  # fmt: skip
    say(
        "pre-copy MB/s: " + ", ".join(f"{x:.0f}" for x in result["precopy_MBps"])
        + "; stun copy MB/s: "
        + (", ".join(f"{x:.0f}" for x in result["migrate_copy_MBps"]) or "- (under 1 MiB)")
    )  # fmt: skip
    say(
        f"stun {result['stun_ms_min']:.0f} / {result['stun_ms_median']:.0f} / "
        f"{result['stun_ms_max']:.0f} ms (min/median/max); target <= "
        f"{result['target_stun_ms']:.0f} ms: {'met' if result['meets_target'] else 'NOT met'}"
    )
    if args.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
