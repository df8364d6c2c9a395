"""Check a PKI folder's files one by one before handing them to OpenSSL.

``ssl.SSLContext.load_cert_chain`` reports a corrupt key, a certificate given
as a key or an unreadable file alike as "[SSL] PEM lib": it does not say which
file. These checks run once, where a context is made (agent start, backend
bind), never per session; each failure is one line naming the file (and the
user, for files that cannot be opened).
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from vpcie.errors import ConfigError
from vpcie.fileerrors import os_error_line


def tls_folder(text: str, option: str = "--tls-dir") -> Path:
    """An absolute path to an existing folder, or ConfigError."""
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(
            f"{option} {text}: give an absolute path (a backend resolves paths in its own "
            "working directory, not in yours)"
        )
    try:
        if not stat.S_ISDIR(path.stat().st_mode):
            raise ConfigError(f"{option} {text} is not a folder")
    except OSError as exc:
        raise ConfigError(f"{option}: " + os_error_line("open folder", path, exc)) from exc
    return path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(os_error_line(f"read the {what}", path, exc)) from exc


def check_pki_files(ca: Path, cert: Path, key: Path) -> None:
    """ConfigError naming the first of ``ca``, ``cert``, ``key`` that cannot be
    read or parsed, or a key that is not the certificate's."""
    try:
        x509.load_pem_x509_certificates(_read(ca, "CA certificate"))
    except ValueError:
        raise ConfigError(f"{ca} is not a PEM certificate (corrupt or the wrong file)") from None
    try:
        leaf = x509.load_pem_x509_certificate(_read(cert, "certificate"))
    except ValueError:
        raise ConfigError(f"{cert} is not a PEM certificate (corrupt or the wrong file)") from None
    try:
        private = serialization.load_pem_private_key(_read(key, "private key"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{key} is not an unencrypted PEM private key (corrupt or the wrong file)"
        ) from None
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if leaf.public_key().public_bytes(pem, fmt) != private.public_key().public_bytes(pem, fmt):
        raise ConfigError(f"{key} is not the key of {cert} (they do not match)")


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
