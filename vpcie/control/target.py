"""A bind request made into the agent target it names: reads the PSK file,
loads the TLS files (the I/O that ``messages`` leaves to the server)."""

from __future__ import annotations

import ssl
from pathlib import Path

from vpcie.control.messages import BindRequest
from vpcie.errors import ConfigError
from vpcie.gpu.binding import AgentTarget
from vpcie.tls_files import check_pki_files, tls_folder


def client_tls_context(tls_dir: str, name: str) -> ssl.SSLContext:
    """mTLS client context from a PKI folder made by ``vpcie-agent pki``:
    ca.crt, NAME.crt (a client certificate) and NAME.key. A folder or file
    that cannot be used is a ConfigError naming it (and the user we run as)."""
    d = tls_folder(tls_dir)
    ca, cert, key = d / "ca.crt", d / f"{name}.crt", d / f"{name}.key"
    check_pki_files(ca, cert, key)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:  # checked above; a race or an OpenSSL-only refusal
        raise ConfigError(f"cannot use TLS files in {d} ({name}.crt/.key, ca.crt): {exc}") from exc
    # The agent's certificate must name (SAN) the address the bind uses, so
    # another agent of the same fleet cannot answer in this one's place.
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


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
    )
