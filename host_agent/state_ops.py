"""What live migration reads from and writes into a session (docs/PROTOCOL.md
"Session state"): the STATE_SUMMARY of STATE_EXPORT and the event bitmap of
SESSION_RESTORE. Pure functions over an executor's bookkeeping; the runner
(host_agent/runner.py) calls them for the state opcodes. Contents are not
here: they move with the ordinary COPY_D2H / COPY_H2D records.
"""

from __future__ import annotations

from collections.abc import Iterable

from host_agent.executors.base import Executor
from vpcie.errors import ErrorCode, ProtocolError, VgpuError
from vpcie.protocol.codes import MAX_COMPLETION_PAYLOAD, MAX_EVENTS
from vpcie.protocol.frames import encode_payload

EVENT_BITMAP_BYTES = MAX_EVENTS // 8
# The summary travels as a COMPLETION blob: room for the completion's own fields.
MAX_SUMMARY_BYTES = MAX_COMPLETION_PAYLOAD - 4096


def events_bitmap(events: Iterable[int]) -> bytes:
    """Bit i (LSB first) set for each event i; trailing zero bytes left out."""
    bits = bytearray(EVENT_BITMAP_BYTES)
    for e in events:
        if 0 <= e < MAX_EVENTS:
            bits[e >> 3] |= 1 << (e & 7)
    return bytes(bits).rstrip(b"\0")


def bitmap_events(bits: bytes) -> list[int]:
    """The events a bitmap names; INVALID_ARGUMENT when it is longer than MAX_EVENTS bits."""
    if len(bits) > EVENT_BITMAP_BYTES:
        raise VgpuError(
            ErrorCode.INVALID_ARGUMENT,
            f"event bitmap of {len(bits)} bytes (at most {EVENT_BITMAP_BYTES})",
        )
    return [i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1]


def gens(ex: Executor) -> dict[int, int]:
    """Every buffer's write generation now (STATE_EXPORT reads them before it
    waits for the device: docs/PROTOCOL.md "Session state")."""
    return {h: b.gen for h, b in list(ex.buffers.items())}


def summary(ex: Executor, recorded: Iterable[int], gens: dict[int, int] | None = None) -> bytes:
    """STATE_SUMMARY of ``ex`` with the events ``recorded`` and the buffers'
    ``gens`` (read earlier; a buffer made since reads -1: copy it again);
    QUOTA_EXCEEDED when it would not fit a COMPLETION (tens of thousands of
    allocations)."""
    bufs = [
        (h, b.size, b.gen if gens is None else gens.get(h, (1 << 64) - 1))
        for h, b in sorted(ex.buffers.items())
    ]
    mods = [(h, src.kind, src.name, len(src.code)) for h, src in sorted(ex.module_sources.items())]
    try:
        out = encode_payload(
            "STATE_SUMMARY",
            ex.handle_epoch,
            ex.next_index,
            ex.mem_used,
            events_bitmap(recorded),
            len(bufs),
            bufs,
            len(mods),
            mods,
        )
    except ProtocolError as exc:  # a count or name over its field: not exportable
        raise VgpuError(ErrorCode.QUOTA_EXCEEDED, f"session state: {exc}") from None
    if len(out) > MAX_SUMMARY_BYTES:
        raise VgpuError(
            ErrorCode.QUOTA_EXCEEDED,
            f"too many allocations to migrate ({len(bufs)} buffers, {len(mods)} modules: "
            f"a {len(out)}-byte summary, at most {MAX_SUMMARY_BYTES})",
        )
    return out
