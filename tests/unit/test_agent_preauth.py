"""The agent's pre-authentication pieces without an agent: the pending-table
caps, the HELLO/AUTH/OPEN state machine, the header-first frame read, and the
fork guard."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from host_agent.admission import PendingTable, Waiter, read_control_frame
from host_agent.handshake import HandshakeState, ServerHandshake
from host_agent.spawn import ForkRefused, fork_worker
from tests.conftest import ROOT
from vpcie.errors import AuthError, ProtocolError
from vpcie.protocol.codes import (
    MAX_CONTROL_PAYLOAD,
    PROTOCOL_VERSION,
    AuthMode,
    FrameFlag,
    FrameType,
)
from vpcie.protocol.frames import (
    MAC_SIZE,
    Frame,
    FrameReader,
    decode_payload,
    encode_frame,
    encode_header,
    encode_open,
    encode_payload,
    psk_mac,
)

PSK = b"k" * 32
V = PROTOCOL_VERSION


# -- PendingTable -------------------------------------------------------------------
def test_per_source_cap_evicts_that_sources_oldest() -> None:
    t = PendingTable(max_total=10, max_per_source=2)
    assert t.add(1, "a") == [] and t.add(2, "b") == [] and t.add(3, "a") == []
    assert t.add(4, "a") == [1]  # a's oldest, not b's older one
    assert 2 in t and 1 not in t and t.count("a") == 2 and len(t) == 3


def test_total_cap_evicts_the_oldest() -> None:
    t = PendingTable(max_total=3, max_per_source=3)
    for k, src in enumerate("abc"):
        assert t.add(k, src) == []
    assert t.add(9, "d") == [0]
    t.remove(1)
    assert t.add(10, "e") == []  # room again
    assert t.add(11, "f") == [2]
    assert [t.count(s) for s in "abcdef"] == [0, 0, 0, 1, 1, 1]


def test_remove_is_idempotent_and_caps_are_checked() -> None:
    t = PendingTable(2, 1)
    t.add(1, "a")
    t.remove(1)
    t.remove(1)
    assert len(t) == 0 and t.count("a") == 0
    with pytest.raises(ValueError):
        PendingTable(0, 1)


# -- ServerHandshake ---------------------------------------------------------------
def _frame(ftype: FrameType, payload: bytes, flags: int = 0) -> Frame:
    r = FrameReader()
    data = encode_frame(ftype, payload, flags=flags)
    r.get_buffer()[: len(data)] = data
    [f] = r.buffer_updated(len(data))
    return f


def _hello(mode: AuthMode, cnonce: bytes = b"c" * 32) -> Frame:
    return _frame(FrameType.HELLO, encode_payload("HELLO", V, V, int(mode), cnonce, "me"))


def _reply(data: bytes, name: str) -> tuple[object, ...]:
    r = FrameReader()
    r.get_buffer()[: len(data)] = data
    [f] = r.buffer_updated(len(data))
    assert f.flags & FrameFlag.REPLY
    return decode_payload(name, f.payload)


def test_psk_handshake_to_open() -> None:
    hs = ServerHandshake(AuthMode.PSK, "agent-x", PSK)
    reply = _reply(hs.receive(_hello(AuthMode.PSK)), "HELLO_REPLY")
    snonce = reply[2]
    assert reply[3] == psk_mac(PSK, b"agent", b"c" * 32, snonce) and reply[4] == "agent-x"
    mac = psk_mac(PSK, b"client", b"c" * 32, snonce)
    assert _reply(hs.receive(_frame(FrameType.AUTH, encode_payload("AUTH", mac))), "AUTH_REPLY")
    assert hs.authenticated and hs.state is HandshakeState.OPEN
    opened = encode_open("cpu0", 5, 6, "vm", 3, 77, (40, 77))
    assert hs.receive(_frame(FrameType.OPEN, opened)) == b""
    assert hs.open is not None and hs.open.device == "cpu0" and hs.open.client == "vm"
    assert (
        hs.open.handle_epoch == 3 and hs.open.lease_token == 77 and hs.open.lease_live == (40, 77)
    )
    assert not hs.inventory
    with pytest.raises(ProtocolError):  # nothing before OPEN_REPLY
        hs.receive(_frame(FrameType.PING, encode_payload("PING", 1)))


def test_psk_wrong_key_and_wrong_mode() -> None:
    hs = ServerHandshake(AuthMode.PSK, "a", PSK)
    hs.receive(_hello(AuthMode.PSK))
    with pytest.raises(AuthError, match="wrong pre-shared key"):
        hs.receive(_frame(FrameType.AUTH, encode_payload("AUTH", b"\1" * MAC_SIZE)))
    assert not hs.authenticated
    with pytest.raises(AuthError, match="auth mode"):
        ServerHandshake(AuthMode.TLS, "a").receive(_hello(AuthMode.PSK))


def test_tls_mode_needs_zero_mac_and_order() -> None:
    hs = ServerHandshake(AuthMode.TLS, "a")
    with pytest.raises(ProtocolError, match="expected HELLO, got OPEN"):
        hs.receive(_frame(FrameType.OPEN, encode_open("", 0, 0, "x", 0, 0, ())))
    hs = ServerHandshake(AuthMode.TLS, "a")
    with pytest.raises(ProtocolError, match="REPLY flag"):
        hs.receive(
            _frame(
                FrameType.HELLO,
                encode_payload("HELLO", V, V, 0, b"c" * 32, "me"),
                flags=FrameFlag.REPLY,
            )
        )
    hs = ServerHandshake(AuthMode.TLS, "a")
    hs.receive(_hello(AuthMode.TLS))
    hs.receive(_frame(FrameType.AUTH, encode_payload("AUTH", bytes(MAC_SIZE))))
    assert hs.authenticated


def test_v1_clients_refused() -> None:
    hs = ServerHandshake(AuthMode.TLS, "a")
    with pytest.raises(ProtocolError, match=r"client speaks v1\.\.1, agent v2"):
        hs.receive(_frame(FrameType.HELLO, encode_payload("HELLO", 1, 1, 0, b"c" * 32, "old")))
    hs = ServerHandshake(AuthMode.TLS, "a")  # a range that includes 2 is fine
    hs.receive(_frame(FrameType.HELLO, encode_payload("HELLO", 1, 3, 0, b"c" * 32, "new")))
    assert hs.state is HandshakeState.AUTH


def test_inventory_instead_of_open_only_after_auth() -> None:
    hs = ServerHandshake(AuthMode.TLS, "a")
    with pytest.raises(ProtocolError, match="expected HELLO, got INVENTORY"):
        hs.receive(_frame(FrameType.INVENTORY, b""))
    hs = ServerHandshake(AuthMode.PSK, "a", PSK)
    hs.receive(_hello(AuthMode.PSK))
    with pytest.raises(ProtocolError, match="expected AUTH, got INVENTORY"):
        hs.receive(_frame(FrameType.INVENTORY, b""))
    for payload in (b"x", b""):
        hs = ServerHandshake(AuthMode.TLS, "a")
        hs.receive(_hello(AuthMode.TLS))
        hs.receive(_frame(FrameType.AUTH, encode_payload("AUTH", bytes(MAC_SIZE))))
        if payload:
            with pytest.raises(ProtocolError, match="with a payload"):
                hs.receive(_frame(FrameType.INVENTORY, payload))
    assert hs.receive(_frame(FrameType.INVENTORY, b"")) == b""
    assert hs.inventory and hs.open is None and hs.state is HandshakeState.DONE
    with pytest.raises(ProtocolError):  # nothing after it
        hs.receive(_frame(FrameType.OPEN, encode_open("", 0, 0, "x", 0, 0, ())))


# -- header-first read ---------------------------------------------------------------
async def test_oversized_frame_refused_before_its_payload() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        # A COMMAND header announcing 1 MiB: refused on the header alone.
        b.sendall(encode_header(FrameType.COMMAND, 1 << 20, seq=1))
        with pytest.raises(ProtocolError, match="before authentication"):
            await read_control_frame(a, Waiter(a))
    finally:
        a.close()
        b.close()


async def test_control_frame_read_exactly() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        hello = encode_frame(FrameType.HELLO, encode_payload("HELLO", V, V, 1, b"c" * 32, "x"))
        b.sendall(hello + b"NEXT")  # bytes after the frame stay in the socket
        f = await read_control_frame(a, Waiter(a))
        assert f.type == FrameType.HELLO and len(f.payload) <= MAX_CONTROL_PAYLOAD
        assert a.recv(100) == b"NEXT"
    finally:
        a.close()
        b.close()


# -- fork guard --------------------------------------------------------------------
def test_fork_refused_with_threads() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(ForkRefused, match="threads"):
            fork_worker(set(), lambda: 0)
    finally:
        stop.set()
        t.join()


CHILD_FDS = r"""
import os, socket, sys
from host_agent.spawn import fork_worker
keep_r, keep_w = os.pipe()
drop_r, drop_w = os.pipe()
def body():
    os.write(keep_w, " ".join(sorted(os.listdir("/proc/self/fd"))).encode())
    return 7
pid = fork_worker({keep_w}, body)
_, status = os.waitpid(pid, 0)
os.close(keep_w)
print(os.waitstatus_to_exitcode(status), os.read(keep_r, 1000).decode(), keep_w)
"""


def test_forked_child_keeps_only_its_fds() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHILD_FDS], capture_output=True, text=True,
                       env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    code, *fds, keep = r.stdout.split()
    # 0-2, the kept pipe end, and the fd listdir itself opened
    assert code == "7" and keep in fds and len(fds) == 5, r.stdout


# -- accepted sockets --------------------------------------------------------------
def test_accepted_socket_found_dead_by_the_kernel_too() -> None:
    from host_agent.config import AgentConfig
    from host_agent.inventory import discover
    from host_agent.server import Agent

    cfg = AgentConfig(auth="psk", agent_name="t", psk_hex="00" * 16, idle_timeout=8.0)
    agent = Agent(cfg, discover(None, "none"), ("127.0.0.1", 0))
    ls = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    try:
        agent._tune(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 8000
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 4
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        for x in (s, c, ls):
            x.close()
