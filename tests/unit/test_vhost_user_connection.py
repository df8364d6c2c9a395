"""The connection state machine, sans-IO, with a recording handler."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from vpcie.errors import ProtocolError
from vpcie.vhost_user.codec import MessageDecoder, encode_message, request
from vpcie.vhost_user.connection import Connection, RingConfig, Runstate
from vpcie.vhost_user.constants import Request
from vpcie.vhost_user.messages import (
    ConfigSpace,
    MemRegion,
    MemTable,
    Message,
    Payload,
    VringAddr,
    VringFile,
    VringState,
)

OFFERED = (1 << 32) | (1 << 28) | (1 << 29) | 3


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.base = {0: 0, 1: 0}

    def offered_features(self) -> int:
        return OFFERED

    def offered_protocol_features(self) -> int:
        return 0x2209

    def num_queues(self) -> int:
        return 2

    def set_features(self, features: int) -> None:
        self.calls.append(("features", features))

    def set_mem_table(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> None:
        self.calls.append(("mem", len(regions)))

    def start_ring(self, ring: RingConfig) -> None:
        self.calls.append(("start", ring.index))
        self.base[ring.index] = ring.base + 5  # pretend 5 chains were consumed

    def stop_ring(self, index: int) -> int:
        self.calls.append(("stop", index))
        return self.base[index]

    def set_call_fd(self, index: int, fd: int | None) -> None:
        self.calls.append(("call", index))

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(range(16))[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("set_config", data))

    def set_gpu_socket(self, fd: int) -> None:
        self.calls.append(("gpu_socket", fd))

    def reset(self) -> None:
        self.calls.append(("reset", None))


def _state(d: Driver) -> Runstate:
    return d.conn.state


def evfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


class Driver:
    """Feeds messages through the byte path, like a socket would."""

    def __init__(self) -> None:
        self.handler = Recorder()
        self.conn = Connection(self.handler)

    def send(
        self,
        req: Request,
        payload: Payload = None,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> list[Message]:
        out = self.conn.receive(encode_message(request(req, payload, need_reply=need_reply)), fds)
        return MessageDecoder(replies=True).feed(out)

    def handshake(self) -> None:
        self.send(Request.GET_FEATURES)
        self.send(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, 0x2209)
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, OFFERED | (1 << 30) | (1 << 40))
        memfd = os.memfd_create("t")
        self.send(Request.SET_MEM_TABLE, MemTable((MemRegion(0, 1 << 20, 0x1000, 0),)), [memfd])
        for i, n in ((0, 256), (1, 16)):
            self.send(Request.SET_VRING_CALL, VringFile(i, False), [evfd()])
            self.send(Request.SET_VRING_NUM, VringState(i, n))
            self.send(Request.SET_VRING_BASE, VringState(i, 0))
            self.send(Request.SET_VRING_ADDR, VringAddr(i, 0, 0x1000, 0x3000, 0x2000, 0))
            self.send(Request.SET_VRING_KICK, VringFile(i, False), [evfd()])


def test_states_through_a_qemu_handshake() -> None:
    d = Driver()
    assert _state(d) is Runstate.AWAIT_OWNER
    (r,) = d.send(Request.GET_FEATURES)
    assert r.payload == OFFERED | (1 << 30)
    d.handshake()
    assert _state(d) is Runstate.CONFIGURED  # kicked but not enabled yet
    assert ("start", 0) not in d.handler.calls
    (ack,) = d.send(Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    assert ack.payload == 0 and ack.request == Request.SET_VRING_ENABLE
    assert _state(d) is Runstate.RUNNING
    assert ("start", 0) in d.handler.calls
    (cfg,) = d.send(Request.GET_CONFIG, ConfigSpace(4, 8, 0, bytes(8)))
    assert cfg.payload == ConfigSpace(4, 8, 0, bytes(range(4, 12)))
    d.send(Request.SET_VRING_ENABLE, VringState(0, 0))
    (base,) = d.send(Request.GET_VRING_BASE, VringState(0, 0))
    assert base.payload == VringState(0, 5)
    assert _state(d) is Runstate.STOPPED
    d.conn.close()
    assert _state(d) is Runstate.CLOSED


@pytest.mark.parametrize(
    "req, payload, why",
    [
        (Request.SET_MEM_TABLE, MemTable(()), "before SET_OWNER"),
        (Request.SET_FEATURES, 1, "before SET_OWNER"),
        (Request.SET_VRING_NUM, VringState(0, 256), "before SET_OWNER"),
        (Request.RESET_DEVICE, None, "before SET_OWNER"),
    ],
)
def test_wrong_state_before_owner(req: Request, payload: Payload, why: str) -> None:
    d = Driver()
    with pytest.raises(ProtocolError, match=why):
        d.send(req, payload)
    assert _state(d) is Runstate.CLOSED
    with pytest.raises(ProtocolError, match="closed"):
        d.send(Request.GET_FEATURES)


@pytest.mark.parametrize(
    "req, payload, why",
    [
        (Request.SET_OWNER, None, "SET_OWNER twice"),
        (Request.SET_VRING_NUM, VringState(2, 256), "out of range"),
        (Request.SET_VRING_NUM, VringState(0, 100), "bad size"),
        (Request.SET_VRING_BASE, VringState(0, 1 << 16), "0xffff"),
        (Request.SET_FEATURES, 1 << 20, "never offered"),
        (Request.SET_PROTOCOL_FEATURES, 1 << 15, "never offered"),
        (Request.SET_VRING_ENABLE, VringState(0, 2), "bad value"),
        (Request.SET_VRING_KICK, VringFile(0, True), "polling"),
        (Request.GET_CONFIG, ConfigSpace(250, 16, 0, bytes(16)), "too large"),
        (Request.SET_LOG_BASE, None, "not supported"),
    ],
)
def test_not_allowed_now(req: Request, payload: Payload, why: str) -> None:
    d = Driver()
    d.send(Request.SET_PROTOCOL_FEATURES, 0x2209)
    d.send(Request.SET_OWNER)
    fds = [evfd()] if req is Request.SET_LOG_BASE else []
    if req is Request.SET_LOG_BASE:
        from vpcie.vhost_user.messages import LogDescription

        payload = LogDescription(4096, 0)
    with pytest.raises(ProtocolError, match=why):
        d.send(req, payload, fds)
    assert _state(d) is Runstate.CLOSED


def test_ring_config_while_running_is_refused() -> None:
    d = Driver()
    d.handshake()
    d.send(Request.SET_VRING_ENABLE, VringState(1, 1))
    with pytest.raises(ProtocolError, match="while it runs"):
        d.send(Request.SET_VRING_NUM, VringState(1, 16))
    assert ("stop", 1) in d.handler.calls  # close() stopped the running ring


def test_missing_or_extra_fds() -> None:
    d = Driver()
    d.send(Request.SET_OWNER)
    with pytest.raises(ProtocolError, match="0 fds, expected 1"):
        d.send(Request.SET_VRING_CALL, VringFile(0, False))
    d = Driver()
    fd = evfd()
    with pytest.raises(ProtocolError, match="1 fds, expected 0"):
        d.send(Request.GET_FEATURES, None, [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # the connection closed it


def test_unknown_request_with_need_reply_gets_failure_ack() -> None:
    d = Driver()
    d.send(Request.SET_PROTOCOL_FEATURES, 0b1000)  # REPLY_ACK
    d.send(Request.SET_OWNER)
    out = d.conn.receive(encode_message(Message(77, 0x9, b"\0" * 8)))
    (ack,) = MessageDecoder(replies=True).feed(out)
    assert ack.request == 77 and ack.payload == 1
    assert _state(d) is Runstate.NEGOTIATING
    with pytest.raises(ProtocolError, match="unknown request 78"):
        d.conn.receive(encode_message(Message(78, 0x1, b"")))


def test_reset_device_returns_to_negotiating_and_rings_restart() -> None:
    d = Driver()
    d.handshake()
    d.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    d.send(Request.RESET_DEVICE)
    assert ("stop", 0) in d.handler.calls and ("reset", None) in d.handler.calls
    assert _state(d) is Runstate.NEGOTIATING
    assert not any(r["running"] for r in d.conn.ring_status())


def test_without_protocol_features_rings_start_enabled() -> None:
    d = Driver()
    d.send(Request.SET_OWNER)
    d.send(Request.SET_FEATURES, 1 << 32)
    d.send(Request.SET_MEM_TABLE, MemTable((MemRegion(0, 1 << 20, 0, 0),)), [os.memfd_create("m")])
    d.send(Request.SET_VRING_NUM, VringState(0, 8))
    d.send(Request.SET_VRING_ADDR, VringAddr(0, 0, 0, 0x200, 0x100, 0))
    d.send(Request.SET_VRING_KICK, VringFile(0, False), [evfd()])
    assert _state(d) is Runstate.RUNNING
    with pytest.raises(ProtocolError, match="PROTOCOL_FEATURES"):
        d.send(Request.SET_VRING_ENABLE, VringState(0, 1))
