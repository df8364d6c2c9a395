"""Sans-IO vhost-user message codec: bytes + fds in, messages out.

The socket edge does recvmsg/sendmsg; this module never touches a socket.
Fds arriving with SCM_RIGHTS belong to the message whose bytes they came with
(QEMU sends every message, fds included, in one sendmsg).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vpcie.errors import ProtocolError
from vpcie.vhost_user.constants import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    VERSION_MASK,
    Flag,
)
from vpcie.vhost_user.messages import (
    HEADER,
    Message,
    Payload,
    build_payload,
    parse_payload,
    payload_kind,
)

KNOWN_FLAGS = int(VERSION_MASK | Flag.REPLY | Flag.NEED_REPLY)


def encode_message(msg: Message) -> bytes:
    """The wire bytes of ``msg``; its fds travel separately (SCM_RIGHTS).

    A reply (REPLY flag) uses the reply format of the request it answers.
    """
    kind = payload_kind(msg.request, bool(msg.flags & Flag.REPLY))
    payload = build_payload(kind, msg.payload)
    header = HEADER.build({"request": msg.request, "flags": msg.flags, "size": len(payload)})
    return bytes(header) + payload


def request(request: int, payload: Payload = None, *, need_reply: bool = False) -> Message:
    """A front-end request message (for the test frontend and golden files)."""
    flags = VERSION | (Flag.NEED_REPLY if need_reply else 0)
    return Message(request, int(flags), payload)


def reply(request: int, payload: Payload) -> Message:
    """A back-end reply to ``request``."""
    return Message(request, int(VERSION | Flag.REPLY), payload)


def decode_one(data: bytes, fds: Sequence[int] = (), *, replies: bool = False) -> Message:
    """Decode exactly one whole message (golden files, fuzzing)."""
    dec = MessageDecoder(replies=replies)
    msgs = dec.feed(data, fds)
    if len(msgs) != 1 or dec.pending:
        for m in msgs:
            for fd in m.fds:
                os.close(fd)
        raise ProtocolError(f"expected one whole message, got {len(msgs)} and {dec.pending} bytes")
    return msgs[0]


class MessageDecoder:
    """Reassembles messages from a byte stream.

    ``replies=False`` decodes front-end requests (what a backend reads);
    ``replies=True`` decodes back-end replies (what the test frontend reads).
    After a ProtocolError the decoder is poisoned: the connection must close.
    """

    def __init__(self, *, replies: bool = False) -> None:
        self._replies = replies
        self._buf = bytearray()
        self._fds: list[int] = []
        self._failed = False

    def next_read_size(self) -> int:
        """How many bytes the socket edge should ask recvmsg for next.

        Reading no further than the end of the current message keeps fds with
        the message they came with: Linux may coalesce a message without fds
        and a following one with fds into one read, and then the fds would
        seem to belong to the first (vhost-user.rst "Communication"; QEMU's
        libvhost-user reads the header first for the same reason).
        """
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        size = int.from_bytes(self._buf[8:12], "little")
        return max(1, min(size, MAX_PAYLOAD_SIZE) + HEADER_SIZE - len(self._buf))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Add received bytes (and the fds that came with them); return whole messages.

        The decoder owns the fds it was given: they move into messages, or are
        closed when the message is rejected.
        """
        if self._failed:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("decoder already failed; the connection must close")
        self._buf += data
        self._fds.extend(fds)
        out: list[Message] = []
        try:
            while True:
                msg = self._next()
                if msg is None:
                    break
                out.append(msg)
        except ProtocolError:
            self._failed = True
            self.close()
            for m in out:
                for fd in m.fds:
                    os.close(fd)
            raise
        return out

    def close(self) -> None:
        """Close fds not yet handed out in a message."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _next(self) -> Message | None:
        if len(self._buf) < HEADER_SIZE:
            if self._fds and not self._buf:
                raise ProtocolError("fds arrived without a message")
            return None
        hdr = HEADER.parse(bytes(self._buf[:HEADER_SIZE]))
        request, flags, size = int(hdr.request), int(hdr.flags), int(hdr.size)
        # Stage 1: well-formed header (vhost-user.rst "Header").
        if flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"request {request}: unsupported version {flags & VERSION_MASK}")
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"request {request}: unknown flags {flags:#x}")
        if bool(flags & Flag.REPLY) != self._replies:
            raise ProtocolError(
                f"request {request}: REPLY flag {'missing' if self._replies else 'set'}"
            )
        if size > MAX_PAYLOAD_SIZE:
            raise ProtocolError(f"request {request}: payload size {size} > {MAX_PAYLOAD_SIZE}")
        if len(self._buf) < HEADER_SIZE + size:
            return None
        payload_bytes = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + size])
        del self._buf[: HEADER_SIZE + size]
        fds, self._fds = tuple(self._fds), []
        try:
            if len(fds) > MAX_FDS_PER_MESSAGE:
                raise ProtocolError(f"request {request}: {len(fds)} fds > {MAX_FDS_PER_MESSAGE}")
            payload = parse_payload(payload_kind(request, self._replies), payload_bytes)
        except ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"request {request}: {exc}") from None
        return Message(request, flags, payload, fds)
