"""Tunnel frames between a backend (client) and a host agent.

Every frame is a 24-byte header followed by ``length`` bytes of payload::

    magic u32 "VPCI" | version u8 | type u8 | flags u16 | session u32 |
    seq u64 | length u32

``length`` is capped per frame type (codes.MAX_PAYLOAD); a frame over its cap,
with a bad magic, version or type is a ProtocolError and the connection is
closed. Payload formats are the construct Structs below; the hot ones are
decoded by FastStructs derived from them.

``FrameReader`` is the sans-IO decoder. It plugs into a blocking loop
(``sock.recv_into(r.get_buffer())``) and into ``asyncio.BufferedProtocol``
alike, and lets the caller receive DATA payloads straight into their final
buffer (``sink``): no intermediate copy of bulk data.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import construct as c

from vpcie.errors import ProtocolError
from vpcie.protocol.codes import (
    FRAME_MAGIC,
    MAX_PAYLOAD,
    NO_INDEX,
    PROTOCOL_VERSION,
    FrameFlag,
    FrameType,
)
from vpcie.protocol.fastcodec import FastStruct

u8, u16, u32, u64 = c.Int8ul, c.Int16ul, c.Int32ul, c.Int64ul

HEADER = c.Struct(
    "magic" / u32,
    "version" / u8,
    "type" / u8,
    "flags" / u16,
    "session" / u32,
    "seq" / u64,
    "length" / u32,
)
NONCE_SIZE = 32
MAC_SIZE = 32

HELLO = c.Struct(  # client -> agent
    "proto_min" / u16,
    "proto_max" / u16,
    "auth" / u8,
    "nonce" / c.Bytes(NONCE_SIZE),
    "name" / c.PascalString(u8, "utf8"),
)
HELLO_REPLY = c.Struct(  # agent -> client; proof = HMAC(psk, "agent"|cn|sn) in PSK mode
    "version" / u16,
    "auth" / u8,
    "nonce" / c.Bytes(NONCE_SIZE),
    "proof" / c.Bytes(MAC_SIZE),
    "agent" / c.PascalString(u8, "utf8"),
)
AUTH = c.Struct("mac" / c.Bytes(MAC_SIZE))  # HMAC(psk, "client"|cn|sn)
AUTH_REPLY = c.Struct("status" / u32)
LIVE_TOKEN = c.Struct("token" / u64)
OPEN = c.Struct(
    "device" / c.PascalString(u8, "utf8"),  # GPU/MIG UUID, or "" for any
    "mem_quota" / u64,  # 0: the agent's default
    "max_inflight" / u32,  # 0: the agent's default
    "client" / c.PascalString(u8, "utf8"),  # who asks (vGPU / domain name)
    "handle_epoch" / u8,  # the top byte of every handle of this session (codes.py)
    "lease_token" / u64,  # the pool lease's fencing token; 0: no pool lease
    # The tokens of the device's leases live when that lease was created, its
    # own included (ascending, at most codes.MAX_LIVE_LEASES); empty with token
    # 0. The bytes of PrefixedArray(u16, u64), spelled as a count field and an
    # Array (like STATE_SUMMARY's) so that FastStruct derives it.
    "nlive" / u16,
    "lease_live" / c.Array(c.this.nlive, LIVE_TOKEN),
)
OPEN_REPLY = c.Struct(
    "status" / u32,
    "session" / u32,
    "message" / c.PascalString(u16, "utf8"),
    "info" / c.Prefixed(u32, c.GreedyBytes),  # a QUERY_INFO, empty on error
)
CLOSE = c.Struct("reason" / u32)
ERROR = c.Struct("code" / u32, "fatal" / u8, "message" / c.PascalString(u16, "utf8"))
PING = c.Struct("stamp" / u64)
DATA_HEADER = c.Struct("offset" / u64)  # offset into the command's copy stream
RESULT = c.Struct("index" / u32, "value" / u64)
COMPLETION = c.Struct(
    "status" / u32,  # ErrorCode
    "failed_index" / u32,  # record that failed, NO_INDEX if none
    "message" / c.PascalString(u16, "utf8"),
    "nresults" / u16,
    "results" / c.Array(c.this.nresults, RESULT),
    "blob" / c.Prefixed(u32, c.GreedyBytes),  # QUERY_INFO for QUERY, else empty
)
QUERY_INFO = c.Struct(
    "proto_version" / u16,
    "executor" / u8,  # ExecutorKind
    "flags" / u8,
    "mem_total" / u64,
    "mem_free" / u64,
    "mem_quota" / u64,
    "mem_used" / u64,
    "max_inflight" / u32,
    "max_batch_bytes" / u32,
    "max_streams" / u32,
    "sm_count" / u32,
    "cc_major" / u8,
    "cc_minor" / u8,
    "name" / c.PascalString(u8, "utf8"),
    "uuid" / c.PascalString(u8, "utf8"),
    "agent" / c.PascalString(u8, "utf8"),
)

# INVENTORY|REPLY: the agent's devices, sessions and fences as one JSON
# document (docs/PROTOCOL.md "Inventory").
INVENTORY_REPLY = c.Struct("json" / c.Prefixed(u32, c.GreedyBytes))
# STATE_EXPORT's completion blob: what a session holds, without the contents
# (those move with COPY_D2H). Events: bit i (LSB first) set = event i recorded.
# "gen": the buffer's write generation (changes whenever a command may have
# written it; live migration's pre-copy recopies a buffer whose gen moved).
STATE_BUFFER = c.Struct("handle" / u32, "size" / u64, "gen" / u64)
STATE_MODULE = c.Struct(
    "handle" / u32, "kind" / u8, "name" / c.PascalString(u16, "utf8"), "code_size" / u32
)
# (The counts are spelled as fields, like COMPLETION's nresults: the same
# bytes as PrefixedArray(u32, ...), in a form FastStruct derives.)
STATE_SUMMARY = c.Struct(
    "handle_epoch" / u8,
    "next_index" / u32,
    "mem_used" / u64,
    "events_set" / c.Prefixed(u16, c.GreedyBytes),
    "nbuffers" / u32,
    "buffers" / c.Array(c.this.nbuffers, STATE_BUFFER),
    "nmodules" / u32,
    "modules" / c.Array(c.this.nmodules, STATE_MODULE),
)

PAYLOADS: dict[str, c.Struct] = {
    "HELLO": HELLO,
    "HELLO_REPLY": HELLO_REPLY,
    "AUTH": AUTH,
    "AUTH_REPLY": AUTH_REPLY,
    "OPEN": OPEN,
    "OPEN_REPLY": OPEN_REPLY,
    "CLOSE": CLOSE,
    "ERROR": ERROR,
    "PING": PING,
    "DATA_HEADER": DATA_HEADER,
    "COMPLETION": COMPLETION,
    "QUERY_INFO": QUERY_INFO,
    "INVENTORY_REPLY": INVENTORY_REPLY,
    "STATE_SUMMARY": STATE_SUMMARY,
}
FAST: dict[str, FastStruct] = {name: FastStruct(st) for name, st in PAYLOADS.items()}

_HDR = FastStruct(HEADER).fixed_struct()
HEADER_SIZE = _HDR.size
_DATA_HDR = struct.Struct("<Q")
_CAPS: dict[int, int] = {int(t): MAX_PAYLOAD[t] for t in FrameType}  # known type -> its cap
_DATA_TYPE = int(FrameType.DATA)


class Frame(NamedTuple):
    type: int
    flags: int
    session: int
    seq: int
    payload: bytes | memoryview  # for a sunk DATA frame: empty
    data_offset: int = 0  # DATA only
    data_len: int = 0  # DATA only: payload bytes (sunk or in ``payload``)


# Frame(...) without the NamedTuple __new__ frame (the reader's hot path):
# _frame(Frame, (all seven fields)).
_frame = tuple.__new__


def encode_header(
    ftype: int, length: int, *, session: int = 0, seq: int = 0, flags: int = 0
) -> bytes:
    cap = MAX_PAYLOAD.get(ftype)
    if cap is None or length > cap:
        raise ProtocolError(f"frame type {ftype} with {length} bytes is not sendable")
    return _HDR.pack(FRAME_MAGIC, PROTOCOL_VERSION, ftype, flags, session, seq, length)


# A session's frames of one type differ only in HEADER's last two fields (seq,
# length): ``header_prefix(type, session) + SEQ_LENGTH.pack(seq, n)`` equals
# ``encode_header(type, n, session=session, seq=seq)`` for n within the cap.
# Hot paths (COMMAND in the client, COMPLETION in the agent) build the
# constant part once per session.
_TAIL = HEADER.subcons[-2:]
if [sc.name for sc in _TAIL] != ["seq", "length"]:
    raise AssertionError("frames.HEADER no longer ends with seq, length")
SEQ_LENGTH = FastStruct(c.Struct(*_TAIL)).fixed_struct()


def header_prefix(ftype: int, session: int) -> bytes:
    """The bytes of every ``ftype`` header of ``session`` before seq and length."""
    return encode_header(ftype, 0, session=session)[: HEADER_SIZE - SEQ_LENGTH.size]


def encode_frame(
    ftype: int, payload: bytes = b"", *, session: int = 0, seq: int = 0, flags: int = 0
) -> bytes:
    return encode_header(ftype, len(payload), session=session, seq=seq, flags=flags) + payload


def encode_payload(name: str, *values: Any) -> bytes:
    return FAST[name].encode(values)


def encode_open(
    device: str,
    mem_quota: int,
    max_inflight: int,
    client: str,
    handle_epoch: int,
    lease_token: int,
    lease_live: Sequence[int],
) -> bytes:
    """OPEN's payload, its live set given as plain tokens."""
    live = [(t,) for t in lease_live]
    return FAST["OPEN"].encode(
        (device, mem_quota, max_inflight, client, handle_epoch, lease_token, len(live), live)
    )


