"""A vGPU bound again while its guest programs run: the guest driver harness
-> the backend (Python path and lane) -> real ``vpcie-agent`` processes.

What is shown: a device handle kept across unbind + bind, or across
``bind --replace``, gets STALE_HANDLE (never the buffer a later binding
happens to number the same); a bind of a bound vGPU is refused unless asked
to replace it, and the refusal changes nothing; replacing ends the old work
with DEVICE_LOST; an agent killed under an idle session shows as lost, with
the reason, in ``vpcie vgpu status`` (JSON and table).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentProc
from tests.integration.test_vgpu_device import Rig, alloc, rig
from tests.integration.test_vgpu_lane import lent
from vpcie._native import native_available
from vpcie.cli.vgpu import _human
from vpcie.control.client import control_request
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode
from vpcie.testing.guest_driver import GuestContext

pytestmark = pytest.mark.timeout(90)

PATHS = [
    pytest.param(False, id="python"),
    pytest.param(
        True,
        id="lane",
        marks=pytest.mark.skipif(not native_available(), reason="the lane is native code"),
    ),
]


def lane_submits(r: Rig) -> int:
    return int(r.device.status().get("lane_submits", 0))


async def ready(r: Rig, ctx: GuestContext, lane: bool) -> None:
    """The context's next copy-free batch goes by ``lane`` (lent) or Python."""
    if lane:
        await lent(r, ctx)
    else:
        assert not r.device.lanes.enabled


async def check_stale(r: Rig, ctx: GuestContext, old: int, lane: bool) -> None:
    """``old`` (a handle of an earlier binding) is refused precisely while a
    new allocation, whatever number it got, works; on the path asked for."""
    (new,) = await alloc(ctx, 4096)
    assert new != old
    await ready(r, ctx, lane)
    before = lane_submits(r)
    # MEMSET is copy-free: the lane sends it when the session is lent.
    reply = await ctx.run([rec(Opcode.MEMSET, old, 0x5A, 0, 4096)])
    assert reply.status == ErrorCode.STALE_HANDLE, reply
    assert f"handle {old} belongs to an earlier binding of this vGPU" in reply.message
    if lane:
        assert lane_submits(r) == before + 1  # the lane sent it; the error came back
    reply = await ctx.run([rec(Opcode.MEM_FREE, old)])
    assert reply.status == ErrorCode.STALE_HANDLE, reply
    assert (await ctx.run([rec(Opcode.MEMSET, new, 0x5A, 0, 4096)])).status == ErrorCode.OK


@pytest.mark.parametrize("lane", PATHS)
async def test_handle_kept_across_unbind_and_bind_is_stale(
    tmp_path: Path, agent: AgentProc, lane: bool
) -> None:
    async with rig(tmp_path, lane=lane) as r:
        assert (await r.bind(agent))["ok"]
        ctx = await r.gpu.open()
        (old,) = await alloc(ctx, 4096)
        await ready(r, ctx, lane)
        assert (await ctx.run([rec(Opcode.MEMSET, old, 1, 0, 4096)])).status == ErrorCode.OK
        assert (await r.unbind())["ok"]
        assert (await r.bind(agent))["ok"]  # the same agent: a new session numbers afresh
        await check_stale(r, ctx, old, lane)
        # A third binding: handles of both earlier ones are stale.
        (second,) = await alloc(ctx, 64)
        assert (await r.unbind())["ok"]
        assert (await r.bind(agent))["ok"]
        for h in (old, second):
            reply = await ctx.run([rec(Opcode.MEM_FREE, h)])
            assert reply.status == ErrorCode.STALE_HANDLE, (h, reply)
        # A new context starts over: its handles are its own session's.
        fresh = await r.gpu.open("fresh")
        (h,) = await alloc(fresh, 64)
        assert h == 1
        status = await control_request(r.control, {"op": "status"})
        epochs = {c["name"]: c["handle_epoch"] for c in status["contexts"]}  # type: ignore[attr-defined]
        assert epochs == {"python3.11": 2, "fresh": 0}


