"""The fence page: how a guest learns that its vGPU work finished.

A virtio fence only means "accepted" (DESIGN.md: the guest kernel signals a
fence when the response echoes it, and a later fence signals every earlier
one). Completion is published here instead: a guest buffer attached to the
context (FENCE_PAGE_SET names it) that the backend writes and the guest polls.

The layout (header, one slot per stream) is the guest ABI, shared with
guest_tools: vpcie/protocol/guest_abi.py. Here is the backend's writer.
"""

from __future__ import annotations

from vpcie.memory import word_view
from vpcie.protocol.codes import MAX_STREAMS
from vpcie.protocol.guest_abi import FENCE_HEADER as HEADER
from vpcie.protocol.guest_abi import (
    FENCE_MAGIC,
    FENCE_PAGE_SIZE,
    FENCE_VERSION,
    HEADER_ST,
    SLOT_ST,
    fence_slot_offset,
)
from vpcie.protocol.guest_abi import FENCE_SLOT as SLOT

__all__ = [
    "FENCE_MAGIC",
    "FENCE_PAGE_SIZE",
    "FENCE_VERSION",
    "HEADER",
    "HEADER_ST",
    "SLOT",
    "SLOT_ST",
    "FencePage",
]

_REJECTED, _LAST_REJECT = 2, 3  # header fields, as u32 indices


class FencePage:
    """Writes one context's fence page through a checked view of guest memory.

    ``view`` is a memoryview of exactly FENCE_PAGE_SIZE bytes obtained through
    GuestMemory (the device checks the range and its 8-byte alignment when
    FENCE_PAGE_SET arrives). The guest reads the page while we write it, so
    every field is written with one store of its width (``word_view``).
    """

    def __init__(self, view: memoryview) -> None:
        if len(view) != FENCE_PAGE_SIZE:
            raise ValueError("fence page view has the wrong size")
        self.view = view
        self._u32 = word_view(view, "I")
        self._u64 = word_view(view, "Q")
        self.rejected = 0
        view[:FENCE_PAGE_SIZE] = bytes(FENCE_PAGE_SIZE)
        HEADER_ST.pack_into(view, 0, FENCE_MAGIC, FENCE_VERSION, MAX_STREAMS, 0, 0)

    slot_offset = staticmethod(fence_slot_offset)

    def complete(self, stream: int, seq: int, error_code: int = 0, failed_index: int = 0) -> None:
        """Publish ``seq`` on ``stream``; error fields first, then the sequence."""
        q = (HEADER_ST.size + stream * SLOT_ST.size) >> 3  # completed_seq, as a u64 index
        if error_code:
            w = (q + 2) << 1  # error_code, as a u32 index
            self._u32[w] = error_code
            self._u32[w + 1] = failed_index
            self._u64[q + 1] = seq  # error_seq
        self._u64[q] = seq

    def reject(self, error_code: int) -> None:
        """Count a rejected submission: its reason first, then the count."""
        self.rejected += 1
        self._u32[_LAST_REJECT] = error_code
        self._u32[_REJECTED] = self.rejected & 0xFFFF_FFFF

    def read_slot(self, stream: int) -> tuple[int, int, int, int]:
        values: tuple[int, int, int, int] = SLOT_ST.unpack_from(self.view, self.slot_offset(stream))
        return values
