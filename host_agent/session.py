"""One tunnel session in a worker process: the COMMAND/DATA/COMPLETION loop.

Design for speed (docs/PROTOCOL.md "Commands"):

* one blocking reader: ``sock.recv_into(reader.get_buffer())``; every frame of
  one recv is handled before anything is sent, and the replies of that recv
  (completions of cheap batches, PONGs) leave in ONE vectored write;
* H2D DATA lands where it belongs through the FrameReader sink: straight into
  device memory when the stream is idle (CPU executor: the NumPy buffer;
  CuPy: pinned chunks copied asynchronously), else a staging buffer;
* batches that may take long run on per-stream lane threads (the GIL is
  released by NumPy/CuPy), so the reader keeps answering PINGs; a batch naming
  several streams is a barrier ordered against all of them;
* the in-flight limit answers QUOTA_EXCEEDED at once, never stalls.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from dataclasses import dataclass

from host_agent.executors.base import Executor, Landing, Region
from host_agent.logs import log
from host_agent.runner import (
    BARRIER,
    INLINE_COST,
    BatchRun,
    Command,
    DataOut,
    EventGates,
    inline_cost,
    scan,
)
from host_agent.tlsstream import TlsStream
from host_agent.wire import SEQ_LENGTH, Buf, Sender, completion_head
from vpcie.errors import ErrorCode, ProtocolError, VgpuError
from vpcie.protocol.batch import decode_batch
from vpcie.protocol.codes import (
    MAX_DATA_CHUNK,
    MAX_PAYLOAD,
    NO_INDEX,
    FrameFlag,
    FrameType,
    Opcode,
)
from vpcie.protocol.frames import (
    Frame,
    FrameReader,
    data_frame_header,
    encode_completion,
    encode_frame,
    encode_header,
    encode_payload,
)

CLOSE_DRAIN_S = 5.0  # how long CLOSE waits for queued batches before freeing

_COMMAND = int(FrameType.COMMAND)
_DATA = int(FrameType.DATA)
_PING = int(FrameType.PING)
_PONG = int(FrameType.PONG)
_CLOSE = int(FrameType.CLOSE)
_ERROR = int(FrameType.ERROR)
_COMPLETION_CAP = MAX_PAYLOAD[FrameType.COMPLETION]


@dataclass
class SessionConfig:
    session: int
    max_inflight: int
    event_wait_timeout: float = 30.0
    idle_timeout: float = 10.0


@dataclass
class _Pending:
    """A COMMAND whose H2D DATA frames are still arriving."""

    cmd: Command
    landing: Landing | None  # None: discard (rejected or unplaceable)
    rejected: bool = False
    offered: int = 0
    received: int = 0


class Lane:
    """A thread running one stream's batches in order."""

    def __init__(self, session: Session, lane: int) -> None:
        self.session = session
        self.queue: queue.SimpleQueue[tuple[Command, list[threading.Event]] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._loop, name=f"lane-{lane}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            cmd, deps = item
            for dep in deps:
                dep.wait()
            self.session.run_queued(cmd)


class Session:
    def __init__(
        self,
        sock: socket.socket | TlsStream,
        reader: FrameReader,
        executor: Executor,
        config: SessionConfig,
    ) -> None:
        self.sock = sock
        self.reader = reader
        reader.sink = self._sink
        reader.stop_after = frozenset({FrameType.COMMAND})
        self.sender = Sender(sock)
        self.ex = executor
        self.cfg = config
        self.sid = config.session
        self.gates = EventGates()
        self.lock = threading.Lock()
        self.inflight = 0
        self.last_seq = -1
        self.replies: list[Buf] = []
        self.pending: _Pending | None = None
        self.lanes: dict[int, Lane] = {}
        self.lane_last: dict[int, Command] = {}
        self.barrier_last: Command | None = None
        self._scratch = memoryview(bytearray(MAX_DATA_CHUNK))
        self._inline_run = BatchRun(executor, self.gates, config.event_wait_timeout, _no_data)
        self._completion_head = completion_head(self.sid)
        self.closed_by_client = False
        self.broken = False

    # -- the reader loop --------------------------------------------------------
    def serve(self, first_frames: list[Frame] | None = None) -> str:
        """Serve until CLOSE, EOF, silence or a protocol error; returns why."""
        reason = "eof"
        try:
            if first_frames:
                if self._handle_all(first_frames):
                    return "close"
            reader, recv_into, handle_all = self.reader, self.sock.recv_into, self._handle_all
            while True:
                buf = reader.get_buffer()
                try:
                    n = recv_into(buf)
                except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
                    reason = "idle"
                    log(
                        "warning", "session_idle", session=self.sid, timeout_s=self.cfg.idle_timeout
                    )
                    return reason
                if n == 0:
                    return reason
                if handle_all(reader.buffer_updated(n)):
                    return "close"
        except ProtocolError as exc:
            log("warning", "protocol_error", session=self.sid, error=str(exc))
            self._send_error(ErrorCode.PROTOCOL, str(exc))
            return "protocol"
        except OSError as exc:
            log("info", "connection_lost", session=self.sid, error=str(exc))
            return "lost"
        finally:
            self._teardown()

    def _handle_all(self, frames: list[Frame]) -> bool:
        """Handle the frames of one recv, then send their replies at once.

        The reader pauses after each COMMAND (stop_after) so that the DATA
        behind it, even in the same recv, lands straight where it belongs."""
        reader, sid = self.reader, self.sid
        try:
            while True:
                for f in frames:
                    if f.session != sid:
                        raise ProtocolError(f"frame for session {f.session} on session {sid}")
                    if f.type == _COMMAND:  # the hot one: no dispatch chain
                        self._command(f)
                    elif self._handle(f):
                        return True
                if not reader.more:
                    break
                frames = reader.buffer_updated(0)
        finally:
            if self.replies:
                parts, self.replies = self.replies, []
                if self.lanes:
                    self.sender.send(parts)
                else:  # lanes are started by this thread: none can be sending
                    self.sender.send_alone(parts)
        return False

    def flush(self) -> None:
        if self.replies:
            parts, self.replies = self.replies, []
            self.sender.send(parts)

    def _handle(self, f: Frame) -> bool:
        if f.session != self.sid:
            raise ProtocolError(f"frame for session {f.session} on session {self.sid}")
        t = f.type
        if t == _DATA:
            self._data(f)
        elif t == _COMMAND:
            self._command(f)
        elif t == _PING:
            self.replies.append(
                encode_frame(FrameType.PONG, bytes(f.payload), session=self.sid, seq=f.seq)
            )
        elif t == _PONG:
            pass
        elif t == _CLOSE:
            self._close()
            return True
        elif t == _ERROR:
            raise ProtocolError("client sent ERROR")
        else:
            raise ProtocolError(f"unexpected {FrameType(t).name} frame in a session")
        return False

    # -- COMMAND and its DATA ---------------------------------------------------------
    def _command(self, f: Frame) -> None:
        seq = f.seq
        if self.pending is not None:
            raise ProtocolError(f"COMMAND {seq} before the DATA of {self.pending.cmd.seq}")
        if seq <= self.last_seq:
            raise ProtocolError(f"COMMAND seq {seq} not above {self.last_seq}")
        self.last_seq = seq
        records = decode_batch(f.payload)
        lane, h2d_total, d2h_total = scan(records)
        cmd = Command(seq, records, lane, h2d_total, d2h_total)
        # Only this thread adds to ``inflight`` (lanes only take away), so
        # reading it needs no lock; changing it does.
        if self.inflight >= self.cfg.max_inflight:
            self._reply_completion(
                seq,
                encode_completion(
                    ErrorCode.QUOTA_EXCEEDED,
                    failed_index=NO_INDEX,
                    message=f"more than {self.cfg.max_inflight} commands in flight",
                ),
            )
            if h2d_total:
                self.pending = _Pending(cmd, None, rejected=True)
            return
        if (
            not h2d_total
            and ((not self.lane_last and self.barrier_last is None) or self._idle(lane))
            and inline_cost(records, self.ex.synchronous, self.gates) <= INLINE_COST
        ):
            # Runs and completes before this thread reads on: never counted.
            self._run_inline(cmd)
            return
        with self.lock:
            self.inflight += 1
        if h2d_total:
            self.pending = _Pending(cmd, self._landing(cmd))
            return
        self._enqueue(cmd)

    def _landing(self, cmd: Command) -> Landing | None:
        total = cmd.h2d_total
        if total > max(self.ex.limits.mem_quota, MAX_DATA_CHUNK):
            cmd.h2d_error = VgpuError(
                ErrorCode.OUT_OF_RANGE, f"{total} H2D bytes exceed the session quota"
            )
            return None
        if self._direct_ok(cmd):
            try:
                regions: list[Region] = [
                    self.ex.check_range(r.body[0], r.body[2], r.body[4])  # type: ignore[index]
                    for r in cmd.records
                    if r.opcode == Opcode.COPY_H2D
                ]
                landing = self.ex.direct_landing(regions, cmd.lane)
            except VgpuError:
                landing = None  # the batch will fail at that record; stage meanwhile
            if landing is not None:
                cmd.direct = True
                cmd.landing = landing
                return landing
        try:
            cmd.landing = self.ex.staging(total)
        except (MemoryError, VgpuError) as exc:
            cmd.h2d_error = VgpuError(ErrorCode.OUT_OF_MEMORY, f"staging {total} bytes: {exc}")
            return None
        return cmd.landing

    def _direct_ok(self, cmd: Command) -> bool:
        """DATA may land in device memory now only if nothing ordered before
        the copies can still touch memory: the stream is idle and the batch is
        made of COPY_H2D records (resource 0) up to its last one."""
        if cmd.lane == BARRIER or not self._idle(cmd.lane):
            return False
        last_h2d = max(i for i, r in enumerate(cmd.records) if r.opcode == Opcode.COPY_H2D)
        return all(
            r.opcode == Opcode.COPY_H2D and isinstance(r.body, tuple) and r.body[1] == 0
            for r in cmd.records[: last_h2d + 1]
        )

    def _sink(self, session: int, seq: int, offset: int, n: int) -> list[memoryview] | None:
        """Where a DATA payload lands. The reader may parse a DATA header in
        the same recv as its COMMAND, before the COMMAND is handled: then there
        is no landing yet and the payload comes as bytes (copied in _data)."""
        p = self.pending
        if p is None or seq != p.cmd.seq or session != self.sid:
            return None
        self._check_data(p, offset, n)
        if p.landing is None:
            return [self._scratch[:n]]
        return p.landing.views(offset, n)

    @staticmethod
    def _check_data(p: _Pending, offset: int, n: int) -> None:
        if offset != p.offered or n > p.cmd.h2d_total - p.offered:
            raise ProtocolError(
                f"DATA [{offset}, +{n}) out of order (expected {p.offered} of {p.cmd.h2d_total})"
            )
        p.offered += n

    def _data(self, f: Frame) -> None:
        p = self.pending
        if p is None or f.seq != p.cmd.seq:
            raise ProtocolError(f"DATA for seq {f.seq} without its COMMAND")
        if f.data_len and len(f.payload):  # not sunk: arrived with its COMMAND
            self._check_data(p, f.data_offset, f.data_len)
            if p.landing is not None:
                src = memoryview(f.payload)
                pos = 0
                for view in p.landing.views(f.data_offset, f.data_len):
                    view[:] = src[pos : pos + len(view)]
                    pos += len(view)
        p.received += f.data_len
        if p.landing is not None:
            p.landing.chunk_done(f.data_offset, f.data_len)
        last = bool(f.flags & FrameFlag.LAST)
        if p.received < p.cmd.h2d_total:
            if last:
                raise ProtocolError(f"LAST DATA after {p.received} of {p.cmd.h2d_total} bytes")
            return
        if not last:
            raise ProtocolError("the DATA frame completing a copy stream lacks LAST")
        self.pending = None
        if p.landing is not None:
            p.landing.finish()
        if not p.rejected:
            self._submit(p.cmd)

    # -- scheduling -----------------------------------------------------------------
    def _idle(self, lane: int) -> bool:
        if self.barrier_last is not None and not self.barrier_last.done.is_set():
            return False
        if lane == BARRIER:
            return all(c.done.is_set() for c in self.lane_last.values())
        last = self.lane_last.get(lane)
        return last is None or last.done.is_set()

    def _run_inline(self, cmd: Command) -> None:
        # One BatchRun serves every inline batch: they run one at a time, here.
        run = self._inline_run
        seq = cmd.seq
        run.send_data = self._inline_data(seq) if cmd.d2h_total else _no_data
        try:
            payload = run.run(cmd)
        except Exception as exc:  # an executor bug must fail the batch, not the worker
            payload = self._crashed(cmd, exc)
        n = len(payload)
        if n > _COMPLETION_CAP:  # raises the same error as encode_header
            encode_header(FrameType.COMPLETION, n, session=self.sid, seq=seq)
        replies = self.replies  # as _reply_completion, one call less
        replies.append(self._completion_head + SEQ_LENGTH.pack(seq, n))
        replies.append(payload)

    def _submit(self, cmd: Command) -> None:
        """Run or queue a counted batch (its DATA has all arrived)."""
        if (
            self._idle(cmd.lane)
            and inline_cost(cmd.records, self.ex.synchronous, self.gates) <= INLINE_COST
        ):
            self._run_inline(cmd)
            with self.lock:
                self.inflight -= 1
            return
        self._enqueue(cmd)

    def _enqueue(self, cmd: Command) -> None:
        # Replies of earlier inline batches of this stream must go out first.
        self.flush()
        cmd.done = threading.Event()
        deps: list[threading.Event] = []
        if cmd.lane == BARRIER:
            deps = [c.done for c in self.lane_last.values()]
            if self.barrier_last is not None:
                deps.append(self.barrier_last.done)
            self.barrier_last = cmd
        else:
            if self.barrier_last is not None and not self.barrier_last.done.is_set():
                deps.append(self.barrier_last.done)
            self.lane_last[cmd.lane] = cmd
        lane = self.lanes.get(cmd.lane)
        if lane is None:
            lane = self.lanes[cmd.lane] = Lane(self, cmd.lane)
        lane.queue.put((cmd, deps))

    def run_queued(self, cmd: Command) -> None:
        """Run a batch on its lane thread and send its completion."""
        try:
            run = BatchRun(
                self.ex, self.gates, self.cfg.event_wait_timeout, self._direct_data(cmd.seq)
            )
            try:
                payload = run.run(cmd)
            except Exception as exc:  # an executor bug must fail the batch, not the worker
                payload = self._crashed(cmd, exc)
            self.sender.send(
                [
                    encode_header(
                        FrameType.COMPLETION, len(payload), session=self.sid, seq=cmd.seq
                    ),
                    payload,
                ]
            )
        except OSError as exc:
            self.broken = True
            log("info", "send_failed", session=self.sid, error=str(exc))
        finally:
            with self.lock:
                self.inflight -= 1
            cmd.done.set()

    def _crashed(self, cmd: Command, exc: Exception) -> bytes:
        log("error", "batch_crashed", session=self.sid, seq=cmd.seq, error=repr(exc))
        return encode_completion(
            ErrorCode.INTERNAL, failed_index=NO_INDEX, message=f"internal error: {exc!r}"[:500]
        )

    def _inline_data(self, seq: int) -> DataOut:
        def send(offset: int, view: memoryview, last: bool) -> None:
            self.replies.append(data_frame_header(self.sid, seq, offset, len(view), last=last))
            self.replies.append(bytes(view))  # later frames of this recv may change it

        return send

    def _direct_data(self, seq: int) -> DataOut:
        def send(offset: int, view: memoryview, last: bool) -> None:
            hdr = data_frame_header(self.sid, seq, offset, len(view), last=last)
            self.sender.send([hdr, view])

        return send

    def _reply_completion(self, seq: int, payload: bytes) -> None:
        n = len(payload)
        if n > _COMPLETION_CAP:  # raises the same error as encode_header
            encode_header(FrameType.COMPLETION, n, session=self.sid, seq=seq)
        replies = self.replies
        replies.append(self._completion_head + SEQ_LENGTH.pack(seq, n))
        replies.append(payload)

    # -- ending -----------------------------------------------------------------------
    def _drain(self, timeout: float) -> None:
        waits = [c.done for c in self.lane_last.values()]
        if self.barrier_last is not None:
            waits.append(self.barrier_last.done)
        for ev in waits:
            ev.wait(timeout)

    def _close(self) -> None:
        self.closed_by_client = True
        self.flush()
        self._drain(CLOSE_DRAIN_S)
        payload = encode_payload("CLOSE", 0)  # CLOSE|REPLY{0}
        self.sender.send(
            [encode_frame(FrameType.CLOSE, payload, session=self.sid, flags=FrameFlag.REPLY)]
        )

    def _send_error(self, code: ErrorCode, message: str) -> None:
        try:
            self.replies = []
            payload = encode_payload("ERROR", int(code), 1, message[:1000])
            self.sender.send([encode_frame(FrameType.ERROR, payload, session=self.sid)])
        except OSError:
            pass

    def _teardown(self) -> None:
        self.gates.closing.set()
        for lane in self.lanes.values():
            lane.queue.put(None)
        for lane in self.lanes.values():
            lane.thread.join(CLOSE_DRAIN_S)
        self.ex.close()


def _no_data(offset: int, view: memoryview, last: bool) -> None:
    raise AssertionError("a batch without D2H bytes sent DATA")