@pytest.mark.parametrize("lane", PATHS)
async def test_bind_of_a_bound_vgpu_is_refused_unless_replace(
    tmp_path: Path, agent_factory: Any, lane: bool
) -> None:
    first, second = agent_factory(), agent_factory()
    async with rig(tmp_path, lane=lane) as r:
        assert (await r.bind(first))["ok"]
        ctx = await r.gpu.open()
        (old,) = await alloc(ctx, 4096)
        await ready(r, ctx, lane)
        # Work in flight on the first agent: stream 1 waits on an event.
        held = await ctx.start(
            [rec(Opcode.EVENT_WAIT, 5, stream=1), rec(Opcode.NOP, stream=1)], stream=1
        )
        gen = r.device.binding.generation
        refused = await r.bind(second)
        assert not refused["ok"]
        assert f"already bound to 127.0.0.1:{first.port}" in str(refused["error"])
        assert "--replace" in str(refused["error"])
        # Nothing changed: same binding, the held batch still runs, the handle works.
        status = await control_request(r.control, {"op": "status"})
        assert str(status["target"]).startswith(f"127.0.0.1:{first.port} ")
        assert r.device.binding.generation == gen
        assert ctx.fence_slot(1)[0] < held
        assert (await ctx.run([rec(Opcode.EVENT_RECORD, 5)])).status == ErrorCode.OK
        assert (await ctx.wait(1, held, timeout=5)).status == ErrorCode.OK
        assert (await ctx.run([rec(Opcode.MEMSET, old, 2, 0, 4096)])).status == ErrorCode.OK
        # Replace: the work in flight ends with DEVICE_LOST, old handles are stale.
        held = await ctx.start(
            [rec(Opcode.EVENT_WAIT, 6, stream=1), rec(Opcode.NOP, stream=1)], stream=1
        )
        t0 = time.monotonic()
        replaced = await r.bind(second, replace=True)
        assert replaced["ok"] and str(replaced["replaced"]).startswith(f"127.0.0.1:{first.port}")
        reply = await ctx.wait(1, held, timeout=2.0)
        assert reply.status == ErrorCode.DEVICE_LOST
        assert "bound to another GPU" in reply.message
        assert time.monotonic() - t0 < 2.0
        status = await control_request(r.control, {"op": "status"})
        assert str(status["target"]).startswith(f"127.0.0.1:{second.port} ")
        await check_stale(r, ctx, old, lane)
        # replace must be a JSON boolean: a string is refused, nothing bound anew.
        bad = await r.bind(first, replace="yes")
        assert not bad["ok"] and "replace must be true or false" in str(bad["error"])
        assert r.device.binding.target is not None
        assert r.device.binding.target.port == second.port


async def wait_lost(r: Rig, timeout: float = 5.0) -> dict[str, Any]:
    """Poll the control socket's status until the one context shows lost."""
    deadline = time.monotonic() + timeout
    while True:
        status = await control_request(r.control, {"op": "status"})
        (c,) = status["contexts"]  # type: ignore[misc]
        if c["lost"]:
            return status
        assert time.monotonic() < deadline, f"session never shown lost: {status}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("lane", PATHS)
async def test_status_shows_a_killed_agents_session_lost(
    tmp_path: Path, agent_factory: Any, lane: bool
) -> None:
    first = agent_factory()
    async with rig(tmp_path, lane=lane) as r:
        assert (await r.bind(first))["ok"]
        ctx = await r.gpu.open()
        await alloc(ctx, 64)
        await ready(r, ctx, lane)
        status = await control_request(r.control, {"op": "status"})
        assert status["contexts"][0]["session"] is True  # type: ignore[index]
        first.kill()  # nothing of the context is in flight
        status = await wait_lost(r)
        (c,) = status["contexts"]  # type: ignore[misc]
        assert c["session"] is False and c["lent"] is False
        assert f"127.0.0.1:{first.port}" in c["lost_reason"]
        shown = _human("status", status)
        assert f"lost: {c['lost_reason']}" in shown and " open" not in shown
        # As the design has it: the context's work fails until a rebind...
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.DEVICE_LOST
        # ...which opens it a new session (replace: the dead agent is still bound).
        second = agent_factory()
        assert (await r.bind(second, replace=True))["ok"]
        assert (await ctx.run([rec(Opcode.NOP)])).status == ErrorCode.OK
        status = await control_request(r.control, {"op": "status"})
        (c,) = status["contexts"]  # type: ignore[misc]
        assert not c["lost"] and c["lost_reason"] == "" and c["session"] is True
