"""Session state for live migration on real agents (CPU executor, real TCP):
STATE_EXPORT on one agent, ALLOC_AT + SESSION_RESTORE on another, contents
moved with COPY_D2H / COPY_H2D (docs/PROTOCOL.md "Session state")."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import HANDLE_EPOCH_SHIFT, MAX_EVENTS, Opcode
from vpcie.protocol.frames import decode_payload

QUOTA = 64 << 20
EPOCH = 3


def _agent(d: Path) -> tuple[AgentProcess, bytes]:
    psk = os.urandom(16).hex().encode()
    (d / "psk").write_bytes(psk)
    os.chmod(d / "psk", 0o600)
    a = AgentProcess(d, "--psk-file", str(d / "psk"), "--executor", "cpu",
                     "--mem-quota", str(QUOTA), "--event-wait-timeout", "1")  # fmt: skip
    return a, psk


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[AgentProcess, bytes]]]:
    pair = [_agent(tmp_path_factory.mktemp(f"agent{i}")) for i in range(2)]
    yield pair
    for a, _ in pair:
        a.stop()


def _open(agent: tuple[AgentProcess, bytes], epoch: int = EPOCH) -> RawClient:
    a, psk = agent
    c = RawClient(a.port, psk=psk)
    c.connect(handle_epoch=epoch)
    return c


def _ok(c: RawClient, *records: object, data: bytes = b"") -> tuple[dict[int, int], bytes, bytes]:
    r = c.call(list(records), data)  # type: ignore[arg-type]
    assert r.status == 0, (ErrorCode(r.status).name, r.message)
    return r.results, r.blob, r.data


def _summary(blob: bytes) -> dict[str, object]:
    epoch, nxt, used, events, _nb, bufs, _nm, mods = decode_payload("STATE_SUMMARY", blob)
    return {"epoch": epoch, "next": nxt, "used": used, "events": events,
            "buffers": [b[:2] for b in bufs], "modules": mods}  # fmt: skip


def test_export_restore_across_agents(agents: list[tuple[AgentProcess, bytes]]) -> None:
    src, dst = _open(agents[0]), _open(agents[1])
    try:
        sizes = [4096, 1, 3 << 20, 12345]
        handles = [_ok(src, rec(Opcode.MEM_ALLOC, n, 0))[0][0] for n in sizes]
        _ok(src, rec(Opcode.MEM_FREE, handles.pop(1)))  # a hole: handles stay sparse
        sizes.pop(1)
        contents = [os.urandom(n) for n in sizes]
        for h, blob in zip(handles, contents, strict=True):
            _ok(src, rec(Opcode.COPY_H2D, h, 0, 0, 0, len(blob)), data=blob)
        _ok(src, rec(Opcode.EVENT_RECORD, 5, stream=1), rec(Opcode.EVENT_RECORD, 4095, stream=2))

        _results, blob, _ = _ok(src, rec(Opcode.STATE_EXPORT))
        s = _summary(blob)
        assert s["epoch"] == EPOCH and all(h >> HANDLE_EPOCH_SHIFT == EPOCH for h in handles)
        assert s["buffers"] == sorted(zip(handles, sizes, strict=True))
        assert s["used"] == sum(sizes) and s["modules"] == []
        events = s["events"]
        assert isinstance(events, bytes) and len(events) == MAX_EVENTS // 8
        assert events[0] == 1 << 5 and events[-1] == 0x80 and not any(events[1:-1])

        # the target: same epoch, exactly these handles, then the counter and events
        for h, n in s["buffers"]:  # type: ignore[attr-defined]
            assert _ok(dst, rec(Opcode.ALLOC_AT, h, n, 0))[0] == {0: h}
        _ok(dst, rec(Opcode.SESSION_RESTORE, s["next"], events))
        for h, blob_in in zip(handles, contents, strict=True):
            moved = _ok(src, rec(Opcode.COPY_D2H, h, 0, 0, 0, len(blob_in)))[2]
            _ok(dst, rec(Opcode.COPY_H2D, h, 0, 0, 0, len(moved)), data=moved)
        for h, blob_in in zip(handles, contents, strict=True):
            assert _ok(dst, rec(Opcode.COPY_D2H, h, 0, 0, 0, len(blob_in)))[2] == blob_in

        # events restored as recorded-and-complete: waits pass at once (1 s timeout otherwise)
        _ok(dst, rec(Opcode.EVENT_WAIT, 5, stream=3), rec(Opcode.EVENT_WAIT, 4095, stream=3))
        r = dst.call([rec(Opcode.EVENT_WAIT, 6, stream=3)])
        assert r.status == ErrorCode.TIMEOUT
        # the counter moved with the session: the next handle is the one the source gives
        nxt_src = _ok(src, rec(Opcode.MEM_ALLOC, 64, 0))[0][0]
        nxt_dst = _ok(dst, rec(Opcode.MEM_ALLOC, 64, 0))[0][0]
        assert nxt_src == nxt_dst == (EPOCH << HANDLE_EPOCH_SHIFT) | s["next"]  # type: ignore[operator]
        assert _summary(_ok(dst, rec(Opcode.STATE_EXPORT))[1])["used"] == sum(sizes) + 64
    finally:
        src.close()
        dst.close()


def test_alloc_at_refusals(agents: list[tuple[AgentProcess, bytes]]) -> None:
    c = _open(agents[0])
    try:
        mine = (EPOCH << HANDLE_EPOCH_SHIFT) | 7
        bad = {
            "foreign epoch": ((EPOCH + 1) << HANDLE_EPOCH_SHIFT) | 7,
            "older epoch": ((EPOCH - 1) << HANDLE_EPOCH_SHIFT) | 7,
            "index zero": EPOCH << HANDLE_EPOCH_SHIFT,
        }
        for what, h in bad.items():
            r = c.call([rec(Opcode.ALLOC_AT, h, 16, 0)])
            assert r.status == ErrorCode.INVALID_HANDLE and r.failed_index == 0, what
        assert _ok(c, rec(Opcode.ALLOC_AT, mine, 16, 0))[0] == {0: mine}
        r = c.call([rec(Opcode.ALLOC_AT, mine, 16, 0)])
        assert r.status == ErrorCode.INVALID_HANDLE and "live" in r.message
        r = c.call([rec(Opcode.ALLOC_AT, mine + 1, QUOTA, 0)])  # 16 bytes already used
        assert r.status == ErrorCode.QUOTA_EXCEEDED
        # a MEM_ALLOC after ALLOC_AT never hands out the same number
        h = _ok(c, rec(Opcode.MEM_ALLOC, 16, 0))[0][0]
        assert h != mine and h >> HANDLE_EPOCH_SHIFT == EPOCH
        # modules: the CPU executor runs no kernels, MODULE_EXPORT of a non-module is refused
        r = c.call([rec(Opcode.MODULE_LOAD_AT, mine + 2, 3, "k", b"x")])
        assert r.status == ErrorCode.NOT_SUPPORTED
        r = c.call([rec(Opcode.MODULE_EXPORT, mine)])
        assert r.status == ErrorCode.INVALID_HANDLE
        # SESSION_RESTORE checks its fields before it changes anything
        r = c.call([rec(Opcode.SESSION_RESTORE, 0, b"")])
        assert r.status == ErrorCode.INVALID_ARGUMENT
        r = c.call([rec(Opcode.SESSION_RESTORE, 9, bytes(MAX_EVENTS // 8 + 1))])
        assert r.status == ErrorCode.INVALID_ARGUMENT
    finally:
        c.close()


async def test_tunnel_client_moves_a_session(agents: list[tuple[AgentProcess, bytes]]) -> None:
    """The backend's calls (TunnelClient.state_export ... session_restore)."""
    from vpcie.tunnel import TunnelClient

    (a, psk_a), (b, psk_b) = agents
    src = await TunnelClient.connect("127.0.0.1", a.port, psk=psk_a, handle_epoch=EPOCH)
    dst = await TunnelClient.connect("127.0.0.1", b.port, psk=psk_b, handle_epoch=EPOCH)
    try:
        hs = [await src.alloc(n) for n in (100, 5000)]
        blobs = [os.urandom(100), os.urandom(5000)]
        for h, blob in zip(hs, blobs, strict=True):
            await src.copy_h2d(h, 0, blob)
        await src.send([rec(Opcode.EVENT_RECORD, 42)])
        s = await src.state_export()
        assert s.handle_epoch == EPOCH and s.buffers == tuple(zip(hs, (100, 5000), strict=True))
        assert s.state_bytes == 5100 and s.modules == () and s.mem_used == 5100
        for h, n in s.buffers:
            assert await dst.alloc_at(h, n) == h
            moved = bytearray(n)
            await src.copy_d2h(h, 0, moved)
            await dst.copy_h2d(h, 0, moved)
        await dst.session_restore(s.next_index, s.events_set)
        (await dst.send([rec(Opcode.EVENT_WAIT, 42)])).check()
        for h, blob in zip(hs, blobs, strict=True):
            back = bytearray(len(blob))
            await dst.copy_d2h(h, 0, back)
            assert back == blob
        assert await dst.alloc(8) == await src.alloc(8)  # the counter moved too
        with pytest.raises(VgpuError) as err:
            await dst.alloc_at(hs[0], 8)  # live
        assert err.value.code is ErrorCode.INVALID_HANDLE
        with pytest.raises(VgpuError) as err:
            await dst.module_export(hs[0])
        assert err.value.code is ErrorCode.INVALID_HANDLE
    finally:
        await src.close()
        await dst.close()
