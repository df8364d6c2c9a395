"""Where the pool is and where the fleet's PKI folder is.

``/etc/vpcie/vpcie.toml``::

    pool = "etcd://10.0.0.5:2379"      # or "sqlite:///var/lib/vpcie/pool.db"
    pki = "/etc/vpcie/pki"             # ca.crt + the backends' client certificates

The pool URL is chosen as ``--pool`` > ``$VPCIE_POOL`` > the file > the
default; ``$VPCIE_CONFIG`` names another file (tests, a second fleet).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from vpcie.errors import ConfigError

CONFIG_FILE = "/etc/vpcie/vpcie.toml"
CONFIG_ENV = "VPCIE_CONFIG"
POOL_ENV = "VPCIE_POOL"
DEFAULT_POOL = "sqlite:///var/lib/vpcie/pool.db"
DEFAULT_PKI = "/etc/vpcie/pki"
_KEYS = ("pool", "pki")


@dataclass(frozen=True)
class FleetConfig:
    pool: str
    pki: str
    pool_from: str  # where the pool URL came from: "--pool", "$VPCIE_POOL", a file, "default"


def read_file(path: str) -> dict[str, str]:
    """The config file's keys; {} when it does not exist. ConfigError (one
    line naming the file) when it cannot be read or is not what we expect."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key} must be a non-empty string")
        out[key] = value
    return out


def load(pool_arg: str | None = None, env: dict[str, str] | None = None) -> FleetConfig:
    """The effective configuration (``env`` defaults to os.environ)."""
    env = dict(os.environ) if env is None else env
    path = env.get(CONFIG_ENV) or CONFIG_FILE
    file = read_file(path)
    pki = file.get("pki", DEFAULT_PKI)
    if pool_arg:
        return FleetConfig(pool_arg, pki, "--pool")
    if env.get(POOL_ENV):
        return FleetConfig(env[POOL_ENV], pki, f"${POOL_ENV}")
    if "pool" in file:
        return FleetConfig(file["pool"], pki, path)
    return FleetConfig(DEFAULT_POOL, pki, "default")
