"""TunnelClient: the backend's side of the link to a host agent (asyncio).

Follows docs/PROTOCOL.md. The client is an ``asyncio.BufferedProtocol`` over
a plain TCP or TLS transport, decoding with the sans-IO
``vpcie.protocol.frames.FrameReader``: D2H DATA payloads are received straight
into the caller's scatter list (``sink``), H2D payloads are written from the
caller's views (frame header + segment views, never joined into one object).

Hot-path choices (measured with benchmarks/tunnel.py):
- a lone command is written at once; with several in flight, the small
  frames of one loop iteration leave in one ``transport.write`` (a
  ``call_soon`` flush): -3 µs a round trip, same pipelined rate;
- ``send()`` returns a Future (no coroutine per command) so pipelining costs
  one dict entry per command in flight;
- the granted ``max_inflight`` is enforced locally: one over it raises
  QUOTA_EXCEEDED at once instead of stalling.

Liveness ("Liveness" in the doc): PING every 0.25 s, and each tick the rule of
vpcie.tunnel.liveness fed with the connection's TCP_INFO (bytes from the agent
or our bytes taken by it are life; a hung agent is lost after hang_after, an
unreachable one after unreachable_after); EOF or reset -> LOST at once. Lost:
every in-flight command completes with DEVICE_LOST, later calls raise
VgpuError(DEVICE_LOST) at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl as ssl_mod
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from vpcie.errors import AuthError, ConfigError, ErrorCode, ProtocolError, VgpuError
from vpcie.protocol.batch import Record, encode_batch
from vpcie.protocol.codes import (
    MAX_DATA_CHUNK,
    MAX_PAYLOAD,
    NO_INDEX,
    PROTOCOL_VERSION,
    AuthMode,
    FrameFlag,
    FrameType,
)
from vpcie.protocol.frames import (
    MAC_SIZE,
    NONCE_SIZE,
    SEQ_LENGTH,
    Frame,
    FrameReader,
    data_frame_header,
    decode_payload,
    encode_completion,
    encode_frame,
    encode_header,
    encode_open,
    encode_payload,
    header_prefix,
    macs_equal,
    psk_mac,
)
from vpcie.tunnel import commands as cmds
from vpcie.tunnel import tcpinfo
from vpcie.tunnel.liveness import (
    ACK_ALLOWANCE,
    PING_INTERVAL_NS,
    Liveness,
    LivenessConfig,
    TcpSnapshot,
    Verdict,
    lost_reason,
)
from vpcie.tunnel.results import Completion, QueryInfo, StateSummary, error_code
from vpcie.tunnel.runstate import TRANSITIONS, Runstate, RunstateError
from vpcie.tunnel.scatter import Scatter, byte_views
from vpcie.tunnel.tls_sniff import speaks_tls

log = logging.getLogger(__name__)

PING_INTERVAL = PING_INTERVAL_NS / 1e9  # s, docs/PROTOCOL.md "Liveness"
CONNECT_TIMEOUT = 5.0  # s for TCP/TLS + HELLO/AUTH/OPEN (the agent's own limit)
CLOSE_TIMEOUT = 2.0  # s to wait for in-flight work and CLOSE|REPLY
SMALL_FRAME = 64 * 1024  # frames up to this size are coalesced into one write
MAX_WRITE_PIECE = 1 << 20  # bulk views go to the transport in pieces of this size

_COMMAND = int(FrameType.COMMAND)
_DATA = int(FrameType.DATA)
_COMPLETION = int(FrameType.COMPLETION)
_PING = int(FrameType.PING)
_PONG = int(FrameType.PONG)
_ERROR = int(FrameType.ERROR)
_CLOSE = int(FrameType.CLOSE)
_REPLY = int(FrameFlag.REPLY)
_OK = ErrorCode.OK
_STAMP = struct.Struct("<Q")
_NOP_BATCH = encode_batch([cmds.nop()])


_OK_EMPTY = encode_completion(0, failed_index=NO_INDEX)
_READY = Runstate.READY
_COMMAND_CAP = MAX_PAYLOAD[FrameType.COMMAND]
_SEQ_LENGTH = SEQ_LENGTH


P = ParamSpec("P")
R = TypeVar("R")


def _checked(done: Completion) -> None:
    done.check()


def _one_record(
    build: Callable[P, Record], answer: Callable[[Completion], R]
) -> Callable[Concatenate[TunnelClient, P], Coroutine[Any, Any, R]]:
    """A convenience call: a one-record batch made by ``build`` (a builder of
    vpcie.tunnel.commands, whose parameters it takes), sent and awaited; its
    Completion read by ``answer`` (raising VgpuError if the record failed)."""

    async def call(self: TunnelClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return answer(await self.send([build(*args, **kwargs)]))

    # help() and inspect show the builder's parameters (after self).
    sig = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    params = [this, *sig.parameters.values()]
    call.__signature__ = sig.replace(parameters=params, return_annotation=sig.empty)  # type: ignore[attr-defined]
    call.__doc__ = build.__doc__
    return call


def _command_head(session: int) -> bytes:
    """The bytes of every COMMAND header of ``session`` before seq."""
    return header_prefix(_COMMAND, session)


class _SyncFuture(asyncio.Future[Completion]):
    """A Future that also calls ``on_done(result)`` synchronously when its
    result is set, before any awaiting task runs (the vGPU backend publishes
    completions on the guest's fence page from there, a loop turn sooner).
    Every completion path (COMPLETION, loss, close) sets results, so every
    one reaches ``on_done``."""

    on_done: Callable[[Completion], None] | None = None

    def set_result(self, result: Completion) -> None:
        super().set_result(result)
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(result)


class TunnelClient(asyncio.BufferedProtocol):
    """One session with a host agent. Create with ``await TunnelClient.connect(...)``.

    ``submit()``/``send()`` return a Completion for every command the client
    accepted (DEVICE_LOST when the link failed); they raise VgpuError for one
    it refused (over the in-flight limit, malformed, tunnel lost).
    Buffers given as ``h2d``/``d2h`` must stay untouched until the command
    completes. The asyncio protocol callbacks (``get_buffer`` ...) are not API.
    """

    def __init__(
        self,
        *,
        psk: bytes | None,
        name: str,
        endpoint: str,
        liveness: LivenessConfig | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._psk = psk
        self._name = name
        self.endpoint = endpoint
        self._state = Runstate.CONNECTING
        self.lost_reason = ""
        self.session = 0
        self._info: QueryInfo | None = None
        self.max_inflight = 0
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(self._sink)
        self._seq = 0
        self._head = _command_head(0)
        self._pending: dict[int, asyncio.Future[Completion]] = {}
        self._d2h: dict[int, Scatter] = {}
        self._handshake: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._close_reply: asyncio.Future[None] = self._loop.create_future()
        self._outq: deque[bytes | memoryview] = deque()
        self._flush_scheduled = False
        self._paused = False
        self.liveness = liveness or LivenessConfig()  # the lane gets it too
        self._live: Liveness | None = None  # from READY on (and again after a take-back)
        self._rx_bytes = 0  # what we read: the rule's input where there is no TCP_INFO
        self._drains = 0  # resume_writing calls: likewise
        self._timer: asyncio.TimerHandle | None = None
        self.rtt: float | None = None  # last PING round trip (s)

    # -- public API ------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        psk: bytes | None = None,
        ssl: ssl_mod.SSLContext | None = None,
        server_hostname: str | None = None,
        device: str = "",
        mem_quota: int = 0,
        max_inflight: int = 0,
        name: str = "",
        timeout: float = CONNECT_TIMEOUT,
        handle_epoch: int = 0,
        liveness: LivenessConfig | None = None,
        lease_token: int = 0,
        lease_live: Sequence[int] = (),
    ) -> TunnelClient:
        """Connect, authenticate (PSK or mutual TLS) and OPEN a session
        whose handles carry ``handle_epoch`` (codes.HANDLE_EPOCH_SHIFT),
        under the pool lease ``lease_token`` whose live set is ``lease_live``
        (the device's leases live when it was created, ascending, its own
        included; 0 and () without a pool lease). The agent refuses a stale
        token with STALE_LEASE and a set that does not fit the token with
        INVALID_ARGUMENT (docs/SECURITY.md "Lease fencing").

        Raises AuthError (refused or failed authentication), VgpuError
        (NO_DEVICE / QUOTA_EXCEEDED from OPEN, DEVICE_LOST when the agent
        cannot be reached, TIMEOUT), ConfigError (bad arguments). ``liveness``:
        when the agent counts as lost (docs/PROTOCOL.md "Liveness"; default 1 s
        hung, 4 s unreachable).
        """
        self = await cls._handshaken(
            host,
            port,
            psk=psk,
            ssl=ssl,
            server_hostname=server_hostname,
            name=name,
            timeout=timeout,
            liveness=liveness,
            step=lambda c: c._do_handshake(
                device, mem_quota, max_inflight, handle_epoch, lease_token, lease_live
            ),
        )
        loop = asyncio.get_running_loop()
        self._set_state(Runstate.READY)
        self._live = Liveness(self.liveness, time.monotonic_ns(), self._snapshot())
        self._timer = loop.call_later(PING_INTERVAL, self._tick)
        return self

    @classmethod
    async def fetch_inventory(
        cls,
        host: str,
        port: int,
        *,
        psk: bytes | None = None,
        ssl: ssl_mod.SSLContext | None = None,
        server_hostname: str | None = None,
        name: str = "",
        timeout: float = CONNECT_TIMEOUT,
    ) -> bytes:
        """Connect, authenticate, ask INVENTORY instead of OPEN: the agent's
        JSON answer (bytes). No session is opened; errors as ``connect``."""
        got: list[bytes] = []

        async def ask(c: TunnelClient) -> bytes:
            got.append(await c._do_handshake("", 0, 0, 0, inventory=True))
            return got[-1]

        self = await cls._handshaken(
            host, port, psk=psk, ssl=ssl, server_hostname=server_hostname, name=name,
            timeout=timeout, liveness=None, step=ask,
        )  # fmt: skip
        self._finish(Runstate.CLOSED, "inventory received")
        return got[0]

    @classmethod
    async def _handshaken(
        cls,
        host: str,
        port: int,
        *,
        psk: bytes | None,
        ssl: ssl_mod.SSLContext | None,
        server_hostname: str | None,
        name: str,
        timeout: float,
        liveness: LivenessConfig | None,
        step: Callable[[TunnelClient], Awaitable[bytes]],
    ) -> TunnelClient:
        """A client whose transport is up and whose handshake ``step`` (HELLO,
        AUTH, then OPEN or INVENTORY) ran within ``timeout``."""
        if (psk is None) == (ssl is None):
            raise ConfigError("give exactly one of psk= (loopback labs) or ssl= (mutual TLS)")
        if psk is not None and not psk:
            raise ConfigError("the pre-shared key is empty")
        loop = asyncio.get_running_loop()
        self = cls(psk=psk, name=name, endpoint=f"{host}:{port}", liveness=liveness)
        try:
            async with asyncio.timeout(timeout):
                try:
                    await loop.create_connection(
                        lambda: self,
                        host,
                        port,
                        ssl=ssl,
                        server_hostname=server_hostname if ssl is not None else None,
                    )
                except ssl_mod.SSLError as exc:
                    raise AuthError(f"TLS with agent {self.endpoint} failed: {exc}") from exc
                except OSError as exc:
                    raise VgpuError(
                        ErrorCode.DEVICE_LOST, f"cannot reach agent {self.endpoint}: {exc}"
                    ) from exc
                await step(self)
        except TimeoutError:
            self._finish(Runstate.LOST, "handshake timed out")
            raise VgpuError(
                ErrorCode.TIMEOUT, f"agent {self.endpoint} did not answer within {timeout} s"
            ) from None
        except BaseException as exc:
            self._finish(Runstate.LOST, f"handshake failed: {exc!r}")
            raise
        return self

    @property
    def state(self) -> Runstate:
        return self._state

    @property
    def info(self) -> QueryInfo:
        """QUERY_INFO from the OPEN reply: granted quota, in-flight limit, device."""
        if self._info is None:
            raise RunstateError("info", self._state)
        return self._info

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def send(
        self,
        batch: bytes | bytearray | memoryview | Sequence[Record],
        *,
        h2d: Sequence[Any] = (),
        d2h: Sequence[Any] = (),
        on_done: Callable[[Completion], None] | None = None,
    ) -> asyncio.Future[Completion]:
        """Queue one COMMAND; the Future resolves to its Completion.

        ``on_done``, if given, is called with the Completion synchronously as
        the Future gets it (whatever ends the command: its COMPLETION, a lost
        tunnel, close), before tasks awaiting the Future resume.

        ``h2d``/``d2h`` are scatter lists (buffer objects, e.g. guest pages)
        whose total sizes must equal the batch's resource-0 COPY_H2D/COPY_D2H
        bytes. Raises VgpuError at once: DEVICE_LOST (tunnel lost),
        QUOTA_EXCEEDED (over the granted in-flight limit), INVALID_ARGUMENT.
        """
        if isinstance(batch, bytes | bytearray | memoryview):
            data = bytes(batch)
            h2d_need, d2h_need = cmds.copy_stream_sizes(data)
        else:
            h2d_need, d2h_need = cmds.copy_stream_sizes(batch)
            try:
                data = encode_batch(batch)
            except ProtocolError as exc:
                raise VgpuError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        return self.send_encoded(data, h2d_need, d2h_need, h2d=h2d, d2h=d2h, on_done=on_done)

    def send_encoded(
        self,
        data: bytes,
        h2d_total: int,
        d2h_total: int,
        *,
        h2d: Sequence[Any] = (),
        d2h: Sequence[Any] = (),
        on_done: Callable[[Completion], None] | None = None,
    ) -> asyncio.Future[Completion]:
        """send() for a caller that has decoded and checked the batch itself
        (the vGPU device): ``data`` is a well-formed batch whose resource-0
        copies move ``h2d_total`` and ``d2h_total`` bytes; it is not decoded
        again. The scatter lists must hold exactly those totals."""
        self._check_ready("send()")
        h2d_need, d2h_need = h2d_total, d2h_total
        limit = self._info.max_batch_bytes if self._info is not None else 0
        if limit and len(data) > limit:
            raise VgpuError(
                ErrorCode.INVALID_ARGUMENT,
                f"batch of {len(data)} bytes over the agent's limit of {limit}",
            )
        h2d_scatter = Scatter(byte_views(h2d, writable=False)) if h2d else None
        d2h_scatter = Scatter(byte_views(d2h, writable=True)) if d2h else None
        for what, need, sc in (("h2d", h2d_need, h2d_scatter), ("d2h", d2h_need, d2h_scatter)):
            have = sc.total if sc is not None else 0
            if have != need:
                raise VgpuError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"the batch copies {need} bytes but the {what} list holds {have}",
                )
        return self._command(data, h2d_scatter, d2h_scatter, on_done)

    async def submit(
        self,
        batch: bytes | bytearray | memoryview | Sequence[Record],
        *,
        h2d: Sequence[Any] = (),
        d2h: Sequence[Any] = (),
    ) -> Completion:
        """``await send(...)``: run one batch, return its Completion (not checked)."""
        return await self.send(batch, h2d=h2d, d2h=d2h)

    def send_nop(self) -> asyncio.Future[Completion]:
        """A one-record NOP batch (pre-encoded): the cheapest command there is."""
        if self._state is not _READY or (
            self.max_inflight and len(self._pending) >= self.max_inflight
        ):
            self._check_ready("send_nop()")  # raises
        return self._command(_NOP_BATCH, None, None)

    async def nop(self) -> Completion:
        return (await self.send_nop()).check()

    # One record each, built by vpcie.tunnel.commands (its signatures, its
    # field order); only how the answer is read is said here.
    query = _one_record(cmds.query, lambda done: QueryInfo.decode(done.check().blob))
    alloc = _one_record(cmds.mem_alloc, Completion.value)  # the handle
    free = _one_record(cmds.mem_free, _checked)
    memset = _one_record(cmds.memset, _checked)
    gemm = _one_record(cmds.gemm, _checked)
    axpy = _one_record(cmds.axpy, _checked)
    reduce_sum = _one_record(cmds.reduce_sum, Completion.value_f64)
    sync = _one_record(cmds.sync, _checked)
    # Session state (live migration): the backend's own records, never a guest's.
    state_export = _one_record(cmds.state_export, lambda d: StateSummary.decode(d.check().blob))
    module_export = _one_record(cmds.module_export, lambda d: bytes(d.check().blob))
    alloc_at = _one_record(cmds.alloc_at, Completion.value)  # the handle
    module_load_at = _one_record(cmds.module_load_at, Completion.value)
    session_restore = _one_record(cmds.session_restore, _checked)

    async def copy_h2d(self, handle: int, offset: int, buf: Any, *, stream: int = 0) -> None:
        """Copy ``buf`` (a buffer or a list of them) to device memory at ``offset``."""
        views = byte_views(buf if isinstance(buf, list | tuple) else [buf], writable=False)
        size = sum(len(v) for v in views)
        rec = cmds.copy_h2d(handle, offset, size, stream=stream)
        (await self.send([rec], h2d=views)).check()

    async def copy_d2h(self, handle: int, offset: int, buf: Any, *, stream: int = 0) -> None:
        """Fill ``buf`` (a writable buffer or a list of them) from device memory."""
        views = byte_views(buf if isinstance(buf, list | tuple) else [buf], writable=True)
        size = sum(len(v) for v in views)
        rec = cmds.copy_d2h(handle, offset, size, stream=stream)
        (await self.send([rec], d2h=views)).check()

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let in-flight commands finish (up to ``timeout``), CLOSE, disconnect.

        Idempotent; after a loss it only releases the transport.
        """
        if self._state is Runstate.LENT:
            raise RunstateError("close()", self._state)
        if self._state is not Runstate.READY:
            if self._state is Runstate.CONNECTING:
                self._finish(Runstate.CLOSED, "closed before it was connected")
            return
        self._set_state(Runstate.CLOSING)
        try:
            async with asyncio.timeout(timeout):
                if self._pending:
                    await asyncio.wait(list(self._pending.values()))
                if self.state is Runstate.CLOSING:  # not lost while draining
                    bye = encode_payload("CLOSE", 0)
                    self._queue(encode_frame(_CLOSE, bye, session=self.session))
                    await asyncio.shield(self._close_reply)
        except TimeoutError:
            log.warning("agent %s did not confirm CLOSE within %.1f s", self.endpoint, timeout)
        self._finish(Runstate.CLOSED, "tunnel closed by the client")

    async def __aenter__(self) -> TunnelClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lending the socket to the vGPU lane (vpcie.gpu.lanes) --------------------
    def lendable(self) -> bool:
        """Idle at a frame boundary on plain TCP: the socket can change hands."""
        t = self._transport
        return (
            self._state is _READY
            and not self._pending
            and not self._outq
            and not self._paused
            and t is not None
            and t.get_write_buffer_size() == 0
            and t.get_extra_info("sslcontext") is None
            and t.get_extra_info("socket") is not None
            and self._reader.idle
        )

    def lend(self) -> tuple[int, int, int]:
        """Stop reading and pinging; the caller reads and writes the socket
        (COMMAND out; COMPLETION, PING, PONG, ERROR in) until ``take_back``.
        Returns the socket's fd, the session id and the last COMMAND seq."""
        if self._state is not _READY:
            raise RunstateError("lend()", self._state)
        if not self.lendable():
            raise RuntimeError("session is not idle: it cannot be lent")
        t = self._transport
        assert t is not None
        t.pause_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._set_state(Runstate.LENT)
        return int(t.get_extra_info("socket").fileno()), self.session, self._seq

    def take_back(
        self,
        seq: int,
        adopt: Sequence[tuple[int, Callable[[Completion], None]]] = (),
        leftover: bytes = b"",
        unsent: bytes = b"",
    ) -> None:
        """The socket is ours again: ``seq`` the last COMMAND seq sent on it;
        ``adopt`` the commands sent meanwhile still in flight (seq, and the
        ``on_done`` their Completion goes to, as with send()); ``leftover``
        the bytes read past the last whole frame; ``unsent`` the tail of the
        frames written meanwhile that the kernel had not taken yet (written
        before anything of ours).

        In a terminal state (the tunnel failed while lent) the adopted
        commands end at once with the loss, as every other in-flight one did."""
        if self._state is not Runstate.LENT:
            if self._state not in (Runstate.LOST, Runstate.CLOSED):
                raise RunstateError("take_back()", self._state, Runstate.LENT)
            for _s, on_done in adopt:
                on_done(Completion.lost(self.lost_reason))
            return
        self._set_state(_READY)
        self._seq = seq
        self._live = Liveness(self.liveness, time.monotonic_ns(), self._snapshot())
        for s, on_done in adopt:
            fut = _SyncFuture(loop=self._loop)
            fut.on_done = on_done
            self._pending[s] = fut
        if self._transport is not None:
            if unsent:
                self._transport.write(unsent)
            self._transport.resume_reading()
        self._timer = self._loop.call_later(PING_INTERVAL, self._tick)
        pos = 0
        while pos < len(leftover) and self._state is _READY:
            buf = self.get_buffer(len(leftover) - pos)
            k = min(len(buf), len(leftover) - pos)
            buf[:k] = leftover[pos : pos + k]
            self.buffer_updated(k)
            pos += k

    def fail(self, reason: str, *, protocol: bool = False) -> None:
        """Declare the session lost (``protocol``: the agent broke the
        protocol; it is told so with an ERROR frame first)."""
        if protocol:
            self._protocol_failure(reason)
        else:
            self._finish(Runstate.LOST, reason)

    # -- commands --------------------------------------------------------------
    def _check_ready(self, what: str) -> None:
        if self._state is not Runstate.READY:
            if self._state is Runstate.LOST:
                raise VgpuError(ErrorCode.DEVICE_LOST, self.lost_reason)
            raise RunstateError(what, self._state)
        if self.max_inflight and len(self._pending) >= self.max_inflight:
            raise VgpuError(
                ErrorCode.QUOTA_EXCEEDED,
                f"{len(self._pending)} commands in flight: the agent granted {self.max_inflight}",
            )

    def _command(
        self,
        data: bytes,
        h2d: Scatter | None,
        d2h: Scatter | None,
        on_done: Callable[[Completion], None] | None = None,
    ) -> asyncio.Future[Completion]:
        self._seq = seq = self._seq + 1
        fut: asyncio.Future[Completion]
        if on_done is None:
            fut = self._loop.create_future()
        else:
            fut = _SyncFuture(loop=self._loop)
            fut.on_done = on_done
        self._pending[seq] = fut
        if d2h is not None:
            self._d2h[seq] = d2h
        n = len(data)
        if n > _COMMAND_CAP:  # raises the same error as encode_header
            encode_header(_COMMAND, n, session=self.session, seq=seq)
        frame = self._head + _SEQ_LENGTH.pack(seq, n) + data
        if h2d is None and len(self._pending) <= 1:  # _queue's lone-command case
            transport = self._transport
            if transport is not None and not self._outq and not self._paused:
                transport.write(frame)
                return fut
        self._queue(frame)
        if h2d is not None:
            # docs/PROTOCOL.md: DATA frames follow the COMMAND before any other COMMAND
            session, outq = self.session, self._outq
            for offset, n, views in h2d.chunks(MAX_DATA_CHUNK):
                last = offset + n == h2d.total
                outq.append(data_frame_header(session, seq, offset, n, last=last))
                for v in views:
                    for p in range(0, len(v), MAX_WRITE_PIECE):
                        outq.append(v[p : p + MAX_WRITE_PIECE])
            self._schedule_flush()
        return fut

    # -- writing ---------------------------------------------------------------
    def _queue(self, frame: bytes) -> None:
        # A lone command (nothing else in flight or queued) is latency-bound:
        # write it now (-3 µs a round trip, benchmarks/tunnel.py). With more in
        # flight, frames of this loop iteration are coalesced into one write.
        if (
            len(self._pending) <= 1
            and not self._outq
            and not self._paused
            and self._transport is not None
        ):
            self._transport.write(frame)
            return
        self._outq.append(frame)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._paused:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport, outq = self._transport, self._outq
        if transport is None:
            outq.clear()
            return
        while outq and not self._paused:
            item = outq.popleft()
            if len(item) <= SMALL_FRAME and outq and len(outq[0]) <= SMALL_FRAME:
                parts = [item]
                size = len(item)
                while outq and len(outq[0]) <= SMALL_FRAME and size < SMALL_FRAME:
                    nxt = outq.popleft()
                    parts.append(nxt)
                    size += len(nxt)
                transport.write(b"".join(parts))
            else:
                transport.write(item)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._drains += 1  # the peer is taking our bytes (the rule reads TCP_INFO)
        if self._outq:
            self._schedule_flush()

    # -- reading ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            tcpinfo.set_user_timeout(sock, self.liveness.user_timeout_ms)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._rx_bytes += nbytes
        try:
            for f in self._reader.buffer_updated(nbytes):
                t = f.type
                if t == _COMPLETION:
                    self._on_completion(f)
                elif t == _DATA:
                    continue  # landed in the caller's views through _sink
                elif self._state is Runstate.CONNECTING:
                    self._handshake.put_nowait(f)
                else:
                    self._on_control(f)
        except ProtocolError as exc:
            self._protocol_failure(str(exc))

    def _sink(self, session: int, seq: int, offset: int, length: int) -> list[memoryview]:
        if session != self.session:
            raise ProtocolError(f"DATA for session {session}, this is {self.session}")
        scatter = self._d2h.get(seq)
        if scatter is None:
            raise ProtocolError(f"DATA for seq {seq}, which has no D2H copy in flight")
        return scatter.slice(offset, length)

    def _on_completion(self, f: Frame) -> None:
        if f.session != self.session:
            raise ProtocolError(f"COMPLETION for session {f.session}, this is {self.session}")
        seq = f.seq
        fut = self._pending.pop(seq, None)
        if fut is None:
            raise ProtocolError(f"COMPLETION for seq {seq}, which is not in flight")
        scatter = self._d2h.pop(seq, None) if self._d2h else None
        payload = f.payload
        if payload == _OK_EMPTY and scatter is None:  # the most common completion
            done = Completion(_OK, NO_INDEX, "", {}, b"")
        else:
            if payload == _OK_EMPTY:
                status, failed, message, results, blob = 0, NO_INDEX, "", [], b""
            else:
                try:
                    status, failed, message, _n, results, blob = decode_payload(
                        "COMPLETION", payload
                    )
                except ProtocolError as exc:
                    # The tunnel is about to fail; this command is already out
                    # of the in-flight table, so end it here (never a hang).
                    if not fut.done():
                        fut.set_result(Completion.lost(f"malformed COMPLETION: {exc}"))
                    raise
            code = _OK if status == 0 else error_code(status)
            if scatter is not None and code is _OK and scatter.got < scatter.total:
                code, failed = ErrorCode.PROTOCOL, NO_INDEX
                message = f"agent sent {scatter.got} of {scatter.total} D2H bytes"
            done = Completion(code, failed, message, dict(results), blob)
        if not fut.done():  # a caller may have cancelled it
            fut.set_result(done)

    def _on_control(self, f: Frame) -> None:
        t = f.type
        if t == _PING:
            decode_payload("PING", f.payload)  # well formed?
            self._queue(encode_frame(_PONG, bytes(f.payload), session=self.session, seq=f.seq))
        elif t == _PONG:
            (stamp,) = decode_payload("PING", f.payload)
            self.rtt = (time.monotonic_ns() - stamp) / 1e9
        elif t == _ERROR:
            code, fatal, message = decode_payload("ERROR", f.payload)
            if fatal:
                self._finish(
                    Runstate.LOST, f"agent closed the session: {error_code(code).name} {message}"
                )
            else:
                log.warning("agent %s: %s %s", self.endpoint, error_code(code).name, message)
        elif t == _CLOSE and f.flags & _REPLY and self._state is Runstate.CLOSING:
            if not self._close_reply.done():
                self._close_reply.set_result(None)
        else:
            raise ProtocolError(f"unexpected {FrameType(t).name} frame in state {self._state.name}")

    def eof_received(self) -> bool | None:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._state is Runstate.CLOSING:
            if not self._close_reply.done():
                self._close_reply.set_result(None)
            return
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "EOF"
        self._finish(Runstate.LOST, f"connection to agent {self.endpoint} lost ({why})")
        self._handshake.put_nowait(None)

    # -- handshake (docs/PROTOCOL.md "Connection = one session") -----------------
    async def _expect(self, ftype: FrameType) -> Frame:
        f = await self._handshake.get()
        if f is None:
            reason = self.lost_reason or "connection closed"
            if self._ssl_failed():
                raise AuthError(f"agent {self.endpoint} refused the TLS session: {reason}")
            if ftype is FrameType.HELLO and self._psk is not None:
                await self._refuse_if_tls_agent()
            raise VgpuError(ErrorCode.DEVICE_LOST, f"during {ftype.name}: {reason}")
        if f.type == _ERROR:
            code, _fatal, message = decode_payload("ERROR", f.payload)
            if code == ErrorCode.PERMISSION_DENIED:
                raise AuthError(f"agent {self.endpoint} refused {ftype.name}: {message}")
            raise VgpuError(error_code(code), f"agent refused {ftype.name}: {message}")
        if f.type != ftype or not f.flags & _REPLY:
            raise ProtocolError(f"expected {ftype.name}|REPLY, got frame type {f.type}")
        return f

    async def _refuse_if_tls_agent(self) -> None:
        """A PSK HELLO went unanswered: name the likely cause if the agent speaks TLS."""
        host, _, port = self.endpoint.rpartition(":")
        if await speaks_tls(host.strip("[]"), int(port)):
            raise AuthError(f"agent at {self.endpoint} expects TLS (use --tls-dir, not a PSK)")

    def _ssl_failed(self) -> bool:
        return "SSL" in self.lost_reason or "certificate" in self.lost_reason.lower()

    async def _do_handshake(
        self,
        device: str,
        mem_quota: int,
        max_inflight: int,
        handle_epoch: int,
        lease_token: int = 0,
        lease_live: Sequence[int] = (),
        *,
        inventory: bool = False,
    ) -> bytes:
        """HELLO, AUTH, then OPEN (returns b"") or, with ``inventory``,
        INVENTORY (returns the reply's JSON bytes; the agent then closes)."""
        psk = self._psk
        auth = AuthMode.PSK if psk is not None else AuthMode.TLS
        cnonce = os.urandom(NONCE_SIZE)
        hello = encode_payload(
            "HELLO", PROTOCOL_VERSION, PROTOCOL_VERSION, int(auth), cnonce, self._name
        )
        self._queue(encode_frame(FrameType.HELLO, hello))
        f = await self._expect(FrameType.HELLO)
        version, agent_auth, snonce, proof, agent = decode_payload("HELLO_REPLY", f.payload)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"agent chose protocol version {version}, we speak {PROTOCOL_VERSION}"
            )
        if agent_auth != auth:
            raise AuthError(f"agent {agent!r} wants auth mode {agent_auth}, we use {auth.name}")
        if psk is not None:
            if not macs_equal(proof, psk_mac(psk, b"agent", cnonce, snonce)):
                raise AuthError(f"agent {agent!r} at {self.endpoint} does not hold our PSK")
            mac = psk_mac(psk, b"client", cnonce, snonce)
        else:
            mac = bytes(MAC_SIZE)
        self._queue(encode_frame(FrameType.AUTH, encode_payload("AUTH", mac)))
        f = await self._expect(FrameType.AUTH)
        (status,) = decode_payload("AUTH_REPLY", f.payload)
        if status != 0:
            raise AuthError(f"agent {agent!r} refused authentication (status {status})")
        if inventory:
            self._queue(encode_frame(FrameType.INVENTORY))
            f = await self._expect(FrameType.INVENTORY)
            (doc,) = decode_payload("INVENTORY_REPLY", f.payload)
            return bytes(doc)
        opened = encode_open(
            device, mem_quota, max_inflight, self._name, handle_epoch, lease_token, lease_live
        )
        self._queue(encode_frame(FrameType.OPEN, opened))
        f = await self._expect(FrameType.OPEN)
        status, session, message, info = decode_payload("OPEN_REPLY", f.payload)
        if status != 0:
            raise VgpuError(error_code(status), f"agent {agent!r} refused OPEN: {message}")
        self.session = session
        self._head = _command_head(session)
        self._info = QueryInfo.decode(info)
        self.max_inflight = self._info.max_inflight
        return b""

    # -- liveness and failure ----------------------------------------------------
    def _tick(self) -> None:
        self._timer = None
        if self._state not in (Runstate.READY, Runstate.CLOSING):
            return
        now = time.monotonic_ns()
        snap = self._snapshot()
        live = self._live
        if live is None:
            live = self._live = Liveness(self.liveness, now, snap)
        verdict = live.step(now, snap)
        if verdict is not Verdict.ALIVE:
            why = lost_reason(verdict, self.endpoint, live.silent_ns(now), snap.last_ack_ms)
            self._finish(Runstate.LOST, why)
            return
        ping = encode_payload("PING", time.monotonic_ns())
        self._queue(encode_frame(_PING, ping, session=self.session))
        self._timer = self._loop.call_later(PING_INTERVAL, self._tick)

    def _snapshot(self) -> TcpSnapshot:
        """One getsockopt per tick; where there is no TCP_INFO, what we read
        and the drains of our write buffer stand in (no trouble is seen)."""
        t = self._transport
        sock = t.get_extra_info("socket") if t is not None else None
        snap = tcpinfo.snapshot(sock) if sock is not None else None
        if snap is None:
            snap = TcpSnapshot(rx=self._rx_bytes, acked=self._drains * (ACK_ALLOWANCE + 1))
        return snap

    def _protocol_failure(self, why: str) -> None:
        log.error("agent %s broke the protocol: %s", self.endpoint, why)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            msg = encode_payload("ERROR", int(ErrorCode.PROTOCOL), 1, why[:1000])
            transport.write(b"".join(self._outq) + encode_frame(_ERROR, msg, session=self.session))
            self._outq.clear()
        self._finish(Runstate.LOST, f"agent broke the protocol: {why}")

    def _set_state(self, new: Runstate) -> None:
        if new not in TRANSITIONS[self._state]:
            raise AssertionError(f"tunnel state {self._state.name} -> {new.name}")
        self._state = new

    def _finish(self, state: Runstate, reason: str) -> None:
        """Enter a terminal state: drop the transport, complete what is in flight."""
        if self._state in (Runstate.LOST, Runstate.CLOSED):
            return
        self._set_state(state)
        self.lost_reason = reason
        if state is Runstate.LOST:
            log.warning("tunnel to %s lost: %s", self.endpoint, reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outq.clear()
        transport, self._transport = self._transport, None
        if transport is not None:
            if state is Runstate.CLOSED:
                transport.close()
            else:
                transport.abort()
        pending, self._pending = self._pending, {}
        self._d2h = {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result(Completion.lost(reason))
        if not self._close_reply.done():
            self._close_reply.set_result(None)
        self._handshake.put_nowait(None)
