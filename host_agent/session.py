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
from host_agent.wire import Buf, Sender
from vpcie.errors import ErrorCode, ProtocolError, VgpuError
from vpcie.protocol.batch import decode_batch
from vpcie.protocol.codes import MAX_DATA_CHUNK, NO_INDEX, FrameFlag, FrameType, Opcode
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
        sock: socket.socket,
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
            while True:
                buf = self.reader.get_buffer()
                try:
                    n = self.sock.recv_into(buf)
                except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
                    reason = "idle"
                    log(
                        "warning", "session_idle", session=self.sid, timeout_s=self.cfg.idle_timeout
                    )
                    return reason
                if n == 0:
                    return reason
                if self._handle_all(self.reader.buffer_updated(n)):
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
        try:
            while True:
                for f in frames:
                    if self._handle(f):
                        return True
                if not self.reader.more:
                    break
                frames = self.reader.buffer_updated(0)
        finally:
            self.flush()
        return False

    def flush(self) -> None:
        if self.replies:
            parts, self.replies = self.replies, []
            self.sender.send(parts)

    def _handle(self, f: Frame) -> bool:
        if f.session != self.sid:
            raise ProtocolError(f"frame for session {f.session} on session {self.sid}")
        t = f.type
        if t == FrameType.DATA:
            self._data(f)
        elif t == FrameType.COMMAND:
            self._command(f)
        elif t == FrameType.PING:
            self.replies.append(
                encode_frame(FrameType.PONG, bytes(f.payload), session=self.sid, seq=f.seq)
            )
        elif t == FrameType.PONG:
            pass
        elif t == FrameType.CLOSE:
            self._close()
            return True
        elif t == FrameType.ERROR:
            raise ProtocolError("client sent ERROR")
        else:
            raise ProtocolError(f"unexpected {FrameType(t).name} frame in a session")
        return False

    # -- COMMAND and its DATA ---------------------------------------------------------
    def _command(self, f: Frame) -> None:
        if self.pending is not None:
            raise ProtocolError(f"COMMAND {f.seq} before the DATA of {self.pending.cmd.seq}")
        if f.seq <= self.last_seq:
            raise ProtocolError(f"COMMAND seq {f.seq} not above {self.last_seq}")
        self.last_seq = f.seq
        records = decode_batch(f.payload)
        lane, h2d_total, d2h_total = scan(records)
        cmd = Command(f.seq, records, lane, h2d_total, d2h_total)
        with self.lock:
            over = self.inflight >= self.cfg.max_inflight
            if not over:
                self.inflight += 1
        if over:
            self._reply_completion(
                f.seq,
                encode_completion(
                    ErrorCode.QUOTA_EXCEEDED,
                    failed_index=NO_INDEX,
                    message=f"more than {self.cfg.max_inflight} commands in flight",
                ),
            )
            if cmd.h2d_total:
                self.pending = _Pending(cmd, None, rejected=True)
            return
        if cmd.h2d_total:
            self.pending = _Pending(cmd, self._landing(cmd))
            return
        self._submit(cmd)

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

    def _submit(self, cmd: Command) -> None:
        if (
            self._idle(cmd.lane)
            and inline_cost(cmd.records, self.ex.synchronous, self.gates) <= INLINE_COST
        ):
            payload = self._execute(
                cmd, self._inline_data(cmd.seq) if cmd.d2h_total else _no_data
            )
            self._reply_completion(cmd.seq, payload)
            with self.lock:
                self.inflight -= 1
            return
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
            payload = self._execute(cmd, self._direct_data(cmd.seq))
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

    def _execute(self, cmd: Command, send_data: DataOut) -> bytes:
        run = BatchRun(self.ex, self.gates, self.cfg.event_wait_timeout, send_data)
        try:
            return run.run(cmd)
        except Exception as exc:  # an executor bug must fail the batch, not the worker
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
        self.replies.append(
            encode_header(FrameType.COMPLETION, len(payload), session=self.sid, seq=seq)
        )
        self.replies.append(payload)

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
