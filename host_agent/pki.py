"""A small fleet CA: ``vpcie-agent pki init`` / ``pki issue``.

Files in the PKI directory: ``ca.key`` + ``ca.crt`` (the CA), ``NAME.key`` +
``NAME.crt`` per agent (server) or backend (client). Keys are written 0600.
EC P-256 keys, SHA-256 signatures; the CA key should live off the GPU hosts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vpcie.errors import ConfigError
from vpcie.fileerrors import os_error_line
from vpcie.tls_files import check_pki_files

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_DAYS = 3650
LEAF_DAYS = 825
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pki_folder(directory: Path, create: bool) -> None:
    """ConfigError (one line, naming the folder and the user) unless
    ``directory`` is a folder we can use; made (0700) when ``create``."""
    try:
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = directory.stat().st_mode
    except FileExistsError:
        raise ConfigError(f"PKI folder {directory} exists and is not a folder") from None
    except OSError as exc:
        what = "create PKI folder" if create else "open PKI folder"
        raise ConfigError(os_error_line(what, directory, exc)) from exc
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"PKI folder {directory} exists and is not a folder")


def init_ca(directory: Path, common_name: str = "vpcie fleet CA") -> Path:
    _pki_folder(directory, create=True)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if key_path.exists() or cert_path.exists():
        raise ConfigError(f"{directory} already holds a CA; remove {CA_KEY}/{CA_CERT} first")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    _pki_folder(directory, create=False)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if not key_path.exists() and not cert_path.exists():
        raise ConfigError(f"no CA in {directory}: run 'vpcie-agent pki init --dir {directory}'")
    check_pki_files(cert_path, cert_path, key_path)  # names a missing or corrupt file
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{directory / CA_KEY} is not an EC key")
    return key, cert


def _san(entries: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for entry in entries:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            out.append(x509.DNSName(entry))
    return out


def issue(directory: Path, name: str, *, server: bool, sans: list[str] | None = None) -> Path:
    """Issue NAME.key/NAME.crt signed by the CA; server certs get SANs
    (default: NAME, localhost, 127.0.0.1), client certs clientAuth only."""
    if not _NAME_RE.match(name) or name == "ca":
        raise ConfigError(f"bad certificate name {name!r}: use letters, digits, '.', '_', '-'")
    ca_key, ca_cert = _load_ca(directory)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    if key_path.exists() or cert_path.exists():
        raise ConfigError(f"{cert_path} already exists")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if server:
        names = sans if sans else [name, "localhost", "127.0.0.1"]
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def find_server_cert(directory: Path, name: str | None) -> tuple[Path, Path]:
    """(cert, key) of the agent: NAME, or the one server certificate there;
    both checked with the CA (one line naming a missing or corrupt file)."""
    cert, key = _find_server_cert(directory, name)
    check_pki_files(directory / CA_CERT, cert, key)
    return cert, key


def _find_server_cert(directory: Path, name: str | None) -> tuple[Path, Path]:
    _pki_folder(directory, create=False)
    if name:
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        if not cert.exists() or not key.exists():
            raise ConfigError(f"{cert} or {key} missing: run 'vpcie-agent pki issue --server'")
        return cert, key
    found = []
    for cert_path in sorted(directory.glob("*.crt")):
        if cert_path.name == CA_CERT:
            continue
        try:
            leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, x509.ExtensionNotFound):
            continue
        if ExtendedKeyUsageOID.SERVER_AUTH in eku and cert_path.with_suffix(".key").exists():
            found.append(cert_path)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ConfigError(f"{what} server certificates in {directory}: name one with --cert-name")
    return found[0], found[0].with_suffix(".key")
