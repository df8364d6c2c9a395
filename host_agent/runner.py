"""Runs one vGPU batch on an executor: the executor-neutral half of a session.

Records run in order; the first failing record stops the batch and names
itself in the completion (docs/PROTOCOL.md "Commands"). This module checks
every field a client controls (opcode, stream, dtype, sizes, alignment)
before calling the executor, which checks handles and ranges.

The EVENT_WAIT gate lives here (``EventGates``): a wait on an event that no
EVENT_RECORD has reached yet holds its stream, host side, until one does or
``event_wait_timeout`` passes (TIMEOUT).

Every record that may write a buffer adds 1 to its write generation
(``Buffer.gen``) once the write is done or queued, failed or not: live
migration's pre-copy recopies exactly the buffers whose gen moved
(docs/PROTOCOL.md "Session state"). That add is the whole per-record cost.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from host_agent import state_ops
from host_agent.executors.base import Executor, Landing, Region
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.batch import Record
from vpcie.protocol.codes import (
    ALL_STREAMS,
    DTYPE_SIZE,
    MAX_DATA_CHUNK,
    MAX_EVENTS,
    MAX_LAUNCH_ARGS,
    MAX_STREAMS,
    NO_INDEX,
    ArgKind,
    DType,
    ModuleKind,
    Opcode,
)
from vpcie.protocol.frames import encode_completion

INLINE_COST = 1 << 20  # bytes touched by a batch cheap enough to run in the reader
INLINE_D2H = 256 * 1024  # D2H bytes copied into the reply of an inline batch
INLINE_GEMM_MNK = 1 << 18  # m*n*k of a GEMM cheap enough to run inline
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
MAX_DIM = 1 << 20  # grid/block extent cap (CUDA's own limits are lower)

Body = tuple[Any, ...]  # a decoded record body, in batch.BODIES field order
DataOut = Callable[[int, memoryview, bool], None]
"""send_data(offset in the D2H stream, bytes, last)"""


def f64_bits(x: float) -> int:
    value: int = _U64.unpack(_F64.pack(x))[0]
    return value


class EventGates:
    """Host-side gates for EVENT_WAIT: set when an EVENT_RECORD has run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[int, threading.Event] = {}
        self.closing = threading.Event()

    def _gate(self, event: int) -> threading.Event:
        with self._lock:
            gate = self._gates.get(event)
            if gate is None:
                gate = self._gates[event] = threading.Event()
            return gate

    def set(self, event: int) -> None:
        self._gate(event).set()

    def recorded(self) -> list[int]:
        """The events some EVENT_RECORD (or SESSION_RESTORE) has reached."""
        with self._lock:
            return sorted(e for e, gate in self._gates.items() if gate.is_set())

    def is_set(self, event: int) -> bool:
        return self._gate(event).is_set()

    def wait(self, event: int, timeout: float) -> None:
        gate = self._gate(event)
        deadline = time.monotonic() + timeout
        while not gate.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise VgpuError(
                    ErrorCode.TIMEOUT, f"event {event} not recorded within {timeout:g} s"
                )
            if self.closing.is_set():
                raise VgpuError(ErrorCode.DEVICE_LOST, "session closing")
            gate.wait(min(left, 0.1))


_ALREADY_DONE = threading.Event()
_ALREADY_DONE.set()


@dataclass(slots=True)
class Command:
    """A received COMMAND: its records and where its copy streams go."""

    seq: int
    records: list[Record]
    lane: int  # stream id, or BARRIER
    h2d_total: int = 0
    d2h_total: int = 0
    landing: Landing | None = None  # where H2D bytes went (None: none/discarded)
    direct: bool = False  # H2D bytes already landed in device memory
    h2d_error: VgpuError | None = None  # why H2D bytes could not be taken
    # Set when the batch has run. Inline batches never wait in a lane, so they
    # share one already-set Event; _submit gives queued ones their own.
    done: threading.Event = _ALREADY_DONE


BARRIER = -1
_OK_EMPTY = encode_completion(ErrorCode.OK, failed_index=NO_INDEX)


def stream_total(records: list[Record], opcode: Opcode) -> int:
    total = 0
    for r in records:
        if r.opcode == opcode and isinstance(r.body, tuple) and r.body[1] == 0:
            total += r.body[4]
    return total


