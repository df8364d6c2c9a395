"""Tunnel benchmark: TunnelClient against a real vpcie-agent on loopback.

Measures, in one run, each next to its baseline (docs/BENCHMARKS.md):

* NOP round trip p50/p99 vs a raw TCP echo: a minimal Python server
  subprocess (blocking socket, recv_into the 52-byte request, sendall the
  40-byte reply: the sizes of a NOP COMMAND and its COMPLETION) driven by the
  same asyncio BufferedProtocol client style, one request in flight.
* pipelined NOPs per second, window = the agent's granted max_inflight.
* 64 MiB H2D and D2H throughput vs a raw socket: 64 MiB from this process to
  a receiver subprocess (sendall / recv_into, 1-byte ack), and back.

    .venv/bin/python benchmarks/tunnel.py [--quick] [--json] [--uvloop] [--pin-cpu N]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import _common as common
import numpy as np

from vpcie.protocol.batch import encode_batch
from vpcie.protocol.codes import FrameType
from vpcie.protocol.frames import encode_completion, encode_frame
from vpcie.tunnel import TunnelClient
from vpcie.tunnel import commands as cmds
from vpcie.tunnel.local_agent import LocalAgent

MiB = 1 << 20
REQ = len(encode_frame(FrameType.COMMAND, encode_batch([cmds.nop()])))
REP = len(encode_frame(FrameType.COMPLETION, encode_completion(0)))

# The baseline peer: echo (``echo REQ REP``), sink (``sink N``: recv N bytes,
# ack 1 byte) or source (``source N``: wait for 1 byte, send N bytes).
BASELINE_SERVER = r"""
import socket, sys
mode, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(max(a, b, 1)); view = memoryview(buf)
def fill(n):
    got = 0
    while got < n:
        k = c.recv_into(view[got:n])
        if not k:
            sys.exit(0)
        got += k
while True:
    if mode == "echo":
        fill(a); c.sendall(view[:b])
    elif mode == "sink":
        fill(a); c.sendall(b"k")
    else:
        fill(1); c.sendall(view[:a])
