"""The vhost-user connection state machine (sans-IO).

``Connection`` validates every front-end message in two stages (STYLE habit 4):
first "is it well formed" (codec + fd counts), then "is it allowed now"
(runstate, negotiated features, ring state). Either failure is a
ProtocolError: the caller closes the socket and accepts QEMU's reconnect.
Effects go to a ``VhostUserHandler`` (the device-neutral core), which owns
guest memory, virtqueues and the device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from vpcie.errors import ProtocolError, VpcieError
from vpcie.vhost_user.codec import MessageDecoder, encode_message, reply
from vpcie.vhost_user.constants import (
    MAX_CONFIG_SIZE,
    MAX_QUEUE_SIZE,
    TOLERATED_UNOFFERED_FEATURES,
    Flag,
    ProtocolFeature,
    Request,
    VirtioFeature,
    bit,
)
from vpcie.vhost_user.messages import (
    ConfigSpace,
    MemRegion,
    MemTable,
    Message,
    VringAddr,
    VringFile,
    VringState,
)

log = logging.getLogger(__name__)

PROTOCOL_FEATURES_BIT = bit(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)
# Transport feature bits (virtio 1.2 §6: bits 24 to 41) that QEMU may set on its
# own; unoffered ones outside TOLERATED_UNOFFERED_FEATURES are logged, not fatal.
TRANSPORT_FEATURES = ((1 << 42) - 1) & ~((1 << 24) - 1)


class Runstate(Enum):
    """Where a connection is (STYLE habit 9)."""

    AWAIT_OWNER = "await_owner"  # before SET_OWNER: only feature queries
    NEGOTIATING = "negotiating"  # owner set; features / memory / rings being set up
    CONFIGURED = "configured"  # features acked and a memory table present
    RUNNING = "running"  # at least one ring is being processed
    STOPPED = "stopped"  # rings ran and were all stopped (GET_VRING_BASE / disable)
    CLOSED = "closed"  # terminal: peer gone or protocol error


@dataclass(frozen=True)
class RingConfig:
    """Everything a started ring needs; addresses are the front-end's UVAs."""

    index: int
    num: int
    desc_uva: int
    avail_uva: int
    used_uva: int
    base: int
    kick_fd: int
    call_fd: int | None
    event_idx: bool


class VhostUserHandler(Protocol):
    """What the connection asks of the device-neutral core.

    Fds passed in are borrowed: they are valid during the call (ring fds: until
    stop_ring / set_call_fd replaces them); dup them to keep them longer.
    """

    def offered_features(self) -> int: ...

    def offered_protocol_features(self) -> int: ...

    def num_queues(self) -> int: ...

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: Sequence[MemRegion], fds: Sequence[int]) -> None: ...

    def start_ring(self, ring: RingConfig) -> None: ...

    def stop_ring(self, index: int) -> int:
        """Stop processing ring ``index``; return the next avail index to process."""
        ...

    def set_call_fd(self, index: int, fd: int | None) -> None: ...

    def get_config(self, offset: int, size: int) -> bytes: ...

    def set_config(self, offset: int, data: bytes) -> None: ...

    def set_gpu_socket(self, fd: int) -> None: ...

    def reset(self) -> None: ...


@dataclass
class _Ring:
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool | None = None  # None: never set; see Connection._enabled
    running: bool = False

    def close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd is not None:
                os.close(fd)
        self.kick_fd = self.call_fd = self.err_fd = None


