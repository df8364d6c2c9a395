"""``vpcie vgpu migrate`` against a real ``vpcie-backend`` process and real
agents: a one-line report, one-line errors with a non-zero exit, the vGPU's
binding unchanged by a refusal. (The state moving under a running guest is
tests/integration/test_vgpu_migrate.py and test_guest_migrate.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import AgentProc, free_port
from tests.integration.test_cli_vgpu import backend, vpcie

__all__ = ["backend"]  # the fixture, used by name


def migrate(ctl: Path, agent: AgentProc, *extra: str) -> subprocess.CompletedProcess[str]:
    return vpcie(
        "vgpu", "migrate", "--backend", str(ctl),
        "--agent", agent.address, "--psk-file", str(agent.psk_file), *extra,
    )  # fmt: skip


def target(ctl: Path) -> str:
    return str(
        json.loads(vpcie("vgpu", "status", "--backend", str(ctl), "--json").stdout)["target"]
    )


def test_migrate_prints_a_one_line_report(backend: Path, agent_factory: Any) -> None:
    first, second = agent_factory(), agent_factory()
    r = vpcie(
        "vgpu", "bind", "--backend", str(backend),
        "--agent", first.address, "--psk-file", str(first.psk_file), "--lease-token", "5",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = migrate(backend, second, "--lease-token", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    assert r.stdout.startswith(
        f"migrated: {first.address} device=any auth=psk -> {second.address} device=any "
        "auth=psk: 0 contexts, 0.0 MiB, stun "
    ), r.stdout
    assert target(backend).startswith(f"{second.address} ")
    # The first agent has seen lease token 5 for its device: without it, refused.
    r = migrate(backend, first)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "STALE_LEASE" in r.stderr and "open with its lease token" in r.stderr
    assert target(backend).startswith(f"{second.address} ")
    r = migrate(backend, first, "--lease-token", "9", "--json")
    report = json.loads(r.stdout)
    assert report["ok"] and report["from"].startswith(second.address), report
    assert set(report) >= {"migrated", "contexts", "state_bytes", "stun_ms", "copy_ms"}
    assert set(report) >= {"precopy_bytes", "stun_bytes", "rounds", "precopy_ms"}
    assert report["state_lost"] is False


def test_migrate_errors_are_one_line_and_nonzero(
    backend: Path, agent: AgentProc, tmp_path: Path
) -> None:
    # Unbound: nothing to migrate.
    r = migrate(backend, agent)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("vpcie: error: migrate refused: ") and r.stderr.count("\n") == 1
    assert "no GPU is bound" in r.stderr
    r = vpcie(
        "vgpu", "bind", "--backend", str(backend),
        "--agent", agent.address, "--psk-file", str(agent.psk_file),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # A target nobody listens on: refused, the binding stays.
    r = vpcie(
        "vgpu", "migrate", "--backend", str(backend),
        "--agent", f"127.0.0.1:{free_port()}", "--psk-file", str(agent.psk_file),
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot reach agent 127.0.0.1:" in r.stderr and "Traceback" not in r.stderr
    assert target(backend).startswith(f"{agent.address} ")
    # A wrong key: the agent refuses the target session.
    wrong = tmp_path / "wrong"
    wrong.write_text("definitely-not-the-key")
    r = vpcie(
        "vgpu", "migrate", "--backend", str(backend),
        "--agent", agent.address, "--psk-file", str(wrong),
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert target(backend).startswith(f"{agent.address} ")
    # Neither a name nor --backend; a negative token; no such vGPU name.
    r = vpcie("vgpu", "migrate", "--agent", agent.address, "--psk-file", str(wrong))
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "NAME or --backend" in r.stderr
    r = migrate(backend, agent, "--lease-token", "-3")
    assert r.returncode == 2 and "--lease-token" in r.stderr
    r = vpcie(
        "vgpu", "migrate", "no-such-vgpu-here", "--agent", agent.address,
        "--psk-file", str(agent.psk_file),
    )  # fmt: skip
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "/run/vpcie/no-such-vgpu-here.ctl" in r.stderr
