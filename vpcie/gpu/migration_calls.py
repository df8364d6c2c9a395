"""The calls a live migration makes (vpcie/gpu/migration.py): one batch on
a session, the pipelined copy of contents between two sessions, and running
the contexts' moves side by side. Failures are sorted for the engine:
``SourceLost`` (the source is gone: its state with it) or ``Abort``
(anything else: the vGPU stays on the source)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from vpcie.errors import ErrorCode, VgpuError
from vpcie.gpu.binding import Session
from vpcie.protocol.batch import Record, encode_batch
from vpcie.protocol.codes import Opcode
from vpcie.tunnel import commands as cmds

T = TypeVar("T")

COPY_DEPTH = 8  # copy pieces in flight (each one D2H then one H2D)


class SourceLost(Exception):
    """The source cannot give its state: it is gone."""


class Abort(Exception):
    """The migration stops; the vGPU stays on the source (one-line reason)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.DEVICE_LOST) -> None:
        super().__init__(message)
        self.code = code


async def call(
    session: Session,
    records: list[Record],
    *,
    source: bool,
    h2d: Sequence[Any] = (),
    d2h: Sequence[Any] = (),
) -> Any:
    """One batch on a session, its Completion; a failure raises SourceLost
    (the source is gone) or Abort (anything else)."""
    side = "source" if source else "target"
    try:
        data = encode_batch(records)
        h2d_n, d2h_n = cmds.copy_stream_sizes(records)
        comp = await session.send_encoded(data, h2d_n, d2h_n, h2d=h2d, d2h=d2h)
        code = ErrorCode(int(comp.status))
        message = comp.message
    except VgpuError as exc:
        code, message = exc.code, exc.message
    if code == ErrorCode.OK:
        return comp
    if source and code == ErrorCode.DEVICE_LOST:
        raise SourceLost(message or "the source session was lost")
    op = Opcode(records[0].opcode).name if records else "?"
    raise Abort(f"{side} agent refused {op}: {code.name} {message}".rstrip(), code)


# A buffer the guest freed between the export and its copy (pre-copy only).
_GONE = frozenset({ErrorCode.INVALID_HANDLE, ErrorCode.STALE_HANDLE, ErrorCode.OUT_OF_RANGE})


async def copy_pieces(
    src: Session,
    dst: Session,
    chunks: list[tuple[int, int, int]],
    gone: set[int] | None = None,
    depth: int = COPY_DEPTH,
) -> None:
    """Every piece read from ``src`` and written to ``dst``, ``depth`` in
    flight, so reading piece n+1 overlaps writing piece n. With ``gone``
    (the guest runs meanwhile): a buffer the source no longer has is added
    to it instead of failing the copy."""
    if not chunks:
        return
    depth = max(1, min(depth, window(src), window(dst)))
    gate = asyncio.Semaphore(depth)
    # One buffer per piece in flight, reused: no 4 MiB allocation per piece.
    spare = [
        bytearray(max(size for _h, _o, size in chunks)) for _ in range(min(depth, len(chunks)))
    ]

    async def one(handle: int, off: int, size: int) -> None:
        async with gate:
            buf = spare.pop()
            try:
                view = memoryview(buf)[:size]
                try:
                    await call(src, [cmds.copy_d2h(handle, off, size)], source=True, d2h=[view])
                except Abort as exc:
                    if gone is None or exc.code not in _GONE:
                        raise
                    gone.add(handle)
                    return
                await call(dst, [cmds.copy_h2d(handle, off, size)], source=False, h2d=[view])
            finally:
                spare.append(buf)

    await side_by_side([one(*c) for c in chunks])


async def side_by_side(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` together; the first to fail cancels the rest and its
    exception is raised (not an ExceptionGroup: the callers tell SourceLost
    from Abort)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def window(session: Session) -> int:
    return max(1, int(getattr(session.info, "max_inflight", 0) or 1))