# Requests that need one fd, exactly (vhost-user.rst per message); kick/call/err
# need one unless their "no fd" bit is set; SET_MEM_TABLE one per region.
_ONE_FD = {
    Request.GPU_SET_SOCKET,
    Request.SET_LOG_BASE,
    Request.SET_LOG_FD,
    Request.SET_BACKEND_REQ_FD,
}
_RING_FILE = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
# Allowed before SET_OWNER (QEMU's vhost_dev_init queries first, then SET_OWNER).
_BEFORE_OWNER = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.SET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS,
    Request.SET_OWNER,
    Request.GET_CONFIG,
    Request.RESET_OWNER,
}
# Which protocol feature a request needs (vhost-user.rst per message).
_NEEDS_PROTOCOL_FEATURE = {
    Request.GET_QUEUE_NUM: ProtocolFeature.MQ,
    Request.GET_CONFIG: ProtocolFeature.CONFIG,
    Request.SET_CONFIG: ProtocolFeature.CONFIG,
    Request.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
}


class Connection:
    """One front-end connection: bytes and fds in, reply bytes out."""

    def __init__(
        self,
        handler: VhostUserHandler,
        *,
        on_message: Callable[[Message, Runstate], None] | None = None,
    ) -> None:
        self._handler = handler
        self._decoder = MessageDecoder()
        self._on_message = on_message
        self.state = Runstate.AWAIT_OWNER
        self.acked_features: int | None = None
        self.protocol_features = 0
        self.mem_table: tuple[MemRegion, ...] | None = None
        self.gpu_socket_set = False
        self._rings = [_Ring() for _ in range(handler.num_queues())]
        self.handled: list[str] = []  # request names, in order (status / tests)

    # ------------------------------------------------------------------ I/O side
    def receive(self, data: bytes, fds: Sequence[int] = ()) -> bytes:
        """Feed what recvmsg returned; return the bytes to send back.

        On ProtocolError the connection is CLOSED (rings stopped, fds closed)
        and the error propagates: the caller closes the socket.
        """
        if self.state is Runstate.CLOSED:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("connection is closed")
        out = bytearray()
        try:
            msgs = self._decoder.feed(data, fds)
            for i, msg in enumerate(msgs):
                try:
                    answer = self.handle(msg)
                except ProtocolError:
                    for later in msgs[i + 1 :]:
                        for fd in later.fds:
                            os.close(fd)
                    raise
                if answer is not None:
                    out += encode_message(answer)
        except ProtocolError:
            self.close()
            raise
        return bytes(out)

    def next_read_size(self) -> int:
        """Bytes to ask recvmsg for next (see MessageDecoder.next_read_size)."""
        return self._decoder.next_read_size()

    def close(self) -> None:
        """Stop every ring and release every fd; the state becomes CLOSED."""
        if self.state is Runstate.CLOSED:
            return
        for index, ring in enumerate(self._rings):
            if ring.running:
                ring.running = False
                self._handler.stop_ring(index)
            ring.close_fds()
        self._decoder.close()
        self.state = Runstate.CLOSED

    # ------------------------------------------------------------ message side
    def handle(self, msg: Message) -> Message | None:
        """Validate and apply one message; return the reply, if any.

        The message's fds are consumed: kept by the connection or closed.
        """
        keep: set[int] = set()
        try:
            answer = self._dispatch(msg, keep)
        finally:
            for fd in msg.fds:
                if fd not in keep:
                    os.close(fd)
        self.handled.append(msg.name)
        if self._on_message is not None:
            self._on_message(msg, self.state)
        return answer

    def _dispatch(self, msg: Message, keep: set[int]) -> Message | None:
        try:
            req = Request(msg.request)
        except ValueError:
            return self._unsupported(msg, f"unknown request {msg.request}")
        self._check_fds(req, msg)
        self._check_allowed(req)
        method = getattr(self, "_on_" + req.name.lower(), None)
        if method is None:
            return self._unsupported(msg, f"{req.name} is not supported by this backend")
        try:
            answer: Message | None = method(msg, keep)
        except ProtocolError:
            raise
        except (VpcieError, OSError, ValueError) as exc:
            # The request was well formed and allowed but we could not honour it.
            if self._wants_ack(msg):
                log.warning("%s failed: %s", req.name, exc)
                return reply(req, 1)
            raise ProtocolError(f"{req.name} failed: {exc}") from exc
        self._update_runstate()
        if answer is None and self._wants_ack(msg):
            return reply(req, 0)
        return answer

    def _wants_ack(self, msg: Message) -> bool:
        return bool(msg.flags & Flag.NEED_REPLY) and bool(
            self.protocol_features & bit(ProtocolFeature.REPLY_ACK)
        )

    def _unsupported(self, msg: Message, why: str) -> Message | None:
        # With REPLY_ACK the front-end learns of the failure and may go on;
        # without it, it would wait for a reply we cannot give: close.
        if self._wants_ack(msg):
            log.warning("%s; answered with a failure ack", why)
            return reply(msg.request, 1)
        raise ProtocolError(why)

    # Stage 1 (well formed): the fds that must come with each message.
    def _check_fds(self, req: Request, msg: Message) -> None:
        n = len(msg.fds)
        if req is Request.SET_MEM_TABLE:
            assert isinstance(msg.payload, MemTable)
            want = len(msg.payload.regions)
        elif req in _RING_FILE:
            assert isinstance(msg.payload, VringFile)
            want = 0 if msg.payload.nofd else 1
        elif req in _ONE_FD or req in (Request.ADD_MEM_REG,):
            want = 1
        else:
            want = 0
        if n != want:
            raise ProtocolError(f"{req.name} came with {n} fds, expected {want}")

    # Stage 2 (allowed now): runstate and negotiated features.
    def _check_allowed(self, req: Request) -> None:
        if self.state is Runstate.AWAIT_OWNER and req not in _BEFORE_OWNER:
            raise ProtocolError(f"{req.name} before SET_OWNER")
        needed = _NEEDS_PROTOCOL_FEATURE.get(req)
        if needed is not None and not self.protocol_features & bit(needed):
            raise ProtocolError(f"{req.name} without protocol feature {needed.name} negotiated")

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self._rings):
            raise ProtocolError(f"ring index {index} out of range (device has {len(self._rings)})")
        return self._rings[index]

    def _update_runstate(self) -> None:
        if self.state in (Runstate.AWAIT_OWNER, Runstate.CLOSED):
            return
        if any(r.running for r in self._rings):
            self.state = Runstate.RUNNING
        elif self.state is Runstate.RUNNING:
            self.state = Runstate.STOPPED
        elif self.state is not Runstate.STOPPED:
            configured = self.acked_features is not None and self.mem_table is not None
            self.state = Runstate.CONFIGURED if configured else Runstate.NEGOTIATING

    def _enabled(self, ring: _Ring) -> bool:
        # vhost-user.rst "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES a
        # ring starts enabled; with it, disabled until SET_VRING_ENABLE 1.
        if ring.enabled is not None:
            return ring.enabled
        return not (self.acked_features or 0) & PROTOCOL_FEATURES_BIT

    def _sync_ring(self, index: int) -> None:
        """Start or stop ring ``index`` so that it runs exactly when it can."""
        ring = self._rings[index]
        can_run = (
            ring.kick_fd is not None
            and ring.addr is not None
            and ring.num > 0
            and self.mem_table is not None
            and self._enabled(ring)
        )
        if can_run and not ring.running:
            assert ring.addr is not None and ring.kick_fd is not None
            event_idx = bool(
                (self.acked_features or 0) & bit(VirtioFeature.VIRTIO_RING_F_EVENT_IDX)
            )
            self._handler.start_ring(
                RingConfig(
                    index=index,
                    num=ring.num,
                    desc_uva=ring.addr.descriptor,
                    avail_uva=ring.addr.available,
                    used_uva=ring.addr.used,
                    base=ring.base,
                    kick_fd=ring.kick_fd,
                    call_fd=ring.call_fd,
                    event_idx=event_idx,
                )
            )
            ring.running = True
        elif ring.running and not can_run:
            ring.base = self._handler.stop_ring(index)
            ring.running = False

    def _require_stopped(self, ring: _Ring, what: str, index: int) -> None:
        if ring.running:
            raise ProtocolError(f"{what} on ring {index} while it runs")

    # ------------------------------------------------------------ handlers
    def _on_get_features(self, msg: Message, keep: set[int]) -> Message:
        return reply(Request.GET_FEATURES, self._handler.offered_features() | PROTOCOL_FEATURES_BIT)

    def _on_set_features(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, int)
        features = msg.payload
        offered = self._handler.offered_features() | PROTOCOL_FEATURES_BIT
        extra = features & ~offered & ~TOLERATED_UNOFFERED_FEATURES
        if extra & ~TRANSPORT_FEATURES:
            raise ProtocolError(f"SET_FEATURES acks device features never offered: {extra:#x}")
        if extra:
            log.warning("SET_FEATURES acks unoffered transport features %#x; accepted", extra)
        if any(r.running for r in self._rings):
            raise ProtocolError("SET_FEATURES while rings run")
        self.acked_features = features
        self._handler.set_features(features)
        return None

    def _on_set_owner(self, msg: Message, keep: set[int]) -> None:
        if self.state is not Runstate.AWAIT_OWNER:
            raise ProtocolError("SET_OWNER twice")
        self.state = Runstate.NEGOTIATING
        return None

    def _on_reset_owner(self, msg: Message, keep: set[int]) -> None:
        # Deprecated in the spec, still sent by QEMU when RESET_DEVICE is not
        # negotiated: treat it as a device reset that also drops the owner.
        self._reset()
        self.state = Runstate.AWAIT_OWNER
        return None

    def _on_reset_device(self, msg: Message, keep: set[int]) -> None:
        self._reset()
        self.state = Runstate.NEGOTIATING
        return None

    def _reset(self) -> None:
        for index, ring in enumerate(self._rings):
            if ring.running:
                self._handler.stop_ring(index)
            ring.close_fds()
            self._rings[index] = _Ring()
        self.acked_features = None
        self._handler.reset()

    def _on_get_protocol_features(self, msg: Message, keep: set[int]) -> Message:
        return reply(Request.GET_PROTOCOL_FEATURES, self._handler.offered_protocol_features())

    def _on_set_protocol_features(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, int)
        extra = msg.payload & ~self._handler.offered_protocol_features()
        if extra:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES acks bits never offered: {extra:#x}")
        self.protocol_features = msg.payload
        return None

    def _on_get_queue_num(self, msg: Message, keep: set[int]) -> Message:
        return reply(Request.GET_QUEUE_NUM, self._handler.num_queues())

    def _on_set_mem_table(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, MemTable)
        for r in msg.payload.regions:
            if (
                r.size == 0
                or r.guest_address + r.size > 1 << 64
                or r.user_address + r.size > 1 << 64
            ):
                raise ProtocolError(f"SET_MEM_TABLE: bad region {r}")
        self._handler.set_mem_table(msg.payload.regions, msg.fds)
        self.mem_table = msg.payload.regions
        for index in range(len(self._rings)):
            self._sync_ring(index)
        return None

    def _on_set_vring_num(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, VringState)
        index, num = msg.payload.index, msg.payload.num
        ring = self._ring(index)
        self._require_stopped(ring, "SET_VRING_NUM", index)
        # virtio 1.2 §2.7: a split ring's size is a power of 2, at most 32768.
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: bad size {num} for ring {index}")
        ring.num = num
        return None

    def _on_set_vring_addr(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, VringAddr)
        ring = self._ring(msg.payload.index)
        self._require_stopped(ring, "SET_VRING_ADDR", msg.payload.index)
        ring.addr = msg.payload
        self._sync_ring(msg.payload.index)
        return None

    def _on_set_vring_base(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg.payload.index)
        self._require_stopped(ring, "SET_VRING_BASE", msg.payload.index)
        if msg.payload.num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: index {msg.payload.num} > 0xffff")
        ring.base = msg.payload.num
        return None

    def _on_get_vring_base(self, msg: Message, keep: set[int]) -> Message:
        assert isinstance(msg.payload, VringState)
        index = msg.payload.index
        ring = self._ring(index)
        # vhost-user.rst "Ring states": GET_VRING_BASE stops the ring.
        if ring.running:
            ring.base = self._handler.stop_ring(index)
            ring.running = False
        if ring.kick_fd is not None:
            os.close(ring.kick_fd)
            ring.kick_fd = None
        self._update_runstate()
        return reply(Request.GET_VRING_BASE, VringState(index, ring.base))

    def _take_ring_fd(self, msg: Message, keep: set[int]) -> tuple[int, int | None]:
        assert isinstance(msg.payload, VringFile)
        self._ring(msg.payload.index)
        fd = None if msg.payload.nofd else msg.fds[0]
        if fd is not None:
            keep.add(fd)
        return msg.payload.index, fd

    def _on_set_vring_kick(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, VringFile)
        if msg.payload.nofd:
            raise ProtocolError("SET_VRING_KICK without fd: polling rings are not supported")
        index = msg.payload.index
        ring = self._ring(index)
        if ring.running:
            ring.base = self._handler.stop_ring(index)
            ring.running = False
        index, fd = self._take_ring_fd(msg, keep)
        if ring.kick_fd is not None:
            os.close(ring.kick_fd)
        ring.kick_fd = fd
        self._sync_ring(index)
        return None

    def _on_set_vring_call(self, msg: Message, keep: set[int]) -> None:
        index, fd = self._take_ring_fd(msg, keep)
        ring = self._rings[index]
        old, ring.call_fd = ring.call_fd, fd
        if ring.running:
            self._handler.set_call_fd(index, fd)
        if old is not None:
            os.close(old)
        return None

    def _on_set_vring_err(self, msg: Message, keep: set[int]) -> None:
        index, fd = self._take_ring_fd(msg, keep)
        ring = self._rings[index]
        if ring.err_fd is not None:
            os.close(ring.err_fd)
        ring.err_fd = fd
        return None

    def _on_set_vring_enable(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, VringState)
        if not self.protocol_features and not (self.acked_features or 0) & PROTOCOL_FEATURES_BIT:
            raise ProtocolError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if msg.payload.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: bad value {msg.payload.num}")
        ring = self._ring(msg.payload.index)
        ring.enabled = bool(msg.payload.num)
        self._sync_ring(msg.payload.index)
        return None

    def _on_get_config(self, msg: Message, keep: set[int]) -> Message:
        assert isinstance(msg.payload, ConfigSpace)
        cfg = msg.payload
        if cfg.offset + cfg.size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"GET_CONFIG: range {cfg.offset}+{cfg.size} too large")
        data = self._handler.get_config(cfg.offset, cfg.size)
        data = data[: cfg.size].ljust(cfg.size, b"\0")
        return reply(Request.GET_CONFIG, ConfigSpace(cfg.offset, cfg.size, cfg.flags, data))

    def _on_set_config(self, msg: Message, keep: set[int]) -> None:
        assert isinstance(msg.payload, ConfigSpace)
        cfg = msg.payload
        if cfg.offset + cfg.size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"SET_CONFIG: range {cfg.offset}+{cfg.size} too large")
        self._handler.set_config(cfg.offset, cfg.payload)
        return None

    def _on_gpu_set_socket(self, msg: Message, keep: set[int]) -> None:
        self._handler.set_gpu_socket(msg.fds[0])
        self.gpu_socket_set = True
        return None

    # --------------------------------------------------------- introspection
    def ring_status(self) -> list[dict[str, object]]:
        """Per-ring state for status dumps and tests."""
        return [
            {
                "index": i,
                "num": r.num,
                "base": r.base,
                "enabled": self._enabled(r),
                "running": r.running,
                "kick": r.kick_fd is not None,
                "call": r.call_fd is not None,
            }
            for i, r in enumerate(self._rings)
        ]
