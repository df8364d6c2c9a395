"""``vpcie-agent serve`` refuses, at start and in one line naming the file, a
certificate that is not this fleet's valid server certificate."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.agent_helpers import agent_cli, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_pki(tmp_path_factory.mktemp("pki"))
    # A server certificate from another CA, copied in as "stranger".
    other = make_pki(tmp_path_factory.mktemp("other"))
    for ext in ("crt", "key"):
        shutil.copy(other / f"agent1.{ext}", d / f"stranger.{ext}")
    # Server certificates of this CA that are expired / not valid yet.
    now = dt.datetime.now(dt.UTC)
    _issue(d, "expired", now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    _issue(d, "future", now + dt.timedelta(days=1), now + dt.timedelta(days=30))
    return d


def _issue(d: Path, name: str, not_before: dt.datetime, not_after: dt.datetime) -> None:
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / f"{name}.key").chmod(0o600)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("backend1", "is a client certificate (no serverAuth extendedKeyUsage)"),
        ("ca", "is a CA certificate, not a server certificate"),
        ("expired", "expired on"),
        ("future", "is not valid before"),
        ("stranger", "is not signed by the fleet CA"),
    ],
)
def test_serve_refuses_certificate(pki: Path, name: str, why: str) -> None:
    r = agent_cli("serve", "--listen", "127.0.0.1:0", "--tls-dir", str(pki), "--cert-name", name,
                  "--executor", "cpu", timeout=20)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(pki / f"{name}.crt") in lines[0] and why in lines[0], lines[0]


def test_serve_accepts_its_server_certificate(pki: Path) -> None:
    from host_agent.tls import check_server_cert

    check_server_cert(str(pki / "agent1.crt"), str(pki / "ca.crt"))  # no exception
