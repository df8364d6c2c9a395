"""What comes back from the agent: a command's Completion, QUERY_INFO and a
STATE_SUMMARY.

Decoded from the frames of docs/PROTOCOL.md ("Commands", "QUERY_INFO") with
the codecs derived from vpcie/protocol/frames.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import NO_INDEX, ExecutorKind
from vpcie.protocol.frames import decode_payload

_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """A decoded QUERY_INFO (docs/PROTOCOL.md "QUERY_INFO")."""

    proto_version: int
    executor: ExecutorKind
    flags: int
    mem_total: int
    mem_free: int
    mem_quota: int
    mem_used: int
    max_inflight: int
    max_batch_bytes: int
    max_streams: int
    sm_count: int
    cc_major: int
    cc_minor: int
    name: str
    uuid: str
    agent: str

    @classmethod
    def decode(cls, blob: bytes | memoryview) -> QueryInfo:
        """ProtocolError if ``blob`` is not exactly one QUERY_INFO."""
        v = decode_payload("QUERY_INFO", blob)
        try:
            executor = ExecutorKind(v[1])
        except ValueError:
            executor = ExecutorKind.NONE
        return cls(v[0], executor, *v[2:])

    @property
    def is_gpu(self) -> bool:
        return self.executor is ExecutorKind.CUDA

    def describe(self) -> str:
        kind = {
            ExecutorKind.CPU: "CPU executor (NumPy) - not a GPU",
            ExecutorKind.CUDA: f"CUDA GPU, cc {self.cc_major}.{self.cc_minor}, {self.sm_count} SMs",
            ExecutorKind.NONE: "no device bound",
        }[self.executor]
        return f"{self.name} [{kind}] on agent {self.agent!r}"


@dataclass(frozen=True, slots=True)
class ModuleState:
    """A loaded module as STATE_EXPORT lists it (MODULE_EXPORT gives its code)."""

    handle: int
    kind: int  # ModuleKind
    name: str
    code_size: int


@dataclass(frozen=True, slots=True)
class StateSummary:
    """A decoded STATE_SUMMARY (docs/PROTOCOL.md "Session state"): what a
    session holds, without the contents."""

    handle_epoch: int
    next_index: int
    mem_used: int
    events_set: bytes  # bitmap, bit i (LSB first) = event i recorded; SESSION_RESTORE takes it
    buffers: tuple[tuple[int, int], ...]  # (handle, size), by handle
    modules: tuple[ModuleState, ...]
    gens: tuple[int, ...] = ()  # each buffer's write generation, as ``buffers``

    @classmethod
    def decode(cls, blob: bytes | memoryview) -> StateSummary:
        """ProtocolError if ``blob`` is not exactly one STATE_SUMMARY."""
        epoch, nxt, used, events, _nb, bufs, _nm, mods = decode_payload("STATE_SUMMARY", blob)
        return cls(
            epoch,
            nxt,
            used,
            bytes(events),
            tuple((h, n) for h, n, _g in bufs),
            tuple(ModuleState(*m) for m in mods),
            tuple(g for _h, _n, g in bufs),
        )

    @property
    def state_bytes(self) -> int:
        """Bytes of device memory whose contents move."""
        return sum(n for _h, n in self.buffers)


@dataclass(slots=True)
class Completion:
    """The outcome of one COMMAND.

    ``status`` is OK or the error of record ``failed_index`` (earlier records
    took effect). A tunnel failure completes every in-flight command with
    DEVICE_LOST. ``results`` maps record index -> u64 value.
    """

    status: ErrorCode
    failed_index: int = NO_INDEX
    message: str = ""
    results: dict[int, int] = field(default_factory=dict)
    blob: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status is ErrorCode.OK

    def check(self) -> Completion:
        """Raise VgpuError unless OK; returns self for chaining."""
        if self.status is not ErrorCode.OK:
            index = -1 if self.failed_index == NO_INDEX else self.failed_index
            raise VgpuError(self.status, self.message, index)
        return self

    def value(self, index: int = 0) -> int:
        """The u64 result of record ``index`` (e.g. MEM_ALLOC's handle)."""
        self.check()
        try:
            return self.results[index]
        except KeyError:
            raise VgpuError(
                ErrorCode.PROTOCOL, f"the agent returned no value for record {index}"
            ) from None

    def value_f64(self, index: int = 0) -> float:
        """A result carrying f64 bits (REDUCE_SUM)."""
        (out,) = _F64.unpack(_U64.pack(self.value(index)))
        return float(out)

    @classmethod
    def lost(cls, message: str) -> Completion:
        return cls(ErrorCode.DEVICE_LOST, NO_INDEX, message)


def error_code(value: int) -> ErrorCode:
    """ErrorCode of a wire value; a code this client does not know is INTERNAL."""
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL
