"""atheris target: the vhost-user codec and connection state machine.

Only ProtocolError may come out, whatever the bytes. Run directly for a long
campaign: ``python tests/fuzz/fuzz_vhost_user.py -max_total_time=600``.
"""

from __future__ import annotations

import sys

from vpcie.errors import ProtocolError
from vpcie.vhost_user.codec import MessageDecoder, encode_message
from vpcie.vhost_user.connection import Connection


class _NullHandler:
    def offered_features(self) -> int:
        return (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | 3

    def offered_protocol_features(self) -> int:
        return 0x2209

    def num_queues(self) -> int:
        return 2

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: object, fds: object) -> None: ...

    def start_ring(self, ring: object) -> None: ...

    def stop_ring(self, index: int) -> int:
        return 0

    def set_call_fd(self, index: int, fd: int | None) -> None: ...

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(16)

    def set_config(self, offset: int, data: bytes) -> None: ...

    def set_gpu_socket(self, fd: int) -> None: ...

    def reset(self) -> None: ...


def one_input(data: bytes) -> None:
    """Decode (both directions) and drive a connection; only ProtocolError allowed."""
    for replies in (False, True):
        dec = MessageDecoder(replies=replies)
        try:
            for msg in dec.feed(data):
                # Whatever decodes must encode back to the very same bytes.
                enc = encode_message(msg)
                again = MessageDecoder(replies=replies).feed(enc)
                assert again == [msg], (msg, again)
        except ProtocolError:
            pass
    conn = Connection(_NullHandler())  # type: ignore[arg-type]
    try:
        conn.receive(data)
    except ProtocolError:
        pass
    finally:
        conn.close()


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, lambda d: one_input(bytes(d)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
