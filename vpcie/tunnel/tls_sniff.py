"""Does the peer at HOST:PORT speak TLS? Asked only after a PSK handshake
died before the agent's HELLO reply: a TLS agent reads our HELLO frame as a
broken ClientHello and resets the connection, which alone reads as "connection
reset" — the answer turns that into "this agent expects TLS (use --tls-dir)".

Costs the agent one short unauthenticated connection, on a failure path only.
"""

from __future__ import annotations

import asyncio
import ssl

SNIFF_TIMEOUT_S = 2.0


def _sniff_context() -> ssl.SSLContext:
    # Verification off: this connection carries nothing and only asks whether
    # a TLS server answers; any certificate (or a demand for ours) proves it.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def is_tls_answer(exc: BaseException | None) -> bool:
    """Whether the handshake's outcome shows a TLS server: it completed
    (``None``), or the peer sent a TLS alert (e.g. "certificate required")."""
    if exc is None:
        return True
    return isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason or "").upper()


async def speaks_tls(host: str, port: int, timeout: float = SNIFF_TIMEOUT_S) -> bool:
    """True when a TLS handshake with HOST:PORT gets a TLS answer in ``timeout``."""
    outcome: BaseException | None = None
    writer = None
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(
                host, port, ssl=_sniff_context(), server_hostname=None
            )
    except (OSError, TimeoutError) as exc:
        outcome = exc
    if writer is not None:
        writer.close()
    return is_tls_answer(outcome)