"""


def start_baseline(mode: str, a: int, b: int = 0) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE_SERVER, mode, str(a), str(b)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


class _EchoClient(asyncio.BufferedProtocol):
    """The same client style as TunnelClient: BufferedProtocol + futures."""

    def __init__(self, reply: int) -> None:
        self.buf = bytearray(64 * 1024)
        self.reply = reply
        self.got = 0
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got >= self.reply and self.waiter is not None:
            self.got -= self.reply
            self.waiter.set_result(None)
            self.waiter = None


async def raw_rtt(n: int) -> list[float]:
    proc, port = start_baseline("echo", REQ, REP)
    loop = asyncio.get_running_loop()
    try:
        _t, proto = await loop.create_connection(lambda: _EchoClient(REP), "127.0.0.1", port)
        assert proto.transport is not None
        request = bytes(REQ)
        samples = []
        for i in range(n + n // 10):
            t0 = time.perf_counter_ns()
            proto.waiter = loop.create_future()
            proto.transport.write(request)
            await proto.waiter
            if i >= n // 10:  # warm-up excluded
                samples.append((time.perf_counter_ns() - t0) / 1000)
        proto.transport.close()
        return samples
    finally:
        proc.kill()
        proc.wait()


def raw_throughput(size: int, reps: int) -> float:
    """MB/s of ``size`` bytes between two processes, each direction, best of reps."""
    best = 0.0
    data = memoryview(bytearray(b"\x01") * size)
    for mode in ("sink", "source"):
        proc, port = start_baseline(mode, size)
        try:
            s = socket.create_connection(("127.0.0.1", port))
            for _ in range(reps):
                t0 = time.perf_counter()
                if mode == "sink":
                    s.sendall(data)
                    s.recv(1)
                else:
                    s.sendall(b"g")
                    got = 0
                    while got < size:
                        k = s.recv_into(data[got:])
                        assert k
                        got += k
                best = max(best, size / (time.perf_counter() - t0) / 1e6)
            s.close()
        finally:
            proc.kill()
            proc.wait()
    return best


async def tunnel_rtt(c: TunnelClient, n: int) -> list[float]:
    samples = []
    for i in range(n + n // 10):
        t0 = time.perf_counter_ns()
        await c.send_nop()
        if i >= n // 10:
            samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


async def pipelined(c: TunnelClient, total: int) -> float:
    """NOPs/s keeping ``max_inflight`` commands in flight."""
    window = c.max_inflight or 256
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    state = {"sent": 0, "done": 0}

    def on_done(f: asyncio.Future[Any]) -> None:
        state["done"] += 1
        if state["sent"] < total:
            state["sent"] += 1
            c.send_nop().add_done_callback(on_done)
        elif state["done"] == total and not finished.done():
            finished.set_result(None)

    t0 = time.perf_counter()
    for _ in range(min(window, total)):
        state["sent"] += 1
        c.send_nop().add_done_callback(on_done)
    await finished
    return total / (time.perf_counter() - t0)


async def bulk(c: TunnelClient, size: int, reps: int) -> tuple[float, float]:
    """Best (H2D, D2H) MB/s of ``size`` bytes, data checked once."""
    src = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    dst = np.zeros(size, np.uint8)
    h = await c.alloc(size)
    h2d = d2h = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        await c.copy_h2d(h, 0, src)
        h2d = max(h2d, size / (time.perf_counter() - t0) / 1e6)
        t0 = time.perf_counter()
        await c.copy_d2h(h, 0, dst)
        d2h = max(d2h, size / (time.perf_counter() - t0) / 1e6)
    if not np.array_equal(src, dst):
        raise SystemExit("tunnel benchmark: D2H bytes differ from H2D bytes")
    await c.free(h)
    return h2d, d2h


async def run(quick: bool, executor: str = "cpu") -> dict[str, Any]:
    n_rtt = 2000 if quick else 20000
    n_pipe = 20000 if quick else 200000
    reps = 2 if quick else 5
    out: dict[str, Any] = {}
    raw = await raw_rtt(n_rtt)
    with tempfile.TemporaryDirectory() as tmp, LocalAgent(Path(tmp), executor=executor) as agent:
        assert agent.psk is not None
        c = await TunnelClient.connect(agent.host, agent.port, psk=agent.psk, name="bench")
        try:
            rtt = await tunnel_rtt(c, n_rtt)
            out["small_cmds_per_s"] = await pipelined(c, n_pipe)
            out["window"] = c.max_inflight
            out["h2d_MBps"], out["d2h_MBps"] = await bulk(c, 64 * MiB, reps)
        finally:
            await c.close()
    out["raw_MBps"] = raw_throughput(64 * MiB, reps)
    out["rtt_p50_us"] = common.percentile(rtt, 50)
    out["rtt_p99_us"] = common.percentile(rtt, 99)
    out["raw_rtt_p50_us"] = common.percentile(raw, 50)
    out["raw_rtt_p99_us"] = common.percentile(raw, 99)
    out["rtt_p50_ratio"] = out["rtt_p50_us"] / out["raw_rtt_p50_us"]
    out["rtt_p99_ratio"] = out["rtt_p99_us"] / out["raw_rtt_p99_us"]
    out["h2d_ratio"] = out["h2d_MBps"] / out["raw_MBps"]
    out["d2h_ratio"] = out["d2h_MBps"] / out["raw_MBps"]
    return out


def main() -> int:
    ap = common.parser(__doc__.split("\n")[0])
    ap.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    ap.add_argument(
        "--pin-cpu",
        type=int,
        metavar="CPU",
        help="pin this process, the agent and the baseline servers to one CPU "
        "(round trips on a small VM depend on whether both ends share a vCPU)",
    )
    ap.add_argument(
        "--executor", choices=("cpu", "cuda"), default="cpu", help="the agent's executor"
    )
    args = ap.parse_args()
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # children inherit it
    if args.uvloop:
        import uvloop

        uvloop.install()
    res = asyncio.run(run(args.quick, args.executor))
    res["executor"] = args.executor
    res["loop"] = "uvloop" if args.uvloop else "asyncio"
    res["quick"] = args.quick
    res["pinned_cpu"] = args.pin_cpu
    res["machine"] = common.machine()
    m = res["machine"]
    pin = f", all pinned to CPU {args.pin_cpu}" if args.pin_cpu is not None else ""
    ex = "CPU-executor" if args.executor == "cpu" else "CUDA-executor"
    common.say(f"tunnel benchmark ({res['loop']} client, {ex} agent on loopback, PSK{pin})")
    common.say(f"machine: {m['nproc']} x {m['cpu']}, kernel {m['kernel']}, Python {m['python']}")
    common.table(
        [
            ["NOP round trip p50 (µs)", res["rtt_p50_us"], res["raw_rtt_p50_us"],
             res["rtt_p50_ratio"], "<= 2x"],
            ["NOP round trip p99 (µs)", res["rtt_p99_us"], res["raw_rtt_p99_us"],
             res["rtt_p99_ratio"], ""],
            [f"pipelined NOPs/s (window {res['window']})", res["small_cmds_per_s"], "-", "-",
             ">= 50000"],
            ["64 MiB H2D (MB/s)", res["h2d_MBps"], res["raw_MBps"], res["h2d_ratio"], ">= 0.8x"],
            ["64 MiB D2H (MB/s)", res["d2h_MBps"], res["raw_MBps"], res["d2h_ratio"], ">= 0.8x"],
        ],
        ["measure", "tunnel", "baseline", "ratio", "target"],
    )  # fmt: skip
    common.say(
        f"baselines: RTT = raw TCP echo of {REQ} -> {REP} bytes by a blocking Python server "
        "subprocess, same asyncio client; MB/s = 64 MiB sendall/recv_into between two "
        "processes (best direction)"
    )
    if args.json:
        common.emit_json(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
