"""The whole vGPU path on a real GPU: guest driver model -> virtio-gpu device
-> tunnel -> vpcie-agent with the CuPy executor (cuBLAS GEMM) -> guest pages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_agent
from tests.integration.test_vgpu_device import alloc, rig
from vpcie.errors import ErrorCode
from vpcie.gpu.capset import decode_capset
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import DType, ExecutorKind, Opcode

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16])
async def test_gemm_through_the_vgpu_on_cuda(tmp_path: Path, dtype: DType) -> None:
    agent = start_agent(tmp_path / "agent", "--executor", "cuda")
    try:
        async with rig(tmp_path) as r:
            assert (await r.bind(agent))["ok"]
            caps = decode_capset(await r.gpu.get_capset())
            assert caps[1] == ExecutorKind.CUDA, caps
            ctx = await r.gpu.open("python3.11")
            npd = np.float32 if dtype == DType.F32 else np.float16
            m, k, n = 256, 192, 128
            rng = np.random.default_rng(11)
            a = rng.standard_normal((m, k)).astype(npd)
            b = rng.standard_normal((k, n)).astype(npd)
            isz = np.dtype(npd).itemsize
            bo_a = await ctx.create_bo(a.nbytes, scatter=True)
            bo_b = await ctx.create_bo(b.nbytes, scatter=True)
            bo_c = await ctx.create_bo(m * n * isz)
            bo_a.write(a.tobytes())
            bo_b.write(b.tobytes())
            ha, hb, hc = await alloc(ctx, a.nbytes, b.nbytes, m * n * isz)
            reply = await ctx.run(
                [
                    rec(Opcode.COPY_H2D, ha, bo_a.resource_id, 0, 0, a.nbytes),
                    rec(Opcode.COPY_H2D, hb, bo_b.resource_id, 0, 0, b.nbytes),
                    rec(Opcode.GEMM, dtype, 0, 0, m, n, k, 1.0, 0.0, ha, hb, hc, 0, 0, 0),
                    rec(Opcode.COPY_D2H, hc, bo_c.resource_id, 0, 0, m * n * isz),
                ]
            )
            assert reply.status == ErrorCode.OK, reply
            c = np.frombuffer(bo_c.read(), dtype=npd).reshape(m, n).astype(np.float32)
            ref = a.astype(np.float32) @ b.astype(np.float32)
            tol = 1e-3 if dtype == DType.F32 else 0.25
            np.testing.assert_allclose(c, ref, rtol=tol, atol=tol)
    finally:
        agent.stop()
