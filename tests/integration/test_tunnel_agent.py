"""TunnelClient end to end against the real ``vpcie-agent`` (CPU executor) on loopback.

One PSK agent serves most tests (a worker process per session); the failure
tests start their own agent so they can kill it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vpcie.errors import AuthError, ErrorCode, VgpuError
from vpcie.protocol.codes import ExecutorKind, FrameType
from vpcie.protocol.frames import encode_frame
from vpcie.tunnel import Completion, Runstate, TunnelClient
from vpcie.tunnel import commands as cmds
from vpcie.tunnel.local_agent import LocalAgent

MiB = 1 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    with LocalAgent(
        tmp_path_factory.mktemp("agent"), extra_args=("--event-wait-timeout", "2")
    ) as a:
        yield a


async def connect(agent: LocalAgent, **kw: object) -> TunnelClient:
    assert agent.psk is not None
    return await TunnelClient.connect(agent.host, agent.port, psk=agent.psk, **kw)  # type: ignore[arg-type]


def odd_segments(data: bytes, sizes: list[int]) -> list[memoryview]:
    view, out, pos = memoryview(data), [], 0
    for n in sizes:
        out.append(view[pos : pos + n])
        pos += n
    out.append(view[pos:])
    return out


async def test_info_says_cpu_executor(agent: LocalAgent) -> None:
    async with await connect(agent, name="info") as c:
        assert c.info.executor is ExecutorKind.CPU
        assert "not a GPU" in c.info.name
        q = await c.query()
        assert q.executor is ExecutorKind.CPU and q.max_inflight == c.info.max_inflight


async def test_copies_with_scatter_lists(agent: LocalAgent) -> None:
    size = 9 * MiB + 12345  # several 4 MiB DATA frames
    src = os.urandom(size)
    async with await connect(agent) as c:
        h = await c.alloc(size + 64)
        await c.copy_h2d(h, 64, odd_segments(src, [1, 4095, 4097, 3, MiB + 7, 5 * MiB + 3]))
        dst = [bytearray(n) for n in (7, 65536, 3 * MiB + 1)]
        dst.append(bytearray(size - sum(len(d) for d in dst)))
        await c.copy_d2h(h, 64, dst)
        assert hashlib.sha256(b"".join(dst)).digest() == hashlib.sha256(src).digest()
        # one batch: two H2D records then a D2H of both, one data stream each way
        a, b = os.urandom(1000), os.urandom(3333)
        back = bytearray(4333)
        done = await c.submit(
            [
                cmds.copy_h2d(h, 0, 1000),
                cmds.copy_h2d(h, 1000, 3333, host_offset=1000),
                cmds.copy_d2h(h, 0, 4333),
            ],
            h2d=[a[:10], a[10:], b],
            d2h=[memoryview(back)[:5], memoryview(back)[5:]],
        )
        done.check()
        assert bytes(back) == a + b
        await c.free(h)


async def test_gemm_fp32_matches_numpy(agent: LocalAgent) -> None:
    rng = np.random.default_rng(7)
    m, n, k = 67, 45, 33
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    async with await connect(agent) as c:
        ha, hb, hc = [await c.alloc(x) for x in (a.nbytes, b.nbytes, m * n * 4)]
        await c.copy_h2d(ha, 0, a)
        await c.copy_h2d(hb, 0, b)
        await c.gemm(ha, hb, hc, m, n, k)
        out = np.empty((m, n), np.float32)
        await c.copy_d2h(hc, 0, out)
        np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)
        total = await c.reduce_sum(hc, hc, m * n)
        assert total == pytest.approx(float((a @ b).sum()), rel=1e-3, abs=1e-2)


async def test_memory_quota(agent: LocalAgent) -> None:
    async with await connect(agent, mem_quota=MiB) as c:
        assert c.info.mem_quota == MiB
        h = await c.alloc(MiB // 2)
        with pytest.raises(VgpuError) as err:
            await c.alloc(MiB)
        assert err.value.code is ErrorCode.QUOTA_EXCEEDED
        await c.free(h)
        await c.free(await c.alloc(MiB))  # freed memory is usable again


async def test_inflight_quota_local_and_agent(agent: LocalAgent) -> None:
    async with await connect(agent, max_inflight=4) as c:
        assert c.info.max_inflight == 4 == c.max_inflight
        # EVENT_WAIT on an event nobody recorded holds its stream (agent: --event-wait-timeout 2)
        held = [c.send([cmds.event_wait(99, stream=s)]) for s in (1, 2, 3, 4)]
        t0 = time.monotonic()
        with pytest.raises(VgpuError) as err:
            c.send_nop()
        assert err.value.code is ErrorCode.QUOTA_EXCEEDED
        assert time.monotonic() - t0 < 0.05  # refused at once, no stall
        c.max_inflight = 0  # switch the client's check off: the agent must refuse too
        refused = await asyncio.wait_for(c.send_nop(), 5)
        assert refused.status is ErrorCode.QUOTA_EXCEEDED
        done = await asyncio.wait_for(asyncio.gather(*held), 10)
        assert all(d.status is ErrorCode.TIMEOUT for d in done), done
        assert (await c.nop()).ok


async def test_wrong_psk_is_refused(agent: LocalAgent) -> None:
    with pytest.raises(AuthError):
        await TunnelClient.connect(agent.host, agent.port, psk=b"not-the-key-0123456789")
    async with await connect(agent) as c:  # the agent keeps serving
        assert (await c.nop()).ok


async def test_malformed_frames_close_only_that_connection(agent: LocalAgent) -> None:
    async with await connect(agent) as c:
        assert (await c.nop()).ok
        loop = asyncio.get_running_loop()
        for garbage in (
            b"\x00" * 64,  # bad magic
            encode_frame(FrameType.COMMAND, b"x" * 40),  # COMMAND before HELLO
        ):
            raw = socket.create_connection((agent.host, agent.port))
            raw.setblocking(False)
            await loop.sock_sendall(raw, garbage)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:  # the agent answers ERROR at most, then closes
                chunk = await asyncio.wait_for(loop.sock_recv(raw, 65536), 5)
                if not chunk:
                    break
            else:
                pytest.fail("the agent kept a connection with malformed frames open")
            raw.close()
            assert (await c.nop()).ok  # the other session is unaffected
        assert c.state is Runstate.READY


def _tls_dirs(tmp: Path) -> tuple[Path, Path]:
    import subprocess
    import sys

    good, other = tmp / "fleet", tmp / "other"
    run = [sys.executable, "-m", "host_agent.main", "pki"]
    for d in (good, other):
        subprocess.run([*run, "init", "--dir", str(d)], check=True, capture_output=True)
        subprocess.run(
            [*run, "issue", "--dir", str(d), "--name", "backend", "--client"],
            check=True,
            capture_output=True,
        )
    subprocess.run(
        [*run, "issue", "--dir", str(good), "--name", "agent", "--server"],
        check=True,
        capture_output=True,
    )
    return good, other


def _client_ctx(ca_dir: Path, cert_dir: Path) -> object:
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    ctx.load_cert_chain(str(cert_dir / "backend.crt"), str(cert_dir / "backend.key"))
    return ctx


async def test_mutual_tls(tmp_path: Path) -> None:
    import ssl

    good, other = _tls_dirs(tmp_path)
    with LocalAgent(tmp_path / "run", tls_dir=good) as agent:
        ctx = _client_ctx(good, good)
        assert isinstance(ctx, ssl.SSLContext)
        async with await TunnelClient.connect(agent.host, agent.port, ssl=ctx) as c:
            data = os.urandom(5 * MiB + 3)
            h = await c.alloc(len(data))
            await c.copy_h2d(h, 0, data)
            back = bytearray(len(data))
            await c.copy_d2h(h, 0, back)
            assert back == data
        # a client certificate from another CA is refused
        stranger = _client_ctx(good, other)
        assert isinstance(stranger, ssl.SSLContext)
        with pytest.raises(AuthError):
            await TunnelClient.connect(agent.host, agent.port, ssl=stranger)
        # and the client refuses an agent its CA did not sign
        wrong_ca = _client_ctx(other, other)
        assert isinstance(wrong_ca, ssl.SSLContext)
        with pytest.raises(AuthError):
            await TunnelClient.connect(agent.host, agent.port, ssl=wrong_ca)


async def _assert_all_lost(futs: list[asyncio.Future[Completion]], t0: float) -> None:
    done = await asyncio.wait_for(asyncio.gather(*futs), 5)
    assert time.monotonic() - t0 < 2.0, f"took {time.monotonic() - t0:.2f} s"
    statuses = {d.status for d in done}
    assert statuses <= {ErrorCode.OK, ErrorCode.DEVICE_LOST}, statuses
    assert ErrorCode.DEVICE_LOST in statuses


async def test_agent_killed_mid_stream(tmp_path: Path) -> None:
    with LocalAgent(tmp_path) as agent:
        c = await connect(agent)
        big = np.ones(64 * MiB, np.uint8)
        h = await c.alloc(big.nbytes)
        futs = [c.send([cmds.copy_h2d(h, 0, big.nbytes)], h2d=[big])]
        futs += [c.send_nop() for _ in range(100)]
        futs.append(c.send([cmds.copy_d2h(h, 0, big.nbytes)], d2h=[np.empty_like(big)]))
        # Let the H2D start crossing. What follows needs only that neither
        # copy has finished when the agent dies: checked here, not assumed
        # from the timing (64 MiB does not cross loopback in 5 ms).
        await asyncio.sleep(0.005)
        assert not futs[0].done() and not futs[-1].done()
        agent.kill()
        t0 = time.monotonic()
        await _assert_all_lost(futs, t0)
        assert futs[0].result().status is ErrorCode.DEVICE_LOST
        assert futs[-1].result().status is ErrorCode.DEVICE_LOST
        assert c.state is Runstate.LOST
        with pytest.raises(VgpuError) as err:
            await c.nop()
        assert err.value.code is ErrorCode.DEVICE_LOST
        await c.close()


class BlackHoleProxy:
    """127.0.0.1 TCP proxy that can stop forwarding without closing anything."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.blackhole = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.target)
        self.writers += [w, uw]
        await asyncio.gather(self._pump(r, uw), self._pump(ur, w), return_exceptions=True)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            while self.blackhole:  # hold the bytes; the socket stays open
                await asyncio.sleep(3600)
            w.write(data)
            await w.drain()

    def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        if self.server is not None:
            self.server.close()


async def test_network_black_hole(agent: LocalAgent) -> None:
    proxy = BlackHoleProxy((agent.host, agent.port))
    port = await proxy.start()
    try:
        assert agent.psk is not None
        c = await TunnelClient.connect("127.0.0.1", port, psk=agent.psk)
        h = await c.alloc(4 * MiB)
        assert (await c.nop()).ok
        proxy.blackhole = True
        t0 = time.monotonic()
        futs = [c.send_nop() for _ in range(20)]
        futs.append(c.send([cmds.copy_h2d(h, 0, 4 * MiB)], h2d=[bytes(4 * MiB)]))
        await _assert_all_lost(futs, t0)
        assert all(f.result().status is ErrorCode.DEVICE_LOST for f in futs[:20])
        assert c.state is Runstate.LOST
    finally:
        proxy.close()