def lane_of(records: list[Record]) -> int:
    """The stream a batch runs on; a batch naming several streams (or SYNC of
    all streams) is a barrier ordered after and before everything."""
    streams = {r.stream for r in records}
    if len(streams) == 1:
        (s,) = streams
        if s < MAX_STREAMS:
            return s
    return 0 if not streams else BARRIER


# Plain ints for the per-record dispatch (an IntEnum attribute costs a lookup
# and a slower compare on every record of every batch).
_H2D = int(Opcode.COPY_H2D)
_D2H = int(Opcode.COPY_D2H)
_D2D = int(Opcode.COPY_D2D)
_MEMSET = int(Opcode.MEMSET)
_MODULE_LOAD = int(Opcode.MODULE_LOAD)
_GEMM = int(Opcode.GEMM)
_AXPY = int(Opcode.AXPY)
_REDUCE_SUM = int(Opcode.REDUCE_SUM)
_EVENT_WAIT = int(Opcode.EVENT_WAIT)
_SYNC = int(Opcode.SYNC)
_MODULE_LOAD_AT = int(Opcode.MODULE_LOAD_AT)
_STATE_EXPORT = int(Opcode.STATE_EXPORT)
# The opcodes inline_cost looks at; every other one costs nothing.
_COSTED = frozenset(
    {
        _H2D, _D2D, _MEMSET, _D2H, _GEMM, _AXPY, _REDUCE_SUM, _EVENT_WAIT, _SYNC,
        _MODULE_LOAD, _MODULE_LOAD_AT, _STATE_EXPORT,
    }
)  # fmt: skip


def scan(records: list[Record]) -> tuple[int, int, int]:
    """(lane, H2D bytes, D2H bytes) of a batch in one pass (the hot path of
    every COMMAND); the same answers as lane_of and stream_total."""
    h2d = d2h = 0
    first = -1
    mixed = False
    for op, _flags, s, body in records:
        if first < 0:
            first = s
        elif s != first:
            mixed = True
        if op == _H2D or op == _D2H:
            if isinstance(body, tuple) and body[1] == 0:
                if op == _H2D:
                    h2d += body[4]
                else:
                    d2h += body[4]
    if first < 0:
        return 0, h2d, d2h
    lane = first if not mixed and first < MAX_STREAMS else BARRIER
    return lane, h2d, d2h


def inline_cost(records: list[Record], executor_synchronous: bool, gates: EventGates) -> int:
    """Rough bytes touched; INLINE_COST + 1 for anything that may block."""
    cost = 0
    block = INLINE_COST + 1
    for op, _flags, _stream, body in records:
        if op not in _COSTED or not isinstance(body, tuple):
            continue  # NOP, QUERY, allocations, ...: nothing to touch
        if op == _H2D or op == _D2D:
            cost += body[4]
        elif op == _MEMSET:
            cost += body[3]
        elif op == _D2H:
            if body[4] > INLINE_D2H:
                return block
            cost += body[4]
        elif op == _GEMM:
            if body[3] * body[4] * body[5] > INLINE_GEMM_MNK:
                return block
            cost += 4 * (body[3] * body[5] + body[5] * body[4] + body[3] * body[4])
        elif op == _AXPY:
            cost += 8 * body[4]
        elif op == _REDUCE_SUM:
            cost += 8 * body[3]
        elif op == _EVENT_WAIT:
            if not gates.is_set(body[0]):
                return block
        elif not executor_synchronous:  # SYNC, STATE_EXPORT, MODULE_LOAD(_AT): wait, compile
            return block
        if cost > INLINE_COST:
            return block
    return cost


def _dtype(value: int, executor: Executor) -> DType:
    try:
        dt = DType(value)
    except ValueError:
        raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"unknown dtype {value}") from None
    if dt not in executor.dtypes:
        raise VgpuError(ErrorCode.NOT_SUPPORTED, f"dtype {dt.name} on {executor.name}")
    return dt


