"""``vpcie demo``: the whole data path on one machine.

Default: a real QEMU guest (TCG, the image from images/build.sh) whose stock
Linux virtio_gpu driver carries a GEMM and a 1 MiB round trip through
vpcie-backend (its own process, GpuDevice) and the tunnel to a vpcie-agent
(child process, CPU executor, PSK on loopback); the guest program
(guest_tools/demo.py) checks the results itself and the host reads its
verdict from the serial console.

``--tunnel``: only this process -> TunnelClient -> agent, checked against NumPy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
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


# -- the guest demo ---------------------------------------------------------------
@dataclass
class GuestDemoReport:
    size: int = 0
    executor: str = ""
    exit_code: int | None = None
    seconds: float = 0.0
    guest: list[str] = field(default_factory=list)  # the guest program's lines
    verified: bool = False


def start_guest_backend(workdir: Path, agent: LocalAgent) -> tuple[subprocess.Popen[bytes], str]:
    """vpcie-backend bound to ``agent`` (its PSK in a 0600 file)."""
    from vpcie.testing.guestvm import start_backend

    assert agent.psk is not None
    psk_file = workdir / "backend.psk"
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(agent.psk)
    return start_backend(
        workdir, "--bind", f"{agent.host}:{agent.port}", "--psk-file", str(psk_file)
    )


async def guest_demo(n: int, timeout: float, echo: bool) -> GuestDemoReport:
    from vpcie.testing.guestvm import GUEST_TOOLS, image_dir, run_guest, stop_backend

    image_dir()  # a clear error before anything starts
    report = GuestDemoReport(size=n)
    with tempfile.TemporaryDirectory(prefix="vpcie-demo-") as tmp:
        workdir = Path(tmp)
        agent = start_agent(workdir)
        backend: subprocess.Popen[bytes] | None = None
        try:
            backend, sock = start_guest_backend(workdir, agent)

            def show(line: str) -> None:
                if line.startswith("vpcie-guest:") and echo:
                    print(f"  {line}", flush=True)

            run = await run_guest(sock, f"{GUEST_TOOLS}/demo.py", [str(n)], timeout=timeout,
                                  on_line=show)  # fmt: skip
        finally:
            if backend is not None:
                stop_backend(backend)
            agent.stop()
    report.exit_code, report.seconds, report.guest = run.exit_code, run.seconds, run.guest_lines()
    report.verified = run.exit_code == 0 and any(" demo ok" in g for g in report.guest)
    if not report.verified:
        why = "timed out" if run.timed_out else f"guest program exit {run.exit_code}"
        tail = "\n".join(run.lines[-25:])
        raise VgpuError(ErrorCode.INTERNAL, f"guest demo failed ({why}); console tail:\n{tail}")
    return report


def run(args: argparse.Namespace) -> int:
    if args.size is None:
        args.size = 256 if args.tunnel else 32  # the guest checks in pure Python: keep it small
    if not 1 <= args.size <= 4096:
        from vpcie.errors import ConfigError

        raise ConfigError(f"--size {args.size}: use 1..4096")
    if not args.tunnel:
        if not args.json:
            print(
                f"vpcie demo: a QEMU guest (TCG) runs a {args.size}x{args.size} fp32 GEMM "
                "and a 1 MiB round trip on its vGPU",
                flush=True,
            )
            print("  guest -> virtio_gpu -> vpcie-backend -> tunnel (PSK, loopback) -> "
                  "vpcie-agent (CPU executor: NOT a GPU)", flush=True)  # fmt: skip
        guest = asyncio.run(guest_demo(args.size, args.timeout, echo=not args.json))
        if args.json:
            print(json.dumps(asdict(guest), sort_keys=True))
        else:
            print(f"  verified by the guest; VM boot to power-off in {guest.seconds:.1f} s")
        return 0
    report = asyncio.run(demo(args.size))
    if args.json:
        print(json.dumps(asdict(report), sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0
