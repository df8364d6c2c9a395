"""Split virtqueue layout and limits (virtio 1.2 §2.7): a wire format too, in
guest memory (the generated vpcie/_native/vpcie_wire.h carries it to vq.c).

Offsets are relative to a ring's base GPA; the GPAs they produce go through
GuestMemory (or through the C walker, which re-checks them).
"""

from __future__ import annotations

import struct

# virtio 1.2 §2.7.5: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
# (field, struct format) in order: DESC and the C header's offsets come from it.
DESC_FIELDS = (("addr", "Q"), ("len", "I"), ("flags", "H"), ("next", "H"))
DESC = struct.Struct("<" + "".join(f for _, f in DESC_FIELDS))
DESC_SIZE = DESC.size
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4  # §2.7.5.3

# §2.7.6: struct virtq_avail { le16 flags; le16 idx; le16 ring[num]; le16 used_event; }
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
AVAIL_ENTRY_SIZE = 2  # le16 ring[num]

# §2.7.8: struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[num];
#          le16 avail_event; }  with  virtq_used_elem { le32 id; le32 len; }
VIRTQ_USED_F_NO_NOTIFY = 1
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4
USED_ELEM_FIELDS = (("id", "I"), ("len", "I"))
USED_ELEM = struct.Struct("<" + "".join(f for _, f in USED_ELEM_FIELDS))
USED_ELEM_SIZE = USED_ELEM.size

# §2.7 "Queue Size": a power of 2, at most 32768 for split rings.
MAX_QUEUE_SIZE = 32768
# §2.7 alignment table: descriptor table 16, available ring 2, used ring 4.
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# Caps on what the guest controls (named so reviewers can find them).
# QEMU's VIRTQUEUE_MAX_SIZE is 1024: it refuses longer chains too.
MAX_CHAIN_SEGMENTS = 1024  # buffers in one chain, direct + indirect together
MAX_INDIRECT_ENTRIES = 1024  # entries in one indirect table (§2.7.5.3)
MAX_CHAIN_BYTES = 0xFFFF_FFFF  # total bytes of a chain: used.len is a le32 (§2.7.8)
# VirtQueue.serve: a request longer than the device's limit reaches it as this
# many leading bytes (enough for any header it answers an error from).
REQUEST_PREFIX = 64


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return 6 + 2 * num  # flags, idx, ring[num], used_event


def used_ring_size(num: int) -> int:
    return 6 + USED_ELEM_SIZE * num  # flags, idx, ring[num], avail_event


def used_event_offset(num: int) -> int:
    """Offset of used_event in the avail ring (§2.7.10, EVENT_IDX)."""
    return AVAIL_RING + 2 * num


def avail_event_offset(num: int) -> int:
    """Offset of avail_event in the used ring (§2.7.10, EVENT_IDX)."""
    return USED_RING + USED_ELEM_SIZE * num


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10 / Linux vring_need_event: did [old, new) cross ``event_idx``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def field_offsets(fields: tuple[tuple[str, str], ...]) -> list[tuple[str, int]]:
    """(name, byte offset) of each field of a little-endian struct layout."""
    out, at = [], 0
    for name, fmt in fields:
        out.append((name, at))
        at += struct.calcsize("<" + fmt)
    return out
