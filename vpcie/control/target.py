"""A bind request made into the agent target it names: reads the PSK file,
loads the TLS files (the I/O that ``messages`` leaves to the server)."""

from __future__ import annotations

from pathlib import Path

from vpcie.control.messages import BindRequest
from vpcie.gpu.binding import AgentTarget
from vpcie.tls_files import client_tls_context

__all__ = ["bind_target", "client_tls_context"]


def bind_target(req: BindRequest) -> AgentTarget:
    """The target ``req`` names, its credential loaded: OSError for a PSK
    file that cannot be read, ValueError for an empty one, ConfigError for
    TLS files that cannot be used."""
    host, port = req.address()
    psk = tls = None
    if req.psk_file:
        psk = Path(req.psk_file).read_bytes().strip()
        if not psk:
            raise ValueError(f"PSK file {req.psk_file} is empty")
    elif req.tls_dir:
        tls = client_tls_context(req.tls_dir, req.tls_name)
    else:
        raise ValueError("bind needs psk_file or tls_dir")
    return AgentTarget(
        host,
        port,
        psk=psk,
        tls=tls,
        device=req.device,
        mem_quota=req.mem_quota,
        max_inflight=req.max_inflight,
        lease_token=req.lease_token,
        lease_live=req.lease_live,
    )
