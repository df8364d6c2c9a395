"""Read a connection's ``struct tcp_info`` (Linux getsockopt TCP_INFO) into a
liveness.TcpSnapshot.

The field offsets are those of <linux/tcp.h>, which lane.c reads through the
compiler (tests/unit/test_liveness.py checks these against cffi's offsetof
from that header, and against a real socket). Older kernels return a shorter
struct: a field past the end reads 0 (tcpi_rcv_ooopack came with Linux 5.4,
tcpi_snd_wnd with 6.2: without it, a closed window is assumed whenever bytes
wait unsent, which only makes the hung verdict wait for an ACK).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from vpcie.tunnel.liveness import TcpSnapshot

TCP_INFO = getattr(socket, "TCP_INFO", 11)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)

# name in TcpSnapshot -> (struct tcp_info field, offset, struct format)
FIELDS: dict[str, tuple[str, int, str]] = {
    "retransmits": ("tcpi_retransmits", 2, "B"),
    "unacked": ("tcpi_unacked", 24, "I"),
    "last_ack_ms": ("tcpi_last_ack_recv", 56, "I"),
    "last_rx_ms": ("tcpi_last_data_recv", 52, "I"),
    "total_retrans": ("tcpi_total_retrans", 100, "I"),
    "acked": ("tcpi_bytes_acked", 120, "Q"),
    "rx": ("tcpi_bytes_received", 128, "Q"),
    "ooo": ("tcpi_rcv_ooopack", 224, "I"),
    "notsent": ("tcpi_notsent_bytes", 144, "I"),
    "snd_wnd": ("tcpi_snd_wnd", 228, "I"),
}
SIZE = 232  # up to tcpi_snd_wnd (Linux 6.2+); the kernel copies min(ours, its)
_CODECS = [(name, off, struct.Struct("=" + fmt)) for name, (_f, off, fmt) in FIELDS.items()]


def parse(raw: bytes) -> TcpSnapshot:
    """A snapshot from TCP_INFO bytes (fields past the end of ``raw``: 0)."""
    values = {}
    for name, off, codec in _CODECS:
        values[name] = codec.unpack_from(raw, off)[0] if off + codec.size <= len(raw) else 0
    return TcpSnapshot(**values)


def snapshot(sock: Any) -> TcpSnapshot | None:
    """TCP_INFO of ``sock`` (a socket or asyncio's TransportSocket); None where
    there is none (not TCP, not Linux)."""
    try:
        return parse(sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, SIZE))
    except (OSError, AttributeError):
        return None


def set_user_timeout(sock: Any, ms: int) -> bool:
    """TCP_USER_TIMEOUT: the kernel drops the connection when data stays
    unacknowledged this long (the backstop under the liveness rule)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, ms)
    except (OSError, AttributeError):
        return False
    return True
