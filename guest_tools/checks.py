"""Failure checks run inside a guest: a hostile or unlucky tenant through the
stock virtio_gpu driver must get precise errors, and other contexts must keep
working. Used by tests/integration/test_guest_vgpu.py.

    python3 checks.py hostile    # refused batches, foreign and out-of-range buffers
    python3 checks.py unbind     # holds work, says "held"; the host unbinds the GPU
    python3 checks.py kill       # the same; the host kills the agent

Each check prints ``vpcie-guest: check NAME ok`` or ``... FAILED: why``; the
exit status is the number of failed checks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from guest_tools.vgpu import FENCE_MAGIC, Device
from vpcie.errors import ErrorCode
from vpcie.protocol.batch import encode_batch, rec
from vpcie.protocol.codes import Opcode
from vpcie.protocol.guest_abi import FENCE_HEADER_SIZE, HEADER_ST


def say(line: str) -> None:
    print(f"vpcie-guest: {line}", flush=True)


def fence_header(dev: Device) -> tuple[int, int, int]:
    """(magic, rejected count, last reject code) of this context's fence page."""
    magic, _version, _nslots, rejected, last = HEADER_ST.unpack(
        dev.fence.read(0, FENCE_HEADER_SIZE)
    )
    return magic, rejected, last


def wait_rejected(dev: Device, count: int, timeout: float = 10.0) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    while True:
        head = fence_header(dev)
        if head[1] >= count or time.monotonic() > deadline:
            return head
        time.sleep(0.001)


def check_malformed_batch(dev: Device) -> str:
    before = fence_header(dev)[1]
    dev.node.execbuffer(b"\x00garbage, not a vGPU batch" * 3)  # the kernel sends it as is
    magic, rejected, last = wait_rejected(dev, before + 1)
    if magic != FENCE_MAGIC or rejected != before + 1 or last != ErrorCode.PROTOCOL:
        return f"fence header says magic {magic:#x}, rejected {rejected}, reason {last}"
    truncated = encode_batch([rec(Opcode.NOP), rec(Opcode.NOP)])[:-3]
    dev.node.execbuffer(truncated)
    if wait_rejected(dev, before + 2)[1] != before + 2:
        return "a truncated batch was not refused"
    return "" if dev.run([rec(Opcode.NOP)]).ok else "the context stopped working"


def check_foreign_buffer(dev: Device) -> str:
    """A second DRM fd is a second context: it may not name the first's buffers."""
    with Device() as other:
        theirs = other.buffer(4096)
        h = dev.run([rec(Opcode.MEM_ALLOC, 4096, 0)]).check().value(0)
        reply = dev.run([rec(Opcode.COPY_D2H, h, theirs.resource_id, 0, 0, 4096)])
        if reply.status != ErrorCode.INVALID_HANDLE:
            return f"naming another context's buffer gave {reply.status.name}"
        if not other.run([rec(Opcode.NOP)]).ok:
            return "the other context stopped working"
        dev.run([rec(Opcode.MEM_FREE, h)]).check()
        theirs.close()
    return ""


def check_out_of_range(dev: Device) -> str:
    mine = dev.buffer(4096)
    h = dev.run([rec(Opcode.MEM_ALLOC, 8192, 0)]).check().value(0)
    bad = [
        rec(Opcode.COPY_H2D, h, mine.resource_id, 0, 4000, 200),  # past the buffer's end
        rec(Opcode.COPY_D2H, h, mine.resource_id, 0, 1 << 40, 16),  # far outside
        rec(Opcode.COPY_H2D, h, 0xDEAD, 0, 0, 16),  # no such resource
    ]
    want = [ErrorCode.OUT_OF_RANGE, ErrorCode.OUT_OF_RANGE, ErrorCode.INVALID_HANDLE]
    for record, code in zip(bad, want, strict=True):
        reply = dev.run([rec(Opcode.NOP), record])
        if reply.status != code or reply.failed_index != 1:
            return f"{record} gave {reply.status.name} at {reply.failed_index}, want {code.name}"
    mine.close()
    return "" if dev.run([rec(Opcode.MEM_FREE, h)]).ok else "the context stopped working"


def run_checks(checks: dict[str, Callable[[Device], str]]) -> int:
    failed = 0
    with Device() as dev:
        for name, check in checks.items():
            try:
                why = check(dev)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            say(f"check {name} " + (f"FAILED: {why}" if why else "ok"))
            failed += bool(why)
    return failed


def held(after_code: ErrorCode) -> int:
    """Work held on the agent; when it reads "held" the host unbinds the GPU
    (then new work is NO_DEVICE) or kills the agent (then this context's
    session is gone: DEVICE_LOST until the program opens a new context)."""
    with Device() as dev:
        dev.run([rec(Opcode.MEM_ALLOC, 64, 0)]).check()  # opens the agent session
        seq = dev.start([rec(Opcode.EVENT_WAIT, 7, stream=1), rec(Opcode.NOP, stream=1)], stream=1)
        # The ioctl returns once the chain is on the ring, not once the device
        # has read it. A round trip on stream 0 (served after the held batch,
        # in ring order, over the same session) proves the held batch is on
        # the agent before the host is told to act; without it an unbind can
        # reach the backend first, and the batch is then rightly NO_DEVICE.
        dev.run([rec(Opcode.NOP)]).check()
        t0 = time.monotonic()
        say("held")
        reply = dev.wait(1, seq, timeout=30)
        ms = (time.monotonic() - t0) * 1e3
        say(f"held batch ended with {reply.status.name} after {ms:.0f} ms")
        after = dev.run([rec(Opcode.MEM_ALLOC, 64, 0)])
        say(f"work after it: {after.status.name}")
        ok = reply.status == ErrorCode.DEVICE_LOST and after.status == after_code
    say("check held " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "hostile"
    if what == "hostile":
        return run_checks(
            {
                "malformed-batch": check_malformed_batch,
                "foreign-buffer": check_foreign_buffer,
                "out-of-range": check_out_of_range,
            }
        )
    if what == "unbind":
        return held(ErrorCode.NO_DEVICE)
    if what == "kill":
        return held(ErrorCode.DEVICE_LOST)
    say(f"unknown check set {what!r} (hostile, unbind, kill)")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
