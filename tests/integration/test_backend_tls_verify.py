"""The backend checks the agent's certificate before it binds.

Each test asks a backend's control socket to ``bind`` over mutual TLS (the
real bind path: ``bind_target`` -> ``client_tls_context`` -> the
probe's TunnelClient) to an impostor: a TLS endpoint on 127.0.0.1 with a bad
certificate that relays everything to a real ``vpcie-agent`` (TLS, CPU
executor), presenting the backend's own client certificate there. So if the
backend skipped a check the bind would *succeed* through the impostor, and
each test would fail on ``ok`` as well as on the reason.

The impostor is not a vpcie-agent because an agent rightly refuses to serve
with an expired certificate or one from another CA; the refusal under test
is the backend's, at the TLS handshake, before any vpcie frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from host_agent import pki
from host_agent.tls import client_context
from tests.conftest import tls_agent_proc
from vpcie.control.client import control_request
from vpcie.control.server import ControlServer
from vpcie.gpu.binding import Binding
from vpcie.gpu.device import GpuDevice

pytestmark = pytest.mark.timeout(90)


def _expired_server_cert(fleet: Path, name: str) -> None:
    """NAME.crt/.key signed by the fleet CA, right name, validity ended yesterday
    (pki.issue cannot backdate, so it is built here the way pki builds one)."""
    ca_key = serialization.load_pem_private_key((fleet / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((fleet / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (fleet / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (fleet / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class Pki:
    fleet: Path  # ca.crt/.key, agent1 (good), backend (client), agent-expired, agent-elsewhere
    foreign: Path  # another CA and its agent1, with the right name and dates

    def pair(self, d: Path, name: str) -> tuple[Path, Path]:
        return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    fleet = tmp_path_factory.mktemp("fleet")
    foreign = tmp_path_factory.mktemp("foreign")
    pki.init_ca(fleet)
    pki.issue(fleet, "agent1", server=True, sans=["127.0.0.1"])
    pki.issue(fleet, "backend", server=False)
    pki.issue(fleet, "agent-elsewhere", server=True, sans=["agent7.example", "10.0.0.7"])
    _expired_server_cert(fleet, "agent-expired")
    pki.init_ca(foreign, common_name="some other CA")
    pki.issue(foreign, "agent1", server=True, sans=["127.0.0.1"])
    return Pki(fleet, foreign)


@pytest.fixture(scope="module")
def tls_agent(certs: Pki) -> Iterator[int]:
    """A real agent with the fleet's good server certificate; yields its port."""
    with tls_agent_proc(certs.fleet) as port:
        yield port


@dataclass
class Impostor:
    port: int
    handshakes: int = 0  # TLS handshakes the backend completed with it


@contextlib.asynccontextmanager
async def impostor(certs: Pki, cert: tuple[Path, Path], agent_port: int) -> AsyncIterator[Impostor]:
    """TLS on 127.0.0.1 with ``cert``, relaying to the real agent as the backend."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*cert)
    upstream_ctx = client_context(
        str(certs.fleet / "ca.crt"), *map(str, certs.pair(certs.fleet, "backend"))
    )
    state = Impostor(0)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        state.handshakes += 1  # only called once the TLS handshake is done
        ar, aw = await asyncio.open_connection(
            "127.0.0.1", agent_port, ssl=upstream_ctx, server_hostname="127.0.0.1"
        )
        await asyncio.gather(pipe(cr, aw), pipe(ar, cw))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=server_ctx)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()


@contextlib.asynccontextmanager
async def control(tmp_path: Path) -> AsyncIterator[str]:
    """A backend's control socket (its device model and binding, no guest)."""
    binding = Binding()
    ctl = ControlServer(GpuDevice(binding), binding)
    path = str(tmp_path / "vgpu.sock.ctl")
    await ctl.start(path)
    try:
        yield path
    finally:
        ctl.close()


async def bind_through(
    tmp_path: Path, certs: Pki, cert: tuple[Path, Path], agent_port: int
) -> tuple[dict[str, object], int, str]:
    """Bind via an impostor with ``cert``: (reply, handshakes it completed,
    binding state afterwards)."""
    async with control(tmp_path) as ctl, impostor(certs, cert, agent_port) as imp:
        req = {
            "op": "bind",
            "agent": f"127.0.0.1:{imp.port}",
            "tls_dir": str(certs.fleet),
            "tls_name": "backend",
        }
        reply = await control_request(ctl, req)
        state = str((await control_request(ctl, {"op": "status"}))["binding"])
        return reply, imp.handshakes, state


def assert_refused(result: tuple[dict[str, object], int, str], reason: str) -> None:
    reply, handshakes, state = result
    assert reply["ok"] is False, f"bound through an impostor: {reply}"
    error = str(reply["error"])
    assert error.startswith("AuthError: TLS with agent 127.0.0.1:"), error
    assert reason in error, error
    assert handshakes == 0 and state == "unbound"


async def test_relay_with_the_good_certificate_binds(
    tmp_path: Path, certs: Pki, tls_agent: int
) -> None:
    """The control case: the same relay with the agent's own certificate
    binds, so each refusal below is the certificate's doing."""
    reply, handshakes, state = await bind_through(
        tmp_path, certs, certs.pair(certs.fleet, "agent1"), tls_agent
    )
    assert reply["ok"] is True, reply
    assert handshakes == 1 and state == "bound"


async def test_refuses_agent_signed_by_another_ca(
    tmp_path: Path, certs: Pki, tls_agent: int
) -> None:
    result = await bind_through(tmp_path, certs, certs.pair(certs.foreign, "agent1"), tls_agent)
    assert_refused(result, "certificate verify failed: unable to get local issuer certificate")


async def test_refuses_expired_agent_certificate(
    tmp_path: Path, certs: Pki, tls_agent: int
) -> None:
    result = await bind_through(
        tmp_path, certs, certs.pair(certs.fleet, "agent-expired"), tls_agent
    )
    assert_refused(result, "certificate verify failed: certificate has expired")


async def test_refuses_agent_certificate_for_another_name(
    tmp_path: Path, certs: Pki, tls_agent: int
) -> None:
    """A fleet certificate valid today, but for agent7.example / 10.0.0.7 and
    not for the address the bind names: another agent of the fleet must not
    be able to answer in this one's place."""
    result = await bind_through(
        tmp_path, certs, certs.pair(certs.fleet, "agent-elsewhere"), tls_agent
    )
    assert_refused(result, "IP address mismatch, certificate is not valid for '127.0.0.1'")
