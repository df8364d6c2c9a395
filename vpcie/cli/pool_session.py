"""What every pool verb shares: ``--pool`` and ``--json``, opening the pool
named by the configuration, the request options, and the owner name."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vpcie.errors import ConfigError, VpcieError

if TYPE_CHECKING:
    from vpcie.pool.model import Request
    from vpcie.pool.pool import Pool

T = TypeVar("T")


class FleetFailed(VpcieError):
    """A pool verb failed (no capacity, unknown name, store down...): one line."""


def common(p: argparse.ArgumentParser) -> None:
    """``--pool``/``--json`` after the verb as well as before it (SUPPRESS: a
    verb that does not repeat them keeps what the top level parsed)."""
    p.add_argument("--pool", default=argparse.SUPPRESS, metavar="URL", help=POOL_HELP)
    p.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object on stdout"
    )


POOL_HELP = (
    "pool URL: sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT][/PREFIX] "
    "(default: $VPCIE_POOL, then 'pool' in /etc/vpcie/vpcie.toml, then sqlite:///var/lib/vpcie/pool.db)"
)


def run(args: argparse.Namespace, body: Callable[[Pool], Awaitable[T]]) -> T:
    """Open the configured pool, run ``body`` with it, close it. A pool
    error becomes FleetFailed (one line, exit 1)."""
    from vpcie.fleet import config

    cfg = config.load(getattr(args, "pool", None))
    # The tunnel logs what it sees (a lost handshake...) for long-running
    # processes; here the failure is our one line, so its records go nowhere.
    logging.getLogger("vpcie").addHandler(logging.NullHandler())

    from vpcie.pool.errors import PoolError

    async def go() -> T:
        from vpcie.pool.pool import Pool

        try:
            pool = await Pool.open(cfg.pool)  # connects on first use: only the URL is checked
        except PoolError as exc:
            raise ConfigError(f"{exc} (pool URL from {cfg.pool_from})") from None
        try:
            return await body(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except PoolError as exc:
        raise FleetFailed(str(exc) or type(exc).__name__) from None


def pki_dir(args: argparse.Namespace) -> str:
    from vpcie.fleet import config

    return config.load(getattr(args, "pool", None)).pki


def owner(args: argparse.Namespace) -> str:
    if getattr(args, "owner", None):
        return str(args.owner)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not KEY=VALUE")
    return key, value


def size(text: str) -> int:
    from vpcie.cli.output import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def request_args(p: argparse.ArgumentParser) -> None:
    """What a reservation asks for (vpcie reserve / bind)."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--memory", type=size, default=0, help="device memory (512MiB, 10GiB...)")
    what.add_argument("--profile", default="", help="a MIG slice of this profile (1g.10gb...)")
    what.add_argument("--whole", action="store_true", help="a whole device, exclusively")
    p.add_argument("--model", default="", help="GPU model (as the inventory names it)")
    p.add_argument("--label", type=label, action="append", default=[], help="KEY=VALUE (agents)")
    p.add_argument("--agent", default="", help="only on this agent")
    p.add_argument("--gpu", default="", help="only this device (GPU / MIG UUID)")
    p.add_argument("--policy", choices=("pack", "spread"), default="pack")
    p.add_argument("--owner", help="who holds the lease (default USER@HOST)")


def request(args: argparse.Namespace) -> Request:
    from vpcie.pool.model import Request

    return Request(
        memory=args.memory,
        profile=args.profile,
        whole=args.whole,
        model=args.model,
        labels=dict(args.label),
        agent=args.agent,
        gpu=args.gpu,
        policy=args.policy,
    )


def as_json(obj: Any) -> Any:
    """A model object's JSON (to_json), lists of them too."""
    if isinstance(obj, list):
        return [as_json(o) for o in obj]
    return obj.to_json() if hasattr(obj, "to_json") else obj
