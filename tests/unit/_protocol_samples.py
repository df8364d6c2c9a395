"""Shared material for the protocol tests: realistic sample messages, the
golden-file catalogue, construct <-> tuple conversions and hypothesis
strategies *derived from the construct definitions* (STYLE.md habit 7: the
layouts are written once, in vpcie/protocol/; nothing here repeats them).

tests/golden/make_protocol_golden.py writes the golden files from SAMPLES with
construct; the tests compare against the committed files, never regenerate.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import construct as c
from hypothesis import strategies as st

from vpcie.errors import ErrorCode, ProtocolError
from vpcie.protocol import batch, frames
from vpcie.protocol.codes import (
    NO_INDEX,
    PROTOCOL_VERSION,
    ArgKind,
    AuthMode,
    DType,
    ExecutorKind,
    FrameFlag,
    FrameType,
    ModuleKind,
    Opcode,
)

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden" / "protocol"

# -- realistic sample values (FastStruct-shaped tuples, wire order) ------------
_CLIENT_NONCE = bytes(range(0x10, 0x30))
_AGENT_NONCE = bytes(range(0xA0, 0xC0))
_PSK = b"lab-psk-0123456789abcdef"
_CN, _SN = _CLIENT_NONCE, _AGENT_NONCE

QUERY_INFO_VALUES: tuple[Any, ...] = (
    PROTOCOL_VERSION,  # proto_version
    int(ExecutorKind.CPU),
    0,  # flags
    16 << 30,  # mem_total
    15 << 30,  # mem_free
    4 << 30,  # mem_quota
    0,  # mem_used
    16,  # max_inflight
    1 << 20,  # max_batch_bytes
    64,  # max_streams
    0,  # sm_count
    0,  # cc_major
    0,  # cc_minor
    "cpu-numpy (not a GPU)",
    "",
    "agent-gpu01.lab",
)
QUERY_INFO_BYTES = frames.QUERY_INFO.build(
    dict(zip(frames.FAST["QUERY_INFO"].names, QUERY_INFO_VALUES, strict=True))
)

PAYLOAD_SAMPLES: dict[str, tuple[Any, ...]] = {
    "HELLO": (1, PROTOCOL_VERSION, int(AuthMode.PSK), _CLIENT_NONCE, "vpcie-backend vm42"),
    "HELLO_REPLY": (
        PROTOCOL_VERSION,
        int(AuthMode.PSK),
        _AGENT_NONCE,
        frames.psk_mac(_PSK, b"agent", _CN, _SN),
        "agent-gpu01.lab",
    ),
    "AUTH": (frames.psk_mac(_PSK, b"client", _CN, _SN),),
    "AUTH_REPLY": (0,),
    "OPEN": (
        "GPU-5f3c1d2e-0a9b-4c8d-9e7f-123456789abc",
        4 << 30,
        16,
        "vm42/vgpu0",
        2,
        1_000_042,  # lease_token: the pool revision that created the lease
        3,  # nlive: lease_live's count
        [(1_000_017,), (1_000_031,), (1_000_042,)],  # the leases live on the device then
    ),
    "OPEN_REPLY": (0, 7, "granted 4 GiB, 16 in flight", QUERY_INFO_BYTES),
    "CLOSE": (0,),
    "ERROR": (int(ErrorCode.PROTOCOL), 1, "bad frame magic 0x4e4f5045 — closing"),
    "PING": (1_722_000_123_456_789,),
    "DATA_HEADER": (4 << 20,),
    "COMPLETION": (
        int(ErrorCode.OK),
        NO_INDEX,
        "",
        3,
        [(0, 0x10), (2, 0x11), (5, struct.unpack("<Q", struct.pack("<d", 4096.0))[0])],
        b"",
    ),
    "QUERY_INFO": QUERY_INFO_VALUES,
    "INVENTORY_REPLY": (
        b'{"agent": "agent-gpu01.lab", "version": 2, "inventory": {"devices": []}, '
        b'"sessions": {"cpu0": 1}, "fences": {"cpu0": 1000042}, "max_sessions": 64}',
    ),
    "STATE_SUMMARY": (
        2,  # handle_epoch
        0x0A,  # next_index
        3 << 20,  # mem_used
        b"\x09",  # events 0 and 3 recorded
        2,
        [(0x02000001, 1 << 20, 1 << 32), (0x02000003, 2 << 20, (2 << 32) + 7)],
        1,
        [(0x02000002, int(ModuleKind.CUDA_C), "saxpy.cu", 160)],
    ),
}

_F32_2 = struct.unpack("<I", struct.pack("<f", 2.0))[0]
_SAXPY = (
    b'extern "C" __global__ void saxpy(float *x, float *y, float a, unsigned n)\n'
    b"{ unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] += a * x[i]; }\n"
)

BODY_SAMPLES: dict[Opcode, tuple[Any, ...]] = {
    Opcode.NOP: (),
    Opcode.QUERY: (),
    Opcode.MEM_ALLOC: (1 << 20, 0),
    Opcode.MEM_FREE: (0x10,),
    Opcode.COPY_H2D: (0x10, 0, 0, 0, 16384),
    Opcode.COPY_D2H: (0x11, 0, 4096, 16384, 8192),
    Opcode.COPY_D2D: (0x11, 0x10, 0, 512, 1024),
    Opcode.MEMSET: (0x11, 0, 0, 16384),
    Opcode.MODULE_LOAD: (int(ModuleKind.CUDA_C), "saxpy.cu", _SAXPY),
    Opcode.MODULE_FREE: (0x20,),
    Opcode.LAUNCH: (
        0x20,
        16,
        1,
        1,
        256,
        1,
        1,
        0,
        "saxpy",
        4,
        [
            (int(ArgKind.PTR), 0x10, 0),
            (int(ArgKind.PTR), 0x11, 0),
            (int(ArgKind.F32), 0, _F32_2),
            (int(ArgKind.U32), 0, 4096),
        ],
    ),
    Opcode.GEMM: (int(DType.F32), 0, 1, 64, 32, 16, 1.0, 0.5, 0x10, 0x11, 0x12, 0, 256, 0),
    Opcode.AXPY: (int(DType.F64), 0x10, 0x11, 2.5, 1024, 0, 0),
    Opcode.REDUCE_SUM: (int(DType.F32), 0x10, 0x12, 4096, 0, 0),
    Opcode.EVENT_RECORD: (3,),
    Opcode.EVENT_WAIT: (3,),
    Opcode.SYNC: (),
    Opcode.STATE_EXPORT: (),
    Opcode.ALLOC_AT: (0x02000001, 1 << 20, 0),
    Opcode.MODULE_LOAD_AT: (0x02000002, int(ModuleKind.CUDA_C), "saxpy.cu", _SAXPY),
    Opcode.SESSION_RESTORE: (0x0A, b"\x09"),
    Opcode.MODULE_EXPORT: (0x02000002,),
    Opcode.FENCE_PAGE_SET: (0x30, 256),
    Opcode.SIGNAL: (41, 0x31, 512, 256),
}
BODY_STREAMS: dict[Opcode, int] = {Opcode.EVENT_RECORD: 1, Opcode.EVENT_WAIT: 2}
UNKNOWN_OPCODE = 0x0100
UNKNOWN_BODY = b"\xde\xad\xbe\xef future opcode body"

# A typical 4-record batch (also used by the speed test).
TYPICAL_BATCH: list[batch.Record] = [
    batch.rec(Opcode.MEM_ALLOC, *BODY_SAMPLES[Opcode.MEM_ALLOC]),
    batch.rec(Opcode.COPY_H2D, *BODY_SAMPLES[Opcode.COPY_H2D], stream=1),
    batch.rec(Opcode.LAUNCH, *BODY_SAMPLES[Opcode.LAUNCH], stream=1),
    batch.rec(Opcode.COPY_D2H, *BODY_SAMPLES[Opcode.COPY_D2H], stream=1, flags=1),
]


def batch_samples() -> dict[str, tuple[int, list[batch.Record]]]:
    """Golden batch name -> (batch flags, records)."""
    out: dict[str, tuple[int, list[batch.Record]]] = {}
    for op, body in BODY_SAMPLES.items():
        rec = batch.Record(int(op), 0, BODY_STREAMS.get(op, 0), body)
        out[f"batch_{op.name.lower()}"] = (0, [rec])
    out["batch_unknown_opcode"] = (0, [batch.Record(UNKNOWN_OPCODE, 0, 0, UNKNOWN_BODY)])
    out["batch_typical"] = (0, TYPICAL_BATCH)
    out["batch_empty"] = (0, [])
    return out


class FrameSample:
    """A whole tunnel frame: header fields and its payload (by name or raw)."""

    def __init__(
        self, ftype: FrameType, payload: bytes, *, flags: int = 0, session: int = 7, seq: int = 0
    ) -> None:
        self.type, self.payload, self.flags, self.session, self.seq = (
            int(ftype),
            payload,
            flags,
            session,
            seq,
        )


def _build_payload(name: str) -> bytes:
    return build_construct(frames.PAYLOADS[name], PAYLOAD_SAMPLES[name])


def frame_samples() -> dict[str, FrameSample]:
    reply = int(FrameFlag.REPLY)
    command = build_batch_construct(0, TYPICAL_BATCH)
    data = bytes((i * 7) & 0xFF for i in range(300))
    return {
        "frame_hello": FrameSample(FrameType.HELLO, _build_payload("HELLO"), session=0),
        "frame_hello_reply": FrameSample(
            FrameType.HELLO, _build_payload("HELLO_REPLY"), flags=reply, session=0
        ),
        "frame_auth": FrameSample(FrameType.AUTH, _build_payload("AUTH"), session=0),
        "frame_auth_reply": FrameSample(
            FrameType.AUTH, _build_payload("AUTH_REPLY"), flags=reply, session=0
        ),
        "frame_open": FrameSample(FrameType.OPEN, _build_payload("OPEN"), session=0),
        "frame_open_reply": FrameSample(
            FrameType.OPEN, _build_payload("OPEN_REPLY"), flags=reply, session=0
        ),
        "frame_close": FrameSample(FrameType.CLOSE, _build_payload("CLOSE")),
        "frame_command": FrameSample(FrameType.COMMAND, command, seq=41),
        "frame_data": FrameSample(
            FrameType.DATA,
            frames.DATA_HEADER.build({"offset": 8192}) + data,
            flags=int(FrameFlag.LAST),
            seq=41,
        ),
        "frame_completion": FrameSample(FrameType.COMPLETION, _build_payload("COMPLETION"), seq=41),
        "frame_error": FrameSample(FrameType.ERROR, _build_payload("ERROR")),
        "frame_ping": FrameSample(FrameType.PING, _build_payload("PING")),
        "frame_pong": FrameSample(FrameType.PONG, _build_payload("PING")),
        "frame_inventory": FrameSample(FrameType.INVENTORY, b"", session=0),
        "frame_inventory_reply": FrameSample(
            FrameType.INVENTORY, _build_payload("INVENTORY_REPLY"), flags=reply, session=0
        ),
    }


HEADER_SAMPLE: tuple[int, ...] = (
    0x49435056,
    PROTOCOL_VERSION,
    int(FrameType.COMMAND),
    0,
    7,
    41,
    324,
)


def golden_files() -> dict[str, bytes]:
    """Every golden file name (without .bin) -> its bytes, built with construct."""
    out: dict[str, bytes] = {"frame_header": build_construct(frames.HEADER, HEADER_SAMPLE)}
    for name in frames.PAYLOADS:
        out[f"payload_{name.lower()}"] = _build_payload(name)
    for name, (flags, recs) in batch_samples().items():
        out[name] = build_batch_construct(flags, recs)
    for name, fs in frame_samples().items():
        hdr = (0x49435056, PROTOCOL_VERSION, fs.type, fs.flags, fs.session, fs.seq, len(fs.payload))
        out[name] = build_construct(frames.HEADER, hdr) + fs.payload
    return out


def read_golden(name: str) -> bytes:
    return (GOLDEN_DIR / f"{name}.bin").read_bytes()


# -- construct <-> FastStruct-shaped tuples -----------------------------------
def _named(definition: c.Struct) -> list[tuple[str, Any]]:
    return [(m.name, m.subcon) for m in definition.subcons if m.name]


def to_construct(definition: c.Struct, values: tuple[Any, ...]) -> dict[str, Any]:
    """A FastStruct-shaped tuple as the dict construct builds from."""
    out: dict[str, Any] = {}
    for (name, sub), v in zip(_named(definition), values, strict=True):
        if isinstance(sub, c.Array):
            out[name] = [to_construct(sub.subcon, tuple(it)) for it in v]
        else:
            out[name] = v
    return out


def from_construct(definition: c.Struct, obj: Any) -> tuple[Any, ...]:
    out: list[Any] = []
    for name, sub in _named(definition):
        v = obj[name]
        if isinstance(sub, c.Array):
            out.append([from_construct(sub.subcon, it) for it in v])
        else:
            out.append(v)
    return tuple(out)


def build_construct(definition: c.Struct, values: tuple[Any, ...]) -> bytes:
    data: bytes = definition.build(to_construct(definition, values))
    return data


def _record_dict(r: batch.Record) -> dict[str, Any]:
    body_def = batch.BODIES.get(r.opcode)  # type: ignore[call-overload]
    if body_def is None:
        assert isinstance(r.body, bytes)
        body: Any = r.body
        blen = len(r.body)
    else:
        assert isinstance(r.body, tuple)
        body = to_construct(body_def, r.body)
        blen = len(body_def.build(body))
    return dict(
        opcode=r.opcode,
        flags=r.flags,
        length=batch.RECORD_HEADER.sizeof() + blen,
        stream=r.stream,
        body=body,
    )


def build_batch_construct(flags: int, records: list[batch.Record]) -> bytes:
    """BATCH.build from Records: the reference encoder (lengths computed here)."""
    items = [_record_dict(r) for r in records]
    length = batch.BATCH_HEADER.sizeof() + sum(i["length"] for i in items)
    data: bytes = batch.BATCH.build(
        dict(flags=flags, length=length, count=len(items), records=dict(items=items))
    )
    return data


def construct_batch(data: bytes) -> tuple[int, list[batch.Record]]:
    """BATCH.parse as (flags, Records); construct failures become ProtocolError."""
    try:
        obj = batch.BATCH.parse(data)
    except (c.ConstructError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"construct: {exc}") from exc
    recs: list[batch.Record] = []
    for it in obj.records["items"]:
        body_def = batch.BODIES.get(it.opcode)  # type: ignore[call-overload]
        body = it.body if body_def is None else from_construct(body_def, it.body)
        recs.append(batch.Record(it.opcode, it.flags, it.stream, body))
    return obj.flags, recs


def construct_exact(definition: c.Struct) -> Callable[[bytes], tuple[Any, ...]]:
    """construct parse that, like decode_payload, rejects trailing bytes."""
    full = c.Struct(*definition.subcons, c.Terminated)

    def decode(data: bytes) -> tuple[Any, ...]:
        try:
            obj = full.parse(data)
        except (c.ConstructError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"construct: {exc}") from exc
        return from_construct(definition, obj)

    return decode


def canon(v: Any) -> Any:
    """Comparable form: floats by bit pattern (NaN == NaN), containers recursively."""
    if isinstance(v, float):
        return ("f", struct.pack("<d", v)) if math.isnan(v) else v
    if isinstance(v, tuple | list):
        return tuple(canon(x) for x in v)
    if isinstance(v, bytearray | memoryview):
        return bytes(v)
    return v


# -- hypothesis strategies derived from the construct definitions -------------
_INT_RANGES = {
    "B": (0, 0xFF),
    "b": (-0x80, 0x7F),
    "H": (0, 0xFFFF),
    "h": (-0x8000, 0x7FFF),
    "I": (0, 0xFFFFFFFF),
    "i": (-0x80000000, 0x7FFFFFFF),
    "L": (0, 0xFFFFFFFF),
    "l": (-0x80000000, 0x7FFFFFFF),
    "Q": (0, 0xFFFFFFFFFFFFFFFF),
    "q": (-0x8000000000000000, 0x7FFFFFFFFFFFFFFF),
}


def _leaf(sub: Any) -> st.SearchStrategy[Any]:
    if isinstance(sub, c.FormatField):
        ch = sub.fmtstr[-1]
        if ch in _INT_RANGES:
            lo, hi = _INT_RANGES[ch]
            return st.integers(lo, hi)
        if ch == "f":
            return st.floats(width=32)
        if ch == "d":
            return st.floats()
        raise TypeError(f"no strategy for format {sub.fmtstr}")
    if isinstance(sub, c.Bytes) and isinstance(sub.length, int):
        return st.binary(min_size=sub.length, max_size=sub.length)
    if isinstance(sub, c.StringEncoded) and isinstance(sub.subcon, c.Prefixed):
        cap = min(
            40, (1 << (8 * sub.subcon.lengthfield.sizeof())) - 1
        )  # characters; utf8 can take 4 bytes each
        return st.text(max_size=cap).filter(
            lambda s: len(s.encode("utf8")) < (1 << (8 * sub.subcon.lengthfield.sizeof()))
        )
    if isinstance(sub, c.Prefixed):
        return st.binary(max_size=64)
    raise TypeError(f"no strategy for {type(sub).__name__}")


def values_strategy(definition: c.Struct) -> st.SearchStrategy[tuple[Any, ...]]:
    """Random valid values for ``definition``; an Array's count field is set to
    the number of items drawn."""
    named = _named(definition)
    parts: list[st.SearchStrategy[Any]] = []
    fixups: list[tuple[int, int]] = []  # (count index, array index)
    index = {name: i for i, (name, _) in enumerate(named)}
    for i, (_name, sub) in enumerate(named):
        if isinstance(sub, c.Array):
            count_name = repr(sub.count)[6:-2]  # this['nargs']
            fixups.append((index[count_name], i))
            parts.append(st.lists(values_strategy(sub.subcon), max_size=6))
        else:
            parts.append(_leaf(sub))

    def fix(vals: tuple[Any, ...]) -> tuple[Any, ...]:
        out = list(vals)
        for ci, ai in fixups:
            out[ci] = len(out[ai])
        return tuple(out)

    return st.tuples(*parts).map(fix)


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Hostile variants of a valid message: cut, overwrite, insert, extend,
    or overwrite a little-endian length/count-sized word."""
    n = len(data)

    def apply(args: tuple[str, int, int, bytes]) -> bytes:
        how, pos, byte, extra = args
        pos = min(pos, n)
        if how == "cut":
            return data[:pos]
        if how == "set" and pos < n:
            return data[:pos] + bytes([byte]) + data[pos + 1 :]
        if how == "ins":
            return data[:pos] + extra + data[pos:]
        if how == "big":  # a large value where a length prefix may be
            return data[:pos] + b"\xff\xff" + data[pos + 2 :]
        return data + extra

    return st.tuples(
        st.sampled_from(["cut", "set", "ins", "ext", "big"]),
        st.integers(0, max(n, 0)),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=8),
    ).map(apply)


def hostile_bytes(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=96), valid, valid.flatmap(mutations))


def record_strategy() -> st.SearchStrategy[batch.Record]:
    known = st.sampled_from(list(batch.BODIES)).flatmap(
        lambda op: st.builds(
            batch.Record,
            st.just(int(op)),
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFFFFFF),
            values_strategy(batch.BODIES[op]),
        )
    )
    unknown = st.builds(
        batch.Record,
        st.integers(0, 0xFFFF).filter(lambda op: op not in batch.BODIES),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=48),
    )
    return st.one_of(known, unknown)


def truncations(data: bytes) -> Iterator[bytes]:
    for k in range(len(data)):
        yield data[:k]
