"""How a device answers a request: the handler type and a deferred answer.

A leaf module (it imports only ``chain``): both ring implementations, the
Python one in ``device.py`` and the C one behind ``vpcie/virtqueue/native_ring.py``,
use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable

from vpcie.virtqueue.chain import DescChain

# What a device answers a request with (VirtQueue.serve): (request bytes, the
# chain's readable length) -> response bytes (b"": nothing written).
RequestHandler = Callable[[bytes, int], bytes]


class Withheld(bytes):
    """A response the device gives later: ``serve`` hands the chain to
    ``keep`` instead of returning it, and the device returns it with
    ``VirtQueue.answer`` once it can (a split virtqueue's used ring takes
    chains in any order unless VIRTIO_F_IN_ORDER, which we never offer)."""

    keep: Callable[[DescChain], None]


def withheld(response: bytes, keep: Callable[[DescChain], None]) -> Withheld:
    out = Withheld(response)
    out.keep = keep
    return out
