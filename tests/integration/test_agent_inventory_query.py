"""INVENTORY over the tunnel (docs/PROTOCOL.md "Inventory"): real agents
with a fake NVML (the hardware boundary: a GPU in MIG mode and a whole GPU),
over PSK and mutual TLS; answered by the main process, no worker forked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.testclient import AgentProcess, RawClient
from host_agent.tls import client_context
from tests.conftest import until
from tests.integration.agent_helpers import children, make_pki
from tests.integration.test_agent_devices import HOST, MIG_A, MIG_B, MIG_GPU, WHOLE
from vpcie.errors import ErrorCode, VgpuError
from vpcie.protocol.codes import PROTOCOL_VERSION, FrameType
from vpcie.protocol.frames import decode_payload
from vpcie.tunnel.inventory import query_inventory


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("nvml")
    (d / "host.json").write_text(json.dumps(HOST))
    return {"VPCIE_AGENT_FAKE_NVML": str(d / "host.json")}


@pytest.fixture(scope="module")
def cli_devices(fake_env: dict[str, str]) -> list[dict[str, object]]:
    """What `vpcie-agent inventory --json` says on the same (fake) host."""
    r = subprocess.run(
        [sys.executable, "-m", "host_agent.main", "inventory", "--json", "--executor", "cpu"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **fake_env},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    devices: list[dict[str, object]] = json.loads(r.stdout)["devices"]
    return devices


@pytest.fixture(scope="module")
def psk_agent(
    tmp_path_factory: pytest.TempPathFactory, fake_env: dict[str, str]
) -> Iterator[tuple[AgentProcess, bytes]]:
    d = tmp_path_factory.mktemp("invagent")
    psk = os.urandom(16).hex().encode()
    (d / "psk").write_bytes(psk)
    os.chmod(d / "psk", 0o600)
    a = AgentProcess(d, "--psk-file", str(d / "psk"), "--executor", "cpu",
                     "--max-sessions", "3", env=fake_env)  # fmt: skip
    yield a, psk
    a.stop()


def _check(doc: dict[str, object], cli_devices: list[dict[str, object]]) -> None:
    assert doc["agent"] == "test-agent" and doc["version"] == PROTOCOL_VERSION == 2
    inv = doc["inventory"]
    assert isinstance(inv, dict) and inv["devices"] == cli_devices
    assert doc["sessions"] == {MIG_A: 0, MIG_B: 0, WHOLE: 0}  # servable devices only
    assert MIG_GPU not in doc["sessions"]  # type: ignore[operator]
    assert doc["fences"] == {} and doc["max_sessions"] == 3


async def test_inventory_over_psk(
    psk_agent: tuple[AgentProcess, bytes], cli_devices: list[dict[str, object]]
) -> None:
    a, psk = psk_agent
    doc = await query_inventory("127.0.0.1", a.port, psk=psk, name="pool-test")
    _check(doc, cli_devices)
    # no worker was forked for it: no session in the state file, no child process
    assert a.state_json()["sessions"] == [] and children(a.proc.pid) == []
    assert "inventory_sent" in a.log_text() and "worker_started" not in a.log_text()
    # a session shows up in the counts (and the blocking test client agrees)
    c = RawClient(a.port, psk=psk)
    c.connect(device=MIG_B, lease_token=12)
    try:
        raw = RawClient(a.port, psk=psk).inventory()
        assert raw["sessions"][MIG_B] == 1 and raw["fences"] == {MIG_B: 12}
    finally:
        c.close()


async def test_inventory_refused_without_authentication(
    psk_agent: tuple[AgentProcess, bytes],
) -> None:
    a, psk = psk_agent
    # The module's agent served sessions in earlier tests: their workers may
    # still be exiting. Start from none, so the last check sees only ours.
    await until(lambda: children(a.proc.pid) == [], 10, "earlier tests' workers exit")
    with pytest.raises(VgpuError) as err:
        await query_inventory("127.0.0.1", a.port, psk=b"not-the-key-at-all")
    assert err.value.code is ErrorCode.PERMISSION_DENIED
    # INVENTORY before AUTH (after HELLO) and instead of HELLO: refused, nothing sent back
    for steps in (("hello",), ()):
        c = RawClient(a.port, psk=psk)
        if steps:
            c.hello()
        c.send(FrameType.INVENTORY)
        seen = c.expect_closed()
        assert [f.type for f in seen] == [FrameType.ERROR]
        code, fatal, message = decode_payload("ERROR", seen[0].payload)
        assert code == ErrorCode.PROTOCOL and fatal == 1 and "got INVENTORY" in message
    assert children(a.proc.pid) == []


async def test_inventory_over_tls(
    tmp_path: Path, fake_env: dict[str, str], cli_devices: list[dict[str, object]]
) -> None:
    pki = make_pki(tmp_path / "pki")
    a = AgentProcess(tmp_path, "--tls-dir", str(pki), "--cert-name", "agent1",
                     "--executor", "cpu", "--max-sessions", "3", env=fake_env)  # fmt: skip
    try:
        ctx = client_context(str(pki / "ca.crt"), str(pki / "backend1.crt"),
                             str(pki / "backend1.key"))  # fmt: skip
        doc = await query_inventory("127.0.0.1", a.port, ssl=ctx, server_hostname="127.0.0.1")
        _check(doc, cli_devices)
        anonymous = client_context(str(pki / "ca.crt"), None, None)
        with pytest.raises(VgpuError) as err:  # no client certificate: not authenticated
            await query_inventory("127.0.0.1", a.port, ssl=anonymous)
        assert err.value.code in (ErrorCode.PERMISSION_DENIED, ErrorCode.DEVICE_LOST)
        assert children(a.proc.pid) == []
    finally:
        a.stop()


async def test_inventory_of_an_unreachable_agent() -> None:
    from tests.conftest import free_port

    with pytest.raises(VgpuError) as err:
        await query_inventory("127.0.0.1", free_port(), psk=b"k" * 16, timeout=2)
    assert err.value.code is ErrorCode.DEVICE_LOST and "cannot reach" in err.value.message
