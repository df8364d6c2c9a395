"""Lease fencing on a real agent (docs/SECURITY.md "Lease fencing"): OPEN with
pool lease tokens over real TCP; the newest token per device wins, older
sessions there end, and the fences survive a restart with --fence-file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from tests.conftest import ROOT, until, wait_for
from tests.integration.agent_helpers import alive
from vpcie.errors import ErrorCode, VgpuError
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


def _open(a: AgentProcess, psk: bytes, token: int) -> tuple[int, str, RawClient]:
    c = RawClient(a.port, psk=psk)
    c.hello(), c.auth()
    status, _sid, message, _info = c.open(device="cpu0", lease_token=token)
    return status, message, c


def _served(a: AgentProcess, psk: bytes, token: int) -> RawClient:
    status, message, c = _open(a, psk, token)
    assert status == ErrorCode.OK, message
    assert c.call([rec(Opcode.NOP)]).status == 0
    return c


def _refused(a: AgentProcess, psk: bytes, token: int) -> str:
    status, message, c = _open(a, psk, token)
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
                                          lease_token=5)  # fmt: skip
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
        assert a.state_json()["fences"] == {"cpu0": 5}
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
        assert json.loads(fence_file.read_text()) == {"cpu0": 9}
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
        assert b.state_json()["fences"] == {"cpu0": 9}
    finally:
        b.stop()


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
        ("fences.json", '{"cpu0": "five"}', "not a token"),
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
