"""atheris fuzz target for the descriptor-chain walkers (Python and native C).

The input is guest memory: byte 0 picks the queue size, byte 1 picks the
walker's segment cap, the rest is copied over a small guest RAM that holds the
avail ring (GPA 0), the descriptor table (GPA 0x50) and room for indirect tables and
buffers; a hole and a third region follow so addresses can fall off. The
device queue pops every available entry with each walker. The only allowed
outcome is success or a GuestError, and both walkers must agree exactly.

Run it longer by hand (Ctrl-C to stop; a crash leaves crash-* files):

    .venv/bin/python -m vpcie._native._build
    mkdir -p /tmp/chain-corpus
    .venv/bin/python tests/fuzz/fuzz_chain.py -max_total_time=3600 -max_len=4200 /tmp/chain-corpus

The pytest wrapper (tests/fuzz/test_fuzz_chain.py) runs it bounded.
"""

from __future__ import annotations

import struct
import sys

from vpcie._native import native_available
from vpcie.errors import GuestError
from vpcie.memory import GuestMemory
from vpcie.protocol.virtq import AVAIL_IDX, AVAIL_RING
from vpcie.virtqueue.faults import ChainError
from vpcie.virtqueue.impl import select_walker

RAM = [(0, 0x800), (0x800, 0x800), (0x2000, 0x800)]  # contiguous pair, hole, third
AVAIL_GPA = 0  # the avail ring first, so short inputs already reach the walker
DESC_GPA = 0x50  # after an avail ring of up to 32 entries

_mem = GuestMemory.anonymous(RAM)
_walkers = [select_walker("python")] + ([select_walker("native")] if native_available() else [])


def _outcome(walker_index: int, num: int, head: int) -> object:
    walker = _walkers[walker_index]
    try:
        chain = walker.walk(_mem, DESC_GPA, num, head)
    except ChainError as exc:
        return ("fault", exc.key(), str(exc))
    data = chain.read_all() if chain.read_len <= 1 << 16 else b""
    return ("ok", chain.readable, chain.writable, chain.read_len, chain.write_len, data)


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    num = 1 << (data[0] % 6)  # 1..32
    for gpa, size in RAM:
        _mem.write(gpa, bytes(size))
    _mem.write(0, data[2 : 2 + 0x1000])  # over both contiguous regions
    # the avail ring as the device reads it (§2.7.6): idx then entries
    avail_idx = struct.unpack_from("<H", _mem.read(AVAIL_GPA + AVAIL_IDX, 2))[0]
    pending = (avail_idx - 0) & 0xFFFF
    if pending > num:
        return  # VirtQueue.pop() refuses this with a GuestError; covered in unit tests
    for i in range(pending):
        head = _mem.read_u16(AVAIL_GPA + AVAIL_RING + 2 * (i % num))
        results = []
        for w in range(len(_walkers)):
            try:
                results.append(_outcome(w, num, head))
            except GuestError as exc:  # any other GuestError is also a clean outcome
                results.append(("guest", str(exc)))
        if any(r != results[0] for r in results):
            raise AssertionError(f"walkers disagree on head {head}: {results!r}")


def main() -> None:
    import atheris

    atheris.instrument_all()  # coverage feedback for every loaded Python function
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
