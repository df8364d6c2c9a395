"""Keep one agent registered in the pool while it answers.

    python -m vpcie.fleet.registrar --pool URL --agent-name NAME --address HOST:PORT \\
        (--psk-file F | --tls-dir D [--tls-name N]) [--ttl 10] [--parent-pid PID]

``vpcie-agent serve --pool URL`` starts this as its child (``--parent-pid``:
it dies with the agent, PR_SET_PDEATHSIG). Every ttl/3 seconds it asks the
agent for its INVENTORY (the agent's own proof of life: it accepted,
authenticated and answered), then keeps the agent's ``/vpcie/alive/`` TTL
key alive (and every HEARTBEAT_S records the heartbeat the tables show: a
registered agent's health is its key, not this); a changed device list is written to
the pool. So the key lives exactly as long as the agent answers:

* the agent stops (SIGTERM) or dies: PDEATHSIG stops us, we revoke the key,
  the agent is "down" at once;
* the agent and we are killed together (SIGKILL of the group, the host
  lost): the key expires after ``--ttl`` and the agent is "down" then;
* the agent stops answering (refused connections): we revoke and exit.

The pool client (aetcd, grpc threads) lives in this process, never in the
agent's main process, which forks its workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from vpcie.errors import ConfigError, ErrorCode, VgpuError, VpcieError
from vpcie.fleet import agents
from vpcie.oneline_args import OneLineParser

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MIN_TTL_S = 2
# The agent may be busy (its admission queue full): ask again rather than
# declare it gone, for this long.
UNANSWERED_LIMIT_TICKS = 3
# A store write per agent this often, not per tick (1,000 agents at a 10 s
# TTL would otherwise write 300 heartbeats a second to etcd).
HEARTBEAT_S = 30.0


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch in text for ch in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log(level: str, event: str, **fields: Any) -> None:
    """One logfmt line on stderr, like the agent's own (it shares our stderr)."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kv = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
    line = f"ts={ts} level={level} proc=registrar pid={os.getpid()} event={event} {kv}"
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line.rstrip() + "\n")
        sys.stderr.flush()


def die_with_parent(parent: int) -> None:
    """SIGTERM when ``parent`` dies (then we revoke the key), and exit now if
    it already died before the prctl took."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        raise SystemExit(0)


def _fingerprint(gpus: list[Any]) -> list[dict[str, Any]]:
    return sorted((g.to_json() for g in gpus), key=lambda d: str(d.get("id")))


class Registrar:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.auth = agents.auth_record(args.psk_file, args.tls_dir, args.tls_name)
        self.ttl = args.ttl
        self.stop = asyncio.Event()
        self.alive_id: Any = None
        self.seen: list[dict[str, Any]] | None = None
        self.last_heartbeat = 0.0

    async def run(self) -> int:
        from vpcie.pool.pool import Pool

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        pool = await Pool.open(self.args.pool)
        try:
            return await self._loop(pool)
        finally:
            if self.alive_id is not None:
                with contextlib.suppress(Exception):  # the TTL ends it anyway
                    await asyncio.wait_for(pool.kv.revoke(self.alive_id), 2.0)
                log("info", "unregistered", agent=self.args.agent_name)
            await pool.close()

    async def _loop(self, pool: Any) -> int:
        unanswered = 0
        tick = max(self.ttl / 3.0, 0.5)
        while not self.stop.is_set():
            try:
                reply = await agents.fetch_inventory(self.args.address, self.auth, timeout=tick)
                unanswered = 0
            except agents.AgentUnreachable as exc:
                if exc.refused:
                    log("info", "agent_gone", agent=self.args.agent_name, error=str(exc))
                    return 0
                unanswered += 1
                log("warning", "agent_unanswered", agent=self.args.agent_name, error=str(exc))
            except VgpuError as exc:
                if exc.code == ErrorCode.PERMISSION_DENIED:
                    log("error", "agent_refused_us", agent=self.args.agent_name, error=str(exc))
                    return 2
                unanswered += 1
                log("warning", "agent_unanswered", agent=self.args.agent_name, error=str(exc))
            if unanswered >= UNANSWERED_LIMIT_TICKS:
                log("error", "agent_gone", agent=self.args.agent_name, ticks=unanswered)
                return 1
            if unanswered == 0:
                try:
                    await self._record(pool, reply)
                except VpcieError as exc:  # the store: unreachable for now, try again
                    log("warning", "pool_unavailable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), tick)
        return 0

    async def _record(self, pool: Any, reply: dict[str, Any]) -> None:
        name = self.args.agent_name
        gpus = agents.gpus_from_inventory(name, reply)
        if self.alive_id is None:
            await self._enroll(pool, reply, gpus)
            self.alive_id = await pool.register_alive(name, self.ttl)
            self.seen = _fingerprint(gpus)
            log("info", "registered", agent=name, devices=len(gpus), ttl=self.ttl)
        elif not await pool.keepalive(self.alive_id):
            log("warning", "alive_key_expired", agent=name, hint="re-registering")
            self.alive_id = await pool.register_alive(name, self.ttl)
        if _fingerprint(gpus) != self.seen:
            await pool.update_inventory(name, gpus)
            self.seen = _fingerprint(gpus)
            log("info", "inventory_changed", agent=name, devices=len(gpus))
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_S:
            await pool.heartbeat(name)
            self.last_heartbeat = now

    async def _enroll(self, pool: Any, reply: dict[str, Any], gpus: list[Any]) -> None:
        """Add the agent, or take over its record: an agent restarted with
        the same name keeps its cordon and labels; a new address or
        credential is written when it holds no leases (a record in use is
        not pulled from under its backends)."""
        name = self.args.agent_name
        new = agents.agent_record(name, self.args.address, self.auth, reply, registered=True)
        old = next((a for a in await pool.agents() if a.name == name), None)
        if old is not None and (old.address, old.auth) != (new.address, new.auth):
            if [ls for ls in await pool.leases(agent=name) if ls.state != "released"]:
                log("warning", "address_kept", agent=name, recorded=old.address,
                    ours=self.args.address, why="it holds leases")  # fmt: skip
            else:
                new.cordoned, new.labels = old.cordoned, old.labels
                await pool.remove_agent(name)
                old = None
        if old is None:
            await pool.add_agent(new, gpus)
        else:
            await pool.update_inventory(name, gpus)


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="vpcie-registrar", description=__doc__.split("\n")[0])
    ap.add_argument("--pool", required=True, help="pool URL (sqlite:///PATH, etcd://HOST:PORT)")
    ap.add_argument("--agent-name", required=True)
    ap.add_argument("--address", required=True, metavar="HOST:PORT", help="as backends reach it")
    auth = ap.add_mutually_exclusive_group(required=True)
    auth.add_argument("--psk-file")
    auth.add_argument("--tls-dir")
    ap.add_argument("--tls-name", default="backend", help="client certificate in --tls-dir")
    ap.add_argument("--ttl", type=float, default=10.0, help="seconds the alive key outlives us")
    ap.add_argument("--parent-pid", type=int, help="exit when this process (the agent) dies")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.parent_pid:
            die_with_parent(args.parent_pid)
        if args.ttl < MIN_TTL_S:
            raise ConfigError(f"--ttl {args.ttl:g}: at least {MIN_TTL_S} seconds")
        return asyncio.run(Registrar(args).run())
    except VpcieError as exc:
        print(f"vpcie-registrar: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:
        print(f"vpcie-registrar: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