class BatchRun:
    """Executes one Command; ``completion()`` gives the COMPLETION payload."""

    def __init__(
        self,
        executor: Executor,
        gates: EventGates,
        event_wait_timeout: float,
        send_data: DataOut,
    ) -> None:
        self.ex = executor
        self.gates = gates
        self.event_wait_timeout = event_wait_timeout
        self.send_data = send_data

    def run(self, cmd: Command) -> bytes:
        results: list[tuple[int, int]] = []
        blob = b""
        self._h2d_pos = 0
        self._d2h_pos = 0
        self._cmd = cmd
        for i, r in enumerate(cmd.records):
            try:
                out = self._record(r)
            except VgpuError as exc:
                return encode_completion(
                    exc.code, failed_index=i, message=exc.message[:1000], results=results, blob=blob
                )
            if isinstance(out, bytes):
                blob = out
            elif out is not None:
                results.append((i, out))
        if not results and not blob:
            return _OK_EMPTY
        return encode_completion(ErrorCode.OK, failed_index=NO_INDEX, results=results, blob=blob)

    # One method per opcode keeps each check next to its use; OPCODES maps
    # the opcode to it (a dict lookup instead of an if-chain).
    def _record(self, r: Record) -> int | bytes | None:
        op, _flags, s, body = r
        if s >= MAX_STREAMS and not (op == _SYNC and s == ALL_STREAMS):
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"stream {s} >= {MAX_STREAMS}")
        if not isinstance(body, tuple):
            raise VgpuError(ErrorCode.NOT_SUPPORTED, f"unknown opcode {op}")
        run = _DISPATCH.get(op)
        if run is None:  # backend-local (FENCE_PAGE_SET, SIGNAL): never sent here
            raise VgpuError(ErrorCode.NOT_SUPPORTED, f"opcode {op}")
        return run(self, body, s)

    def _nop(self, body: Body, s: int) -> None:
        return None

    def _query(self, body: Body, s: int) -> bytes:
        return self.ex.query_info()

    def _mem_alloc(self, body: Body, s: int) -> int:
        return self.ex.mem_alloc(body[0], body[1])

    def _mem_free(self, body: Body, s: int) -> None:
        self.ex.mem_free(body[0])

    def _copy_d2d(self, body: Body, s: int) -> None:
        ex = self.ex
        dst_h, src_h, dst_off, src_off, size = body
        dst = ex.check_range(dst_h, dst_off, size)
        try:
            ex.copy_d2d(dst, ex.check_range(src_h, src_off, size), s)
        finally:  # write generation: after the write (or its queueing), failed or not
            dst.buf.gen += 1

    def _memset(self, body: Body, s: int) -> None:
        ex = self.ex
        handle, value, offset, size = body
        if value > 0xFF:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"MEMSET value {value} is not a byte")
        dst = ex.check_range(handle, offset, size)
        try:
            ex.memset(dst, value, s)
        finally:
            dst.buf.gen += 1

    def _module_load(self, body: Body, s: int) -> int:
        kind, name, code = body
        if kind not in tuple(ModuleKind):
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"unknown module kind {kind}")
        return self.ex.load_module(kind, name, code)

    def _module_free(self, body: Body, s: int) -> None:
        self.ex.module_free(body[0])

    # -- session state (live migration; docs/PROTOCOL.md "Session state") --------
    def _state_export(self, body: Body, s: int) -> bytes:
        # The gens first, then every stream's device work done (a GPU runs
        # batches after their completion was sent): a write counted in these
        # gens was queued before the sync, so it is in the contents copied
        # next; one still running on another stream's lane counts after.
        gens = state_ops.gens(self.ex)
        self.ex.sync(None)
        return state_ops.summary(self.ex, self.gates.recorded(), gens)

    def _module_export(self, body: Body, s: int) -> bytes:
        return self.ex.module_code(body[0])

    def _alloc_at(self, body: Body, s: int) -> int:
        handle, size, flags = body
        return self.ex.mem_alloc_at(handle, size, flags)

    def _module_load_at(self, body: Body, s: int) -> int:
        handle, kind, name, code = body
        if kind not in tuple(ModuleKind):
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"unknown module kind {kind}")
        return self.ex.load_module(kind, name, code, handle)

    def _session_restore(self, body: Body, s: int) -> None:
        next_index, bits = body
        events = state_ops.bitmap_events(bits)  # checked before anything changes
        self.ex.restore_next_index(next_index)
        for e in events:  # recorded-and-complete: a wait on it passes at once
            self.gates.set(e)

    def _axpy(self, body: Body, s: int) -> None:
        ex = self.ex
        dt = _dtype(body[0], ex)
        x_h, y_h, alpha, n, x_off, y_off = body[1:]
        isz = DTYPE_SIZE[dt]
        x = ex.check_range(x_h, x_off, n * isz, isz)
        y = ex.check_range(y_h, y_off, n * isz, isz)
        try:
            ex.axpy(dt, alpha, x, y, s)
        finally:
            y.buf.gen += 1

    def _reduce_sum(self, body: Body, s: int) -> int:
        ex = self.ex
        dt = _dtype(body[0], ex)
        x_h, out_h, n, x_off, out_off = body[1:]
        isz = DTYPE_SIZE[dt]
        x = ex.check_range(x_h, x_off, n * isz, isz)
        out = ex.check_range(out_h, out_off, isz, isz) if out_h else None
        try:
            return f64_bits(ex.reduce_sum(dt, x, out, s))
        finally:
            if out is not None:
                out.buf.gen += 1

    def _event_record(self, body: Body, s: int) -> None:
        self._check_event(body[0])
        self.ex.event_record(body[0], s)
        self.gates.set(body[0])

    def _event_wait(self, body: Body, s: int) -> None:
        self._check_event(body[0])
        self.gates.wait(body[0], self.event_wait_timeout)
        self.ex.event_wait(body[0], s)

    def _sync(self, body: Body, s: int) -> None:
        self.ex.sync(None if s == ALL_STREAMS else s)

    @staticmethod
    def _check_event(event: int) -> None:
        if event >= MAX_EVENTS:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"event {event} >= {MAX_EVENTS}")

    def _copy_h2d(self, body: Body, stream: int) -> None:
        handle, resource, dev_off, _host_off, size = body
        if resource != 0:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, "guest resources are not reachable here")
        region = self.ex.check_range(handle, dev_off, size)
        cmd = self._cmd
        pos = self._h2d_pos
        self._h2d_pos += size
        buf = region.buf
        try:
            if cmd.h2d_error is not None:
                raise cmd.h2d_error
            if cmd.direct or size == 0:
                return None  # the DATA frames already landed in device memory
            assert cmd.landing is not None
            for view in cmd.landing.views(pos, size):
                self.ex.copy_h2d(Region(buf, region.offset, len(view)), view, stream)
                region = Region(buf, region.offset + len(view), region.size - len(view))
            return None
        finally:
            # Counted also when the bytes landed before this record ran
            # (direct): they never land after it.
            buf.gen += 1

    def _copy_d2h(self, body: Body, stream: int) -> None:
        handle, resource, dev_off, _host_off, size = body
        if resource != 0:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, "guest resources are not reachable here")
        region = self.ex.check_range(handle, dev_off, size)
        total = self._cmd.d2h_total
        for chunk in self.ex.d2h_chunks(region, MAX_DATA_CHUNK, stream):
            pos = self._d2h_pos
            self._d2h_pos = pos + len(chunk)
            self.send_data(pos, chunk, self._d2h_pos == total)
        return None

    def _gemm(self, body: Body, stream: int) -> None:
        ex = self.ex
        dt = _dtype(body[0], ex)
        ta, tb, m, n, k = body[1:6]
        alpha, beta = body[6], body[7]
        a_h, b_h, c_h, a_off, b_off, c_off = body[8:]
        if ta > 1 or tb > 1:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, "trans_a/trans_b must be 0 or 1")
        isz = DTYPE_SIZE[dt]
        a = ex.check_range(a_h, a_off, m * k * isz, isz)
        b = ex.check_range(b_h, b_off, k * n * isz, isz)
        c = ex.check_range(c_h, c_off, m * n * isz, isz)
        try:
            if m and n:
                ex.gemm(dt, bool(ta), bool(tb), m, n, k, alpha, beta, a, b, c, stream)
        finally:
            c.buf.gen += 1
        return None

    def _launch(self, body: Body, stream: int) -> None:
        module, gx, gy, gz, bx, by, bz, shared, kernel, nargs, args = body
        assert isinstance(module, int) and isinstance(kernel, str) and isinstance(args, list)
        dims = (gx, gy, gz, bx, by, bz)
        if not all(isinstance(d, int) and 1 <= d <= MAX_DIM for d in dims):
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"grid/block {dims} out of range")
        if len(args) > MAX_LAUNCH_ARGS:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"{nargs} args > {MAX_LAUNCH_ARGS}")
        checked: list[tuple[int, int, Region | None]] = []
        for kind, handle, value in args:
            if kind == ArgKind.PTR:
                checked.append((kind, value, self.ex.check_range(handle, value, 0)))
            elif kind in tuple(ArgKind):
                checked.append((kind, value, None))
            else:
                raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"unknown argument kind {kind}")
        grid = (int(gx), int(gy), int(gz))  # type: ignore[call-overload]
        block = (int(bx), int(by), int(bz))  # type: ignore[call-overload]
        try:
            self.ex.launch(module, kernel, grid, block, int(shared), checked, stream)  # type: ignore[call-overload]
        finally:
            for _kind, _value, region in checked:  # a kernel may write any buffer it is given
                if region is not None:
                    region.buf.gen += 1
        return None


