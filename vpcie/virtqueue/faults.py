"""Descriptor-chain faults: one kind per way a guest can break a chain.

The Python walker and the C walker report the same (kind, index, value,
indirect) tuple and this module turns it into the one message both give, so a
differential test can compare them exactly. Kind numbers are shared with
``vpcie/_native/vq.c`` (``VQ_E_*``); a unit test checks they agree.
"""

from __future__ import annotations

from enum import IntEnum

from vpcie.errors import GuestError


class ChainFault(IntEnum):
    HEAD_OUT_OF_RANGE = 1  # avail ring names a head >= queue size (§2.7.6)
    NEXT_OUT_OF_RANGE = 2  # desc.next >= table size (§2.7.5)
    LOOP = 3  # more hops than table entries: the chain loops (§2.7.5.2 hop limit)
    TOO_MANY_SEGMENTS = 4  # more than MAX_CHAIN_SEGMENTS buffers
    CHAIN_TOO_BIG = 5  # total bytes above MAX_CHAIN_BYTES
    DESC_OUT_OF_RANGE = 6  # the descriptor itself is not in guest memory
    BUFFER_OUT_OF_RANGE = 7  # desc.addr/len not in guest memory
    READABLE_AFTER_WRITABLE = 8  # §2.7.4.2
    NESTED_INDIRECT = 9  # INDIRECT inside an indirect table (§2.7.5.3.1)
    INDIRECT_WITH_NEXT = 10  # INDIRECT and NEXT together (§2.7.5.3.1)
    INDIRECT_BAD_LEN = 11  # table length 0 or not a multiple of 16 (§2.7.5.3.1)
    INDIRECT_TOO_LARGE = 12  # more than MAX_INDIRECT_ENTRIES entries
    INDIRECT_OUT_OF_RANGE = 13  # indirect table not in guest memory


_TEXT = {
    ChainFault.HEAD_OUT_OF_RANGE: "chain head {index} is not below queue size {value}",
    ChainFault.NEXT_OUT_OF_RANGE: "descriptor {index} has next={value} beyond its table",
    ChainFault.LOOP: "descriptor chain loops: hop limit {value} reached at descriptor {index}",
    ChainFault.TOO_MANY_SEGMENTS: "descriptor chain has more than {value} buffers (at {index})",
    ChainFault.CHAIN_TOO_BIG: "descriptor chain carries more than {value:#x} bytes (at {index})",
    ChainFault.DESC_OUT_OF_RANGE: "descriptor {index} at GPA {value:#x} is outside guest memory",
    ChainFault.BUFFER_OUT_OF_RANGE: "descriptor {index} buffer at GPA {value:#x} is outside "
    "guest memory",
    ChainFault.READABLE_AFTER_WRITABLE: "descriptor {index} is device-readable after a "
    "device-writable one (virtio 1.2 §2.7.4.2)",
    ChainFault.NESTED_INDIRECT: "descriptor {index} sets INDIRECT inside an indirect table",
    ChainFault.INDIRECT_WITH_NEXT: "descriptor {index} sets both INDIRECT and NEXT",
    ChainFault.INDIRECT_BAD_LEN: "descriptor {index} indirect table length {value} is 0 or not "
    "a multiple of 16",
    ChainFault.INDIRECT_TOO_LARGE: "descriptor {index} indirect table has {value} entries, "
    "above the cap",
    ChainFault.INDIRECT_OUT_OF_RANGE: "descriptor {index} indirect table at GPA {value:#x} is "
    "outside guest memory",
}


class ChainError(GuestError):
    """A descriptor chain the guest built is invalid (a GuestError: answer, keep serving).

    ``head`` is set by ``VirtQueue.pop()``: the avail entry was consumed, so the
    device should hand the head back with ``push(head, 0)``.
    """

    def __init__(self, kind: ChainFault, index: int, value: int, indirect: bool) -> None:
        self.kind = ChainFault(kind)
        self.index = index
        self.value = value
        self.indirect = indirect
        self.head: int | None = None
        where = " (indirect table)" if indirect else ""
        super().__init__(_TEXT[self.kind].format(index=index, value=value) + where)

    def key(self) -> tuple[ChainFault, int, int, bool]:
        return (self.kind, self.index, self.value, self.indirect)
