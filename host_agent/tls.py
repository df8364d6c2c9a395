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


def check_server_cert(cert_file: str, ca_file: str) -> None:
    """Refuse to serve with a certificate that is not this fleet's server
    certificate: a client cert (no serverAuth EKU) or a CA cert, one outside
    its validity period, or one the fleet CA did not sign. Backends would
    refuse each of these anyway, but only one handshake at a time, in their
    logs; the agent's operator should hear it at start, in one line."""
    import datetime as dt

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_file, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{cert_file} or {ca_file}: not a PEM certificate ({exc})") from exc
    ext = cert.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ConfigError(f"{cert_file} is a CA certificate, not a server certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        usages = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        client = usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH in usages
        kind = "a client certificate" if client else "not a server certificate"
        raise ConfigError(
            f"{cert_file} is {kind} (no serverAuth extendedKeyUsage): "
            "issue one with 'vpcie-agent pki issue --server'"
        )
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{cert_file} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"{cert_file} is not signed by the fleet CA {ca_file}") from exc