def decode_payload(name: str, payload: bytes | memoryview) -> tuple[Any, ...]:
    """Decode a whole payload; trailing bytes are a ProtocolError."""
    values, end = FAST[name].decode(payload, 0)
    if end != len(payload):
        raise ProtocolError(f"{name}: {len(payload) - end} trailing bytes")
    return values


def data_frame_header(session: int, seq: int, offset: int, n: int, *, last: bool) -> bytes:
    """Header + DATA_HEADER for a DATA frame carrying ``n`` payload bytes."""
    flags = FrameFlag.LAST if last else 0
    return encode_header(
        FrameType.DATA, 8 + n, session=session, seq=seq, flags=flags
    ) + _DATA_HDR.pack(offset)


def encode_completion(
    status: int,
    *,
    failed_index: int = NO_INDEX,
    message: str = "",
    results: list[tuple[int, int]] | None = None,
    blob: bytes = b"",
) -> bytes:
    res = results or []
    return FAST["COMPLETION"].encode((status, failed_index, message, len(res), res, blob))


# -- authentication (PSK mode) ----------------------------------------------
def psk_mac(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 over role|client nonce|server nonce; role is b"client"/b"agent"."""
    return hmac.new(
        key, b"vpcie-psk-v1|" + role + b"|" + client_nonce + server_nonce, hashlib.sha256
    ).digest()


def macs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# -- sans-IO decoder -----------------------------------------------------------
Sink = Callable[[int, int, int, int], "list[memoryview] | None"]
"""sink(session, seq, offset, length) -> writable views (a scatter list) of
exactly ``length`` bytes in all where the DATA payload must land, or None to
receive it as bytes in Frame.payload."""

_RX_BUF = 256 * 1024


class FrameReader:
    """Turns a byte stream into Frames; DATA payloads can go straight to a sink.

    Use: ``buf = r.get_buffer(); n = recv_into(buf); frames = r.buffer_updated(n)``.
    Raises ProtocolError on a malformed header; after that the stream is dead.

    ``stop_after``: frame types after which parsing pauses, so the caller can
    act on such a frame (a COMMAND, whose DATA must land where the command
    says) before the next frame's header is read; ``more`` is then True and
    ``buffer_updated(0)`` goes on.
    """

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        buffer_size: int = _RX_BUF,
        stop_after: frozenset[int] = frozenset(),
    ) -> None:
        if buffer_size < HEADER_SIZE + 8:  # a DATA header + offset must fit, else no progress
            raise ValueError(f"buffer_size {buffer_size} < {HEADER_SIZE + 8}")
        self.sink = sink
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of valid bytes in _buf
        # A payload being received straight into its own buffer or a sink's
        # scatter list: _segs[_seg] is filled from _seg_pos on.
        self._segs: list[memoryview] = []
        self._seg = 0
        self._seg_pos = 0
        self._big_frame: Frame | None = None
        self._big_owned: bytearray | None = None
        self.dead = False
        self.stop_after = stop_after
        self.more = False  # parsing paused by stop_after with bytes left

    @property
    def idle(self) -> bool:
        """No bytes of a frame buffered or expected: a frame boundary."""
        return not self._segs and self._start == self._end and not self.dead

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._segs:
            return self._segs[self._seg][self._seg_pos :]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._buf[:n] = self._buf[self._start : self._end]
        self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if self.dead:
            raise ProtocolError("frame stream already failed")
        out: list[Frame] = []
        self.more = False
        if self._segs:
            self._seg_pos += nbytes
            if self._seg_pos >= len(self._segs[self._seg]):
                self._seg += 1
                self._seg_pos = 0
                self._skip_empty()
            if self._segs and self._seg < len(self._segs):
                return out
            out.append(self._finish_big())
            if out[-1].type in self.stop_after:
                self.more = self._end > self._start
                return out
        else:
            self._end += nbytes
        try:
            self._parse(out)
        except ProtocolError:
            self.dead = True
            raise
        return out

    def _finish_big(self) -> Frame:
        frame = self._big_frame
        assert frame is not None
        if self._big_owned is not None:
            owned = self._big_owned
            frame = frame._replace(
                payload=memoryview(owned) if frame.type == FrameType.DATA else bytes(owned)
            )
        self._segs = []
        self._seg = self._seg_pos = 0
        self._big_frame = None
        self._big_owned = None
        return frame

    def _skip_empty(self) -> None:
        while self._seg < len(self._segs) and len(self._segs[self._seg]) == 0:
            self._seg += 1

    def _parse(self, out: list[Frame]) -> None:
        # The hot loop of both sides: locals instead of attributes, one dict
        # lookup for "known type" and its cap, tuples built without the
        # NamedTuple constructor's Python frame.
        buf, view, end = self._buf, self._view, self._end
        start = self._start
        stop_after = self.stop_after
        unpack = _HDR.unpack_from
        while not self._segs:
            avail = end - start
            if avail < HEADER_SIZE:
                break
            magic, version, ftype, flags, session, seq, length = unpack(buf, start)
            if magic != FRAME_MAGIC:
                raise ProtocolError(f"bad frame magic {magic:#010x}")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"frame version {version} not supported")
            cap = _CAPS.get(ftype)
            if cap is None:
                raise ProtocolError(f"unknown frame type {ftype}")
            if length > cap:
                raise ProtocolError(f"{FrameType(ftype).name} frame of {length} bytes over cap")
            pstart = start + HEADER_SIZE
            if ftype == _DATA_TYPE:
                if length < 8:
                    raise ProtocolError("DATA frame shorter than its offset field")
                if avail < HEADER_SIZE + 8:
                    break
                (offset,) = _DATA_HDR.unpack_from(buf, pstart)
                n = length - 8
                dstart = pstart + 8
                self._start = start  # the sink may raise: leave the reader consistent
                dest = self.sink(session, seq, offset, n) if self.sink is not None else None
                have = min(end - dstart, n)
                if dest is not None:
                    frame = _frame(Frame, (ftype, flags, session, seq, b"", offset, n))
                    self._start = dstart + have
                    complete = self._start_big(dest, view[dstart : dstart + have], frame, None)
                    start, end = self._start, self._end
                    if complete:
                        out.append(frame)
                        continue
                    break
                if have == n:
                    payload = bytes(view[dstart : dstart + n])
                    out.append(_frame(Frame, (ftype, flags, session, seq, payload, offset, n)))
                    start = dstart + n
                    continue
                owned = bytearray(n)
                self._start = dstart + have
                frame = _frame(Frame, (ftype, flags, session, seq, b"", offset, n))
                self._start_big([memoryview(owned)], view[dstart : dstart + have], frame, owned)
                start, end = self._start, self._end
                break
            if avail >= HEADER_SIZE + length:
                payload = bytes(view[pstart : pstart + length])
                out.append(_frame(Frame, (ftype, flags, session, seq, payload, 0, 0)))
                start = pstart + length
                if ftype in stop_after:
                    self.more = end > start
                    break
                continue
            if length > len(buf) - HEADER_SIZE:
                owned = bytearray(length)
                head = view[pstart:end]
                self._start = end
                frame = _frame(Frame, (ftype, flags, session, seq, b"", 0, 0))
                self._start_big([memoryview(owned)], head, frame, owned)
                start, end = self._start, self._end
            break
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _start_big(
        self, segs: list[memoryview], head: memoryview, frame: Frame, owned: bytearray | None
    ) -> bool:
        """Copy the already-buffered ``head`` into ``segs``; if bytes remain,
        receive the rest straight into them. True when the payload is complete."""
        total = sum(v.nbytes for v in segs)  # bytes, also for typed views (cast below)
        expect = frame.data_len if frame.type == FrameType.DATA else total
        if total != expect:
            raise ProtocolError(f"sink gave {total} bytes for a {expect}-byte payload")
        self._segs = [v.cast("B") if v.format != "B" else v for v in segs]
        self._seg = self._seg_pos = 0
        pos = 0
        while pos < len(head):
            seg = self._segs[self._seg]
            k = min(len(seg) - self._seg_pos, len(head) - pos)
            seg[self._seg_pos : self._seg_pos + k] = head[pos : pos + k]
            pos += k
            self._seg_pos += k
            if self._seg_pos == len(seg):
                self._seg += 1
                self._seg_pos = 0
        self._skip_empty()
        self._big_frame = frame
        self._big_owned = owned
        if self._start == self._end:
            self._start = self._end = 0
        if self._seg >= len(self._segs):
            self._segs = []
            self._seg = self._seg_pos = 0
            self._big_frame = None
            self._big_owned = None
            return True
        return False
