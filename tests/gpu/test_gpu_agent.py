"""The agent serving a real GPU (--executor cuda) over real TCP."""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

from host_agent.testclient import AgentProcess, RawClient
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import DType, Opcode

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, bytes]]:
    d = tmp_path_factory.mktemp("gpuagent")
    psk = os.urandom(16).hex().encode()
    (d / "psk").write_bytes(psk)
    os.chmod(d / "psk", 0o600)
    a = AgentProcess(
        d, "--psk-file", str(d / "psk"), "--executor", "cuda", "--mem-quota", str(1 << 30)
    )
    yield a, psk
    a.stop()
    print(a.log_text())


def test_agent_serves_gpu(agent: tuple[AgentProcess, bytes]) -> None:
    a, psk = agent
    c = RawClient(a.port, psk=psk)
    info = c.connect()
    assert info["executor"] == 2 and info["mem_quota"] == 1 << 30, info
    (sess,) = a.wait_sessions()
    assert sess["env"]["CUDA_VISIBLE_DEVICES"] == sess["device"] == info["uuid"]
    assert sess["device"].startswith(("GPU-", "MIG-"))
    size = (8 << 20) + 5
    r = c.call([rec(Opcode.MEM_ALLOC, size, 0)])
    h = r.results[0]
    data = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    assert c.call([rec(Opcode.COPY_H2D, h, 0, 0, 0, size)], data).status == 0
    back = c.call([rec(Opcode.COPY_D2H, h, 0, 0, 0, size)])
    dt = time.perf_counter() - t0
    assert back.status == 0 and zlib.crc32(back.data) == zlib.crc32(data)
    print(f"8 MiB H2D+D2H over loopback through a GPU: {2 * size / dt / 1e6:.0f} MB/s")
    # GEMM fp16 in one batch with its inputs, D2H of the result.
    m = n = k = 64
    rng = np.random.default_rng(6)
    A = rng.standard_normal((m, k)).astype(np.float16)
    B = rng.standard_normal((k, n)).astype(np.float16)
    ha, hb, hc = (
        c.call([rec(Opcode.MEM_ALLOC, x, 0)]).results[0] for x in (A.nbytes, B.nbytes, m * n * 2)
    )
    r = c.call(
        [
            rec(Opcode.COPY_H2D, ha, 0, 0, 0, A.nbytes),
            rec(Opcode.COPY_H2D, hb, 0, 0, 0, B.nbytes),
            rec(Opcode.GEMM, DType.F16, 0, 0, m, n, k, 1.0, 0.0, ha, hb, hc, 0, 0, 0),
            rec(Opcode.COPY_D2H, hc, 0, 0, 0, m * n * 2),
        ],
        A.tobytes() + B.tobytes(),
    )
    assert r.status == 0, r.message
    got = np.frombuffer(r.data, np.float16).reshape(m, n).astype(np.float32)
    assert np.allclose(got, A.astype(np.float32) @ B.astype(np.float32), rtol=2e-2, atol=0.1)
    r = c.call([rec(Opcode.REDUCE_SUM, DType.F16, hc, 0, m * n, 0, 0)])
    assert r.status == 0
    total = struct.unpack("<d", struct.pack("<Q", r.results[0]))[0]
    assert total == pytest.approx(float(got.sum()), rel=2e-2, abs=1.0)
    assert c.call([rec(Opcode.MEM_ALLOC, 2 << 30, 0)]).status == ErrorCode.QUOTA_EXCEEDED
    t0 = time.perf_counter()
    for _ in range(200):
        c.call([rec(Opcode.NOP)])
    print(f"null command round trip: {(time.perf_counter() - t0) / 200 * 1e6:.0f} us")
    assert c.close() is not None
