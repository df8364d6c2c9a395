"""Split virtqueues (virtio 1.2 §2.7): device side, driver side, descriptor chains."""

from vpcie.protocol.virtq import MAX_CHAIN_BYTES, MAX_CHAIN_SEGMENTS, MAX_INDIRECT_ENTRIES
from vpcie.virtqueue.chain import ChainWalker, DescChain, PythonWalker, walk_chain
from vpcie.virtqueue.device import VirtQueue
from vpcie.virtqueue.driver import DriverQueue, GuestAllocator, QueueFull
from vpcie.virtqueue.faults import ChainError, ChainFault

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_CHAIN_SEGMENTS",
    "MAX_INDIRECT_ENTRIES",
    "ChainError",
    "ChainFault",
    "ChainWalker",
    "DescChain",
    "DriverQueue",
    "GuestAllocator",
    "PythonWalker",
    "QueueFull",
    "VirtQueue",
    "walk_chain",
]