class OpEntry(NamedTuple):
    """How the agent runs one opcode: the BatchRun method that checks the
    record's fields, and the Executor method it ends in (None: no device work)."""

    run: Callable[[BatchRun, Body, int], int | bytes | None]
    executor: str | None


# Every opcode an agent runs. Adding one: its body in vpcie/protocol/batch.py
# (+ Opcode in codes.py), an entry here with its BatchRun method, and the
# Executor method (base default NOT_SUPPORTED; CPU and CUDA override what they
# can). tests/unit/test_opcode_walk.py checks all of them line up.
OPCODES: dict[Opcode, OpEntry] = {
    Opcode.NOP: OpEntry(BatchRun._nop, None),
    Opcode.QUERY: OpEntry(BatchRun._query, "query_info"),
    Opcode.MEM_ALLOC: OpEntry(BatchRun._mem_alloc, "mem_alloc"),
    Opcode.MEM_FREE: OpEntry(BatchRun._mem_free, "mem_free"),
    Opcode.COPY_H2D: OpEntry(BatchRun._copy_h2d, "copy_h2d"),
    Opcode.COPY_D2H: OpEntry(BatchRun._copy_d2h, "d2h_chunks"),
    Opcode.COPY_D2D: OpEntry(BatchRun._copy_d2d, "copy_d2d"),
    Opcode.MEMSET: OpEntry(BatchRun._memset, "memset"),
    Opcode.MODULE_LOAD: OpEntry(BatchRun._module_load, "module_load"),
    Opcode.MODULE_FREE: OpEntry(BatchRun._module_free, "module_free"),
    Opcode.LAUNCH: OpEntry(BatchRun._launch, "launch"),
    Opcode.GEMM: OpEntry(BatchRun._gemm, "gemm"),
    Opcode.AXPY: OpEntry(BatchRun._axpy, "axpy"),
    Opcode.REDUCE_SUM: OpEntry(BatchRun._reduce_sum, "reduce_sum"),
    Opcode.EVENT_RECORD: OpEntry(BatchRun._event_record, "event_record"),
    Opcode.EVENT_WAIT: OpEntry(BatchRun._event_wait, "event_wait"),
    Opcode.SYNC: OpEntry(BatchRun._sync, "sync"),
    Opcode.STATE_EXPORT: OpEntry(BatchRun._state_export, "sync"),  # then bookkeeping
    Opcode.ALLOC_AT: OpEntry(BatchRun._alloc_at, "mem_alloc_at"),
    # MODULE_LOAD_AT compiles on this device: the executor's own module_load.
    Opcode.MODULE_LOAD_AT: OpEntry(BatchRun._module_load_at, "module_load"),
    Opcode.SESSION_RESTORE: OpEntry(BatchRun._session_restore, "restore_next_index"),
    Opcode.MODULE_EXPORT: OpEntry(BatchRun._module_export, "module_code"),
}
# Plain int keys for the per-record lookup (an IntEnum hashes and compares slower).
_DISPATCH: dict[int, Callable[[BatchRun, Body, int], int | bytes | None]] = {
    int(op): entry.run for op, entry in OPCODES.items()
}
