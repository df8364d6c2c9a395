"""``vpcie demo``: the whole data path on one machine, checked against NumPy.

Today the path is: this process -> TunnelClient -> TCP (PSK, loopback) ->
vpcie-agent (child process, CPU executor). The steps are separate functions
so a later version can put a QEMU guest and vpcie-backend in front of the
tunnel (``start_agent`` stays, ``run_workload`` then runs in the guest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import ExecutorKind
from vpcie.tunnel import TunnelClient
from vpcie.tunnel.local_agent import LocalAgent


@dataclass
class DemoReport:
    executor: str = ""
    executor_kind: str = ""
    device: str = ""
    agent: str = ""
    size: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    max_abs_error: float = 0.0
    verified: bool = False

    def lines(self) -> list[str]:
        t = self.timings_ms
        mb = 2 * self.size * self.size * 4 / 1e6
        gflop = 2 * self.size**3 / 1e9
        return [
            f"vpcie demo: {self.size}x{self.size} fp32 GEMM through the tunnel",
            f"  executor : {self.executor}",
            f"  device   : {self.device} (agent {self.agent!r}, loopback, PSK)",
            f"  agent up : {t['agent_start']:.0f} ms   session open: {t['connect']:.1f} ms",
            f"  copy in  : {t['h2d']:.2f} ms ({mb / max(t['h2d'], 1e-6) * 1e3:.0f} MB/s)",
            f"  GEMM     : {t['gemm']:.2f} ms ({gflop / max(t['gemm'], 1e-6) * 1e3:.2f} GFLOP/s)",
            f"  copy out : {t['d2h']:.2f} ms   NOP round trip: {t['nop_rtt'] * 1e3:.0f} µs",
            f"  result   : matches NumPy (max abs error {self.max_abs_error:.2e})",
        ]


def start_agent(workdir: Path) -> LocalAgent:
    return LocalAgent(workdir, executor="cpu").start()


def describe_executor(kind: ExecutorKind) -> str:
    if kind is ExecutorKind.CPU:
        return "CPU executor (NumPy on the agent's CPU) - this is NOT a GPU"
    if kind is ExecutorKind.CUDA:
        return "CUDA executor (CuPy on an NVIDIA GPU)"
    return "no executor bound"


async def run_workload(client: TunnelClient, n: int, report: DemoReport) -> None:
    """Allocate, copy two matrices in, GEMM, copy back, verify against NumPy."""
    rng = np.random.default_rng(2024)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    t = report.timings_ms
    t0 = time.perf_counter()
    await client.nop()
    t["nop_rtt"] = (time.perf_counter() - t0) * 1e3
    ha, hb, hc = [await client.alloc(a.nbytes) for _ in range(3)]
    t0 = time.perf_counter()
    await asyncio.gather(client.copy_h2d(ha, 0, a), client.copy_h2d(hb, 0, b))
    t["h2d"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    await client.gemm(ha, hb, hc, n, n, n)
    t["gemm"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    await client.copy_d2h(hc, 0, out)
    t["d2h"] = (time.perf_counter() - t0) * 1e3
    for h in (ha, hb, hc):
        await client.free(h)
    want = a.astype(np.float64) @ b.astype(np.float64)
    report.max_abs_error = float(np.max(np.abs(out - want)))
    tol = 1e-3 * max(1.0, float(np.max(np.abs(want))))
    if not report.max_abs_error <= tol:
        raise VgpuError(
            ErrorCode.INTERNAL,
            f"GEMM result differs from NumPy by {report.max_abs_error:.3g} (tolerance {tol:.3g})",
        )
    report.verified = True


async def demo(n: int) -> DemoReport:
    report = DemoReport(size=n)
    with tempfile.TemporaryDirectory(prefix="vpcie-demo-") as tmp:
        t0 = time.perf_counter()
        agent = start_agent(Path(tmp))
        try:
            report.timings_ms["agent_start"] = (time.perf_counter() - t0) * 1e3
            assert agent.psk is not None
            t0 = time.perf_counter()
            async with await TunnelClient.connect(
                agent.host, agent.port, psk=agent.psk, name="vpcie-demo"
            ) as client:
                report.timings_ms["connect"] = (time.perf_counter() - t0) * 1e3
                info = client.info
                report.executor_kind = info.executor.name
                report.executor = describe_executor(info.executor)
                report.device = info.name
                report.agent = info.agent
                await run_workload(client, n, report)
        finally:
            agent.stop()
    return report


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.size <= 4096:
        from vpcie.errors import ConfigError

        raise ConfigError(f"--size {args.size}: use 1..4096")
    report = asyncio.run(demo(args.size))
    if args.json:
        print(json.dumps(asdict(report), sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0
