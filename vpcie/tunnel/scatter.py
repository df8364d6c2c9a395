"""Scatter-gather lists: the caller's buffers for one command's copy stream.

The backend hands over guest pages (many segments); DATA frames address the
stream by offset (docs/PROTOCOL.md "Copies in the tunnel"), so a frame's range
is mapped onto the segments here without copying anything.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Any

from vpcie.errors import ErrorCode, ProtocolError, VgpuError


def byte_views(buffers: Sequence[Any], *, writable: bool) -> list[memoryview]:
    """Flat unsigned-byte views of ``buffers``; empty segments are dropped.

    VgpuError(INVALID_ARGUMENT) for a non-contiguous or read-only (when
    ``writable``) buffer: nothing has been sent yet.
    """
    out: list[memoryview] = []
    for b in buffers:
        try:
            v = b if isinstance(b, memoryview) else memoryview(b)
            if v.format != "B" or v.ndim != 1:
                v = v.cast("B")
        except (TypeError, ValueError) as exc:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, f"not a contiguous buffer: {exc}") from exc
        if writable and v.readonly:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, "D2H buffer is read-only")
        if len(v):
            out.append(v)
    return out


class Scatter:
    """A list of views addressed as one stream of ``total`` bytes."""

    __slots__ = ("_starts", "got", "total", "views")

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self._starts: list[int] = []
        pos = 0
        for v in views:
            self._starts.append(pos)
            pos += len(v)
        self.total = pos
        self.got = 0  # bytes delivered into the views so far

    def slice(self, offset: int, length: int) -> list[memoryview]:
        """Views covering [offset, offset + length); ProtocolError if outside."""
        if offset < 0 or length < 0 or offset + length > self.total:
            raise ProtocolError(
                f"DATA range {offset}+{length} outside the {self.total}-byte copy stream"
            )
        out: list[memoryview] = []
        if length == 0:
            return out
        i = bisect_right(self._starts, offset) - 1
        views, starts = self.views, self._starts
        remaining = length
        while remaining:
            v = views[i]
            s = offset - starts[i]
            k = min(len(v) - s, remaining)
            out.append(v[s : s + k])
            offset += k
            remaining -= k
            i += 1
        self.got += length
        return out

    def chunks(self, chunk: int) -> Iterator[tuple[int, int, list[memoryview]]]:
        """(offset, size, views) pieces of at most ``chunk`` bytes, in order."""
        offset = 0
        while offset < self.total:
            n = min(chunk, self.total - offset)
            got = self.got
            views = self.slice(offset, n)
            self.got = got  # slicing to send is not delivery
            yield offset, n, views
            offset += n
