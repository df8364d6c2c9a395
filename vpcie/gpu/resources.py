"""Resources: guest buffers known to the device, and their backing pages.

A resource's storage is its backing: guest pages named by ATTACH_BACKING
(virtio 1.2 §5.7.6.8). Copies to and from the remote GPU read and write those
pages directly (scatter-gather through GuestMemory): that is the vGPU's DMA.
Every entry is checked against guest memory when attached and again (by
GuestMemory) when used.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from vpcie.errors import GuestError
from vpcie.memory import GuestMemory

# Caps on what the guest controls (STYLE.md habit 6).
MAX_RESOURCES = 65536
MAX_BACKING_ENTRIES = 16384  # QEMU's vhost-user-gpu uses the same bound
MAX_RESOURCE_BYTES = 1 << 32  # 4 GiB per resource
MAX_2D_DIMENSION = 16384


class ResourceError(GuestError):
    """Unknown or unusable resource id (ERR_INVALID_RESOURCE_ID)."""


class ParameterError(GuestError):
    """A request field out of range (ERR_INVALID_PARAMETER)."""


@dataclass(slots=True)
class Resource:
    resource_id: int
    size: int  # bytes the guest may address through this resource
    is_3d: bool
    width: int = 0
    height: int = 0
    format: int = 0
    backing: list[tuple[int, int]] | None = None  # (gpa, length) in guest order
    backing_bytes: int = 0
    contexts: set[int] = field(default_factory=set)

    def segments(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Guest ranges holding resource bytes [offset, offset + size)."""
        if self.backing is None:
            raise ParameterError(f"resource {self.resource_id} has no backing")
        if offset < 0 or size < 0 or offset + size > min(self.size, self.backing_bytes):
            raise ParameterError(
                f"range {offset}+{size} outside resource {self.resource_id} "
                f"({min(self.size, self.backing_bytes)} bytes backed)"
            )
        out: list[tuple[int, int]] = []
        pos = 0
        end = offset + size
        for gpa, length in self.backing:
            if pos >= end:
                break
            lo, hi = max(offset, pos), min(end, pos + length)
            if lo < hi:
                out.append((gpa + (lo - pos), hi - lo))
            pos += length
        return out

    def views(self, mem: GuestMemory, offset: int, size: int) -> list[memoryview]:
        """Checked memoryviews over resource bytes [offset, offset + size)."""
        out: list[memoryview] = []
        for gpa, length in self.segments(offset, size):
            out.extend(mem.views(gpa, length))
        return out


class ResourceTable:
    def __init__(self) -> None:
        self._res: dict[int, Resource] = {}

    def __len__(self) -> int:
        return len(self._res)

    def __contains__(self, rid: int) -> bool:
        return rid in self._res

    def get(self, rid: int) -> Resource:
        res = self._res.get(rid)
        if res is None:
            raise ResourceError(f"unknown resource {rid}")
        return res

    def all(self) -> list[Resource]:
        return list(self._res.values())

    def create(self, res: Resource) -> None:
        if res.resource_id == 0:
            raise ResourceError("resource id 0 is reserved")
        if res.resource_id in self._res:
            raise ResourceError(f"resource {res.resource_id} already exists")
        if len(self._res) >= MAX_RESOURCES:
            raise ParameterError(f"too many resources (cap {MAX_RESOURCES})")
        if res.size <= 0 or res.size > MAX_RESOURCE_BYTES:
            raise ParameterError(f"resource size {res.size} out of range")
        self._res[res.resource_id] = res

    def unref(self, rid: int) -> Resource:
        res = self.get(rid)
        del self._res[rid]
        return res

    def clear(self) -> None:
        self._res.clear()


def check_backing(mem: GuestMemory, entries: list[tuple[int, int]]) -> int:
    """Validate ATTACH_BACKING entries; returns their total length.

    Each entry must lie inside guest memory; entries must not overlap each
    other (a hostile guest could otherwise alias one page twice in a copy).
    """
    if not entries:
        raise ParameterError("ATTACH_BACKING with no entries")
    if len(entries) > MAX_BACKING_ENTRIES:
        raise ParameterError(f"{len(entries)} backing entries over cap {MAX_BACKING_ENTRIES}")
    total = 0
    for gpa, length in entries:
        if length == 0:
            raise ParameterError(f"zero-length backing entry at {gpa:#x}")
        if not mem.contains(gpa, length):
            raise ParameterError(f"backing entry {gpa:#x}+{length} outside guest memory")
        total += length
    ordered = sorted(entries)
    for (a, alen), (b, _blen) in itertools.pairwise(ordered):
        if a + alen > b:
            raise ParameterError(f"backing entries overlap at {b:#x}")
    return total
