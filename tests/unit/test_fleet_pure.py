"""The fleet glue's pure parts: the config file and its precedence, sizes and
tables of the CLI, an INVENTORY reply as pool devices, what a migration asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.inventory import discover
from host_agent.nvml import FakeNvml
from tests.unit.test_agent_inventory import SPEC
from vpcie.cli.output import parse_size, table
from vpcie.errors import ConfigError
from vpcie.fleet import config
from vpcie.fleet.agents import gpus_from_inventory
from vpcie.fleet.mover import like, parse_to
from vpcie.pool.model import Gpu, Lease


def test_pool_url_precedence(tmp_path: Path) -> None:
    f = tmp_path / "vpcie.toml"
    f.write_text('pool = "etcd://10.0.0.5:2379"\npki = "/srv/pki"\n')
    env = {"VPCIE_CONFIG": str(f)}
    assert config.load(None, env) == config.FleetConfig("etcd://10.0.0.5:2379", "/srv/pki", str(f))
    assert config.load(None, {**env, "VPCIE_POOL": "/x.db"}).pool == "/x.db"
    assert config.load("sqlite:///y.db", {**env, "VPCIE_POOL": "/x.db"}).pool == "sqlite:///y.db"
    nofile = {"VPCIE_CONFIG": str(tmp_path / "absent.toml")}
    assert config.load(None, nofile) == config.FleetConfig(
        config.DEFAULT_POOL, config.DEFAULT_PKI, "default"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [("pool = ", "not valid TOML"), ('pol = "x"', "unknown key 'pol'"), ("pool = 3", "string")],
)
def test_bad_config_file_is_one_line(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "vpcie.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=why) as err:
        config.load(None, {"VPCIE_CONFIG": str(f)})
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_sizes_and_tables() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("512M") == parse_size("512MiB") == 512 << 20
    assert parse_size("1.5G") == 3 << 29 and parse_size("2 gib") == 2 << 30
    for bad in ("", "ten", "-1G", "5X"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert table(("A", "BB"), [("xxx", 1), ("y", 22)], "none") == "A    BB\nxxx  1\ny    22"
    assert table(("A",), [], "none") == "none"


def test_inventory_reply_as_pool_devices() -> None:
    reply = {"version": 2, "inventory": discover(FakeNvml(SPEC), "fake").to_json()}
    gpus = {g.id: g for g in gpus_from_inventory("a1", reply)}
    assert list(gpus) == ["GPU-a", "MIG-1", "MIG-2", "GPU-b", "GPU-c"]
    assert not gpus["GPU-a"].servable  # MIG mode: its slices are leased
    mig = gpus["MIG-2"]
    assert (mig.kind, mig.parent, mig.profile, mig.agent) == ("mig", "GPU-a", "1g.18gb+me", "a1")
    assert mig.model == "NVIDIA H200"  # the GPU's model: --model matches its slices
    assert not gpus["GPU-b"].healthy and gpus["GPU-c"].healthy


def test_a_migration_asks_for_a_device_like_the_current_one() -> None:
    base = {"vgpu": "v", "agent": "a1", "gpu": "g", "state": "bound"}
    mig = Gpu("MIG-1", "a1", kind="mig", profile="1g.10gb")
    shared = Lease("l1", memory=1 << 30, **base)
    r = like(Lease("l1", memory=10 << 30, exclusive=True, **base), mig, ("", ""))
    assert (r.profile, r.whole, r.exclude_agents) == ("1g.10gb", False, ("a1",))
    r = like(Lease("l1", memory=80 << 30, exclusive=True, **base), Gpu("g", "a1"), ("a2", ""))
    assert r.whole and r.agent == "a2" and r.exclude_agents == ()
    r = like(shared, Gpu("g", "a1"), ("a1", "g2"))  # --to the same agent: allowed
    assert (r.memory, r.agent, r.gpu, r.exclude_agents) == (1 << 30, "a1", "g2", ())
    assert parse_to("a2/MIG-9") == ("a2", "MIG-9") and parse_to(None) == ("", "")
    for bad in ("/x", "a2/", "/"):
        with pytest.raises(ValueError, match="AGENT or AGENT/GPU"):
            parse_to(bad)
