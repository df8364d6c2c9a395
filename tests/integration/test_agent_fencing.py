"""Lease fencing on a real agent (docs/SECURITY.md "Lease fencing"): OPEN with
pool lease tokens and live sets over real TCP; per device the newest lease
wins, sessions whose lease was not live when it was created end, leases that
share a device leave each other alone, and the fences survive a restart with
--fence-file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from host_agent.testclient import AgentProcess, RawClient
from tests.conftest import ROOT, until, wait_for
from tests.integration.agent_helpers import alive
from vpcie.errors import ErrorCode, VgpuError
from vpcie.gpu.binding import AgentTarget, tunnel_session
from vpcie.protocol.batch import rec
from vpcie.protocol.codes import Opcode
from vpcie.tunnel import Runstate, TunnelClient


def _agent(d: Path, fence_file: Path) -> tuple[AgentProcess, bytes]:
    psk_file = d / "psk"
    if not psk_file.exists():
        psk_file.write_bytes(os.urandom(16).hex().encode())
        os.chmod(psk_file, 0o600)
    a = AgentProcess(d, "--psk-file", str(psk_file), "--executor", "cpu",
                     "--fence-file", str(fence_file))  # fmt: skip
    return a, psk_file.read_bytes()


Live = tuple[int, ...] | None  # a lease's live set; None: just its token (exclusive)


def _open(a: AgentProcess, psk: bytes, token: int, live: Live = None) -> tuple[int, str, RawClient]:
    """OPEN cpu0 under lease ``token`` with its live set."""
    c = RawClient(a.port, psk=psk)
    c.hello(), c.auth()
    status, _sid, message, _info = c.open(device="cpu0", lease_token=token, lease_live=live)
    return status, message, c


def _served(a: AgentProcess, psk: bytes, token: int, live: Live = None) -> RawClient:
    status, message, c = _open(a, psk, token, live)
    assert status == ErrorCode.OK, message
    assert c.call([rec(Opcode.NOP)]).status == 0
    return c


def _refused(a: AgentProcess, psk: bytes, token: int, live: Live = None) -> str:
    status, message, c = _open(a, psk, token, live)
    c.sock.close()
    assert status == ErrorCode.STALE_LEASE, (status, message)
    return message


async def test_tokens_on_one_device(tmp_path: Path) -> None:
    fence_file = tmp_path / "fences.json"
    a, psk = _agent(tmp_path, fence_file)
    try:
        manual = _served(a, psk, 0)  # no pool lease, unfenced device: the manual bind path
        # A backend session (TunnelClient) under lease 5: it fences out the manual one.
        held = await TunnelClient.connect("127.0.0.1", a.port, psk=psk, device="cpu0",
                                          lease_token=5, lease_live=(5,))  # fmt: skip
        assert manual.expect_closed() == []  # its worker was terminated: EOF
        second = _served(a, psk, 5)  # the same lease opens one session per guest context
        assert (await held.nop()).ok

        assert _refused(a, psk, 4).endswith(
            "lease token 4 is older than 5, the newest for cpu0: "
            "the lease was given to someone else"
        )
        assert "leased through the pool" in _refused(a, psk, 0)
        sessions = a.wait_sessions(lambda ss: len(ss) == 2)
        assert {s["lease_token"] for s in sessions} == {5}
        assert a.state_json()["fences"] == {"cpu0": {"newest": 5, "live": [5]}}
        pids_5 = {s["pid"] for s in sessions}

        newer = _served(a, psk, 9)  # served, and every session under 5 ends
        assert second.expect_closed() == []
        await until(lambda: held.state is Runstate.LOST, 5, "the fenced backend session lost")
        with pytest.raises(VgpuError) as err:  # its backend sees DEVICE_LOST
            await held.nop()
        assert err.value.code is ErrorCode.DEVICE_LOST
        wait_for(lambda: not any(alive(p) for p in pids_5), 5, "fenced workers gone")
        (only,) = a.wait_sessions(lambda ss: len(ss) == 1)
        assert only["lease_token"] == 9 and only["pid"] not in pids_5
        assert a.log_text().count("fenced_out") == 3  # manual (0), then the two under 5
        assert json.loads(fence_file.read_text()) == {"cpu0": {"newest": 9, "live": [9]}}
        assert newer.call([rec(Opcode.NOP)]).status == 0
        newer.close()
        await held.close()
    finally:
        a.stop()

    # The fences outlive the agent: a restart with the same file refuses 5 at once.
    b, psk = _agent(tmp_path, fence_file)
    try:
        _refused(b, psk, 5)
        assert "leased through the pool" in _refused(b, psk, 0)
        _served(b, psk, 9).close()
        assert b.state_json()["fences"] == {"cpu0": {"newest": 9, "live": [9]}}
    finally:
        b.stop()


async def test_leases_sharing_a_device(tmp_path: Path) -> None:
    """The pool leases cpu0 to A (token 5) and, while A's lease is live, to B
    as well (token 9, live {5, 9}: they share it by memory): both keep
    working. A lease created after both were released (12, live {12}) ends both."""
    fence_file = tmp_path / "fences.json"
    a, psk = _agent(tmp_path, fence_file)
    try:
        va = await TunnelClient.connect(
            "127.0.0.1", a.port, lease_token=5, lease_live=(5,), psk=psk, device="cpu0"
        )
        # B through the backend's session factory: AgentTarget carries the set.
        target = AgentTarget("127.0.0.1", a.port, psk=psk, device="cpu0",
                             lease_token=9, lease_live=(5, 9))  # fmt: skip
        vb = cast(TunnelClient, await tunnel_session(target, "vm-b"))
        # B's OPEN is answered after the agent decided about A: A's worker is not fenced.
        sessions = a.wait_sessions(lambda ss: len(ss) == 2)
        assert {(s["lease_token"], tuple(s["lease_live"]), s["fenced"]) for s in sessions} == {
            (5, (5,), False),
            (9, (5, 9), False),
        }
        assert (await va.nop()).ok and (await vb.nop()).ok
        va2 = _served(a, psk, 5)  # A's other guest context, after B: 5 is in 9's set
        assert (await va.nop()).ok and (await vb.nop()).ok
        assert "fenced_out" not in a.log_text()
        assert a.state_json()["fences"] == {"cpu0": {"newest": 9, "live": [5, 9]}}
        assert _refused(a, psk, 4).startswith("lease token 4 is older than 9")

        newer = _served(a, psk, 12)  # both leases released, the device leased again
        assert va2.expect_closed() == []
        for v in (va, vb):
            await until(lambda v=v: v.state is Runstate.LOST, 5, "a fenced session lost")
            with pytest.raises(VgpuError) as err:
                await v.nop()
            assert err.value.code is ErrorCode.DEVICE_LOST
        (only,) = a.wait_sessions(lambda ss: len(ss) == 1)
        assert only["lease_token"] == 12
        assert a.log_text().count("fenced_out") == 3
        assert json.loads(fence_file.read_text()) == {"cpu0": {"newest": 12, "live": [12]}}
        assert _refused(a, psk, 9, (5, 9)).startswith("lease token 9 is older than 12")
        assert newer.call([rec(Opcode.NOP)]).status == 0
        newer.close()
        await va.close()
        await vb.close()
    finally:
        a.stop()


async def test_released_lease_fenced_while_an_older_one_lives(tmp_path: Path) -> None:
    """The gap a floor left: A (5) live; B (7, live {5, 7}) opened, then its
    lease released; C (9, live {5, 9}) created while A is still live. C's
    OPEN ends B's session (B's lease is gone and the device leased again)
    while A keeps working, and B cannot come back."""
    a, psk = _agent(tmp_path, tmp_path / "fences.json")
    try:
        va = await TunnelClient.connect(
            "127.0.0.1", a.port, lease_token=5, lease_live=(5,), psk=psk, device="cpu0"
        )
        vb = await TunnelClient.connect(
            "127.0.0.1", a.port, lease_token=7, lease_live=(5, 7), psk=psk, device="cpu0"
        )
        assert (await va.nop()).ok and (await vb.nop()).ok
        b_pid = next(s["pid"] for s in a.wait_sessions(lambda ss: len(ss) == 2)
                     if s["lease_token"] == 7)  # fmt: skip
        vc = await TunnelClient.connect(
            "127.0.0.1", a.port, lease_token=9, lease_live=(5, 9), psk=psk, device="cpu0"
        )
        await until(lambda: vb.state is Runstate.LOST, 5, "B's session lost")
        with pytest.raises(VgpuError) as err:
            await vb.nop()
        assert err.value.code is ErrorCode.DEVICE_LOST
        wait_for(lambda: not alive(b_pid), 5, "B's worker gone")
        sessions = a.wait_sessions(lambda ss: len(ss) == 2)
        assert {s["lease_token"] for s in sessions} == {5, 9}
        assert (await va.nop()).ok and (await vc.nop()).ok  # A and C keep working
        (line,) = [ln for ln in a.log_text().splitlines() if "fenced_out" in ln]
        assert "lease_token=7" in line and "newer=9" in line
        assert _refused(a, psk, 7, (5, 7)).endswith(
            "lease token 7 is older than 9, the newest for cpu0: "
            "the lease was given to someone else"
        )
        _served(a, psk, 5).close()  # A's other guest context is still welcome
        assert (await va.nop()).ok
        for v in (va, vb, vc):
            await v.close()
    finally:
        a.stop()


async def test_live_set_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    """A set no pool gives is refused with one line, and moves no fence."""
    a, psk = _agent(tmp_path, tmp_path / "f.json")
    try:
        cases: list[tuple[int, tuple[int, ...], str]] = [
            (5, (), "lease token 5 is not in its live set"),
            (5, (3, 6), "lease token 5 is not in its live set"),
            (0, (2,), "a live set comes without a lease token"),
            (5, (5, 3), "lease live set is not in ascending order without repeats"),
            (5, tuple(range(1, 258)), "lease live set has 257 tokens (the most is 256)"),
        ]
        for token, live, why in cases:
            status, message, c = _open(a, psk, token, live)
            c.sock.close()
            assert (status, message) == (ErrorCode.INVALID_ARGUMENT, why)
        with pytest.raises(VgpuError) as err:  # a backend that forgot the set
            await TunnelClient.connect("127.0.0.1", a.port, psk=psk, lease_token=7)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert str(err.value).endswith("lease token 7 is not in its live set")
        assert a.state_json()["fences"] == {}
        _served(a, psk, 0).close()  # cpu0 is still unfenced: the manual path works
    finally:
        a.stop()


def test_fences_per_device_and_any(tmp_path: Path) -> None:
    """OPEN for "any" device is fenced on the device it resolved to."""
    a, psk = _agent(tmp_path, tmp_path / "f.json")
    try:
        c = RawClient(a.port, psk=psk)
        c.connect(lease_token=3)  # device "" -> cpu0
        status, message, d = _open(a, psk, 2)
        assert status == ErrorCode.STALE_LEASE and "cpu0" in message
        d.sock.close()
        c.close()
    finally:
        a.stop()


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("fences.json", '{"cpu0": "five"}', "'five' is not {\"newest\""),
        ("no-such-dir/fences.json", None, "cannot write fence file"),
    ],
)
def test_bad_fence_file_is_one_line(
    tmp_path: Path, name: str, content: str | None, why: str
) -> None:
    bad = tmp_path / name
    if content is not None:
        bad.write_text(content)
    (tmp_path / "psk").write_bytes(b"k" * 32)
    os.chmod(tmp_path / "psk", 0o600)
    r = subprocess.run(
        [sys.executable, "-m", "host_agent.main", "serve", "--listen", "127.0.0.1:0",
         "--psk-file", str(tmp_path / "psk"), "--executor", "cpu", "--fence-file", str(bad)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert str(bad) in line and why in line
