"""TLS contexts: the agent requires a client certificate from the fleet CA
(mutual TLS, TLS 1.3 only); ``client_context`` is the backend's side."""

from __future__ import annotations

import ssl

from vpcie.errors import ConfigError


def server_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert_file, key_file)
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({cert_file}, {ca_file}): {exc}") from exc
    return ctx


def client_context(
    ca_file: str, cert_file: str | None, key_file: str | None, *, check_hostname: bool = True
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def peer_name(sock: ssl.SSLSocket) -> str:
    """The client certificate's common name (for logs)."""
    cert = sock.getpeercert()
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return ""
