"""``vpcie-agent``: serve GPUs, MIG slices or a CPU executor over the tunnel.

    vpcie-agent serve --listen HOST:PORT (--tls-dir DIR | --psk-file FILE) [...]
    vpcie-agent pki init --dir DIR
    vpcie-agent pki issue --dir DIR --name NAME (--server [--san IP/DNS ...] | --client)
    vpcie-agent inventory [--json]

Errors for people: one line on stderr, exit status 2 (bad input) or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ipaddress
import json
import os
import socket
import stat
import sys
from pathlib import Path

from host_agent.config import (
    AUTH_TIMEOUT_S,
    DEFAULT_EVENT_WAIT_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_SESSIONS,
    AgentConfig,
)
from host_agent.inventory import Inventory, discover
from host_agent.logs import log
from host_agent.nvml import load_nvml
from host_agent.server import Agent
from vpcie.errors import ConfigError
from vpcie.fileerrors import os_error_line
from vpcie.oneline_args import OneLineParser, non_negative_int

MIN_PSK_BYTES = 16


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT (port 0 picks a free one)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_psk(path: str) -> bytes:
    try:
        key = Path(path).read_bytes().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read --psk-file {path}: {exc.strerror}") from exc
    if len(key) < MIN_PSK_BYTES:
        raise ConfigError(f"--psk-file {path}: key shorter than {MIN_PSK_BYTES} bytes")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log("warning", "psk_file_permissions", path=path, hint="chmod 600")
    return key


def build_inventory(executor: str) -> Inventory:
    nvml, source = load_nvml()
    inv = discover(nvml, source)
    if nvml is not None:
        nvml.shutdown()
    have_cupy = importlib.util.find_spec("cupy") is not None
    if executor == "cuda":
        if not have_cupy:
            raise ConfigError("--executor cuda needs CuPy (pip install 'vpcie[gpu]')")
        if not inv.has_gpu:
            raise ConfigError(f"--executor cuda but no GPU found ({inv.source})")
    if executor == "auto" and inv.has_gpu and not have_cupy:
        log("warning", "cupy_missing", hint="GPUs found but CuPy is not installed: serving cpu0")
        inv = discover(None, f"{source}; CuPy missing, CPU executor only")
    return inv


def cmd_serve(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    if args.psk_file:
        if not is_loopback(host):
            raise ConfigError(
                f"PSK mode is for loopback only; {host} is not: use --tls-dir for mutual TLS"
            )
        psk = read_psk(args.psk_file)
        cfg = AgentConfig(auth="psk", agent_name=args.name, psk_hex=psk.hex())
    else:
        from host_agent import pki  # cryptography: only where certificates are used

        tls_dir = Path(args.tls_dir)
        cert, key = pki.find_server_cert(tls_dir, args.cert_name)
        ca = tls_dir / pki.CA_CERT
        if not ca.exists():
            raise ConfigError(f"{ca} missing: copy the fleet CA certificate there")
        cfg = AgentConfig(
            auth="tls",
            agent_name=args.name,
            ca_file=str(ca),
            cert_file=str(cert),
            key_file=str(key),
        )
        from host_agent.tls import check_server_cert, server_context

        check_server_cert(cfg.cert_file, cfg.ca_file)
        server_context(cfg.ca_file, cfg.cert_file, cfg.key_file)  # fail now, not per session
    for name in ("max_inflight", "max_sessions", "max_handshakes", "max_handshakes_per_source"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.auth_timeout <= 600:
        raise ConfigError(f"--auth-timeout {args.auth_timeout:g}: expected 0 < seconds <= 600")
    cfg.executor = args.executor
    cfg.mem_quota = args.mem_quota
    cfg.max_inflight = args.max_inflight
    cfg.max_sessions = args.max_sessions
    cfg.event_wait_timeout = args.event_wait_timeout
    cfg.idle_timeout = args.idle_timeout
    cfg.max_handshakes = args.max_handshakes
    cfg.auth_timeout = args.auth_timeout
    cfg.max_handshakes_per_source = args.max_handshakes_per_source
    inv = build_inventory(args.executor)
    from host_agent import fencing

    fence_file = Path(args.fence_file) if args.fence_file else None
    try:
        fences = fencing.load(fence_file) if fence_file else fencing.Fences()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if fence_file is not None:  # writable now, not first at the next pool lease
        try:
            fencing.save(fences, fence_file)
        except OSError as exc:
            raise ConfigError(os_error_line("write", f"fence file {fence_file}", exc)) from None
    agent = Agent(cfg, inv, (host, port), Path(args.state_file) if args.state_file else None)
    agent.fences, agent.fence_file = fences, fence_file
    try:
        asyncio.run(agent.serve())
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from exc
    return 0


def cmd_pki(args: argparse.Namespace) -> int:
    from host_agent import pki

    d = Path(args.dir)
    if args.pki_cmd == "init":
        path = pki.init_ca(d)
        print(f"CA created: {path} (keep {d / pki.CA_KEY} off the GPU hosts)")
        return 0
    if not args.server and not args.client:
        raise ConfigError("pki issue needs --server or --client")
    if args.client and args.san:
        raise ConfigError("--san is for --server certificates")
    path = pki.issue(d, args.name, server=bool(args.server), sans=args.san or None)
    print(f"issued {'server' if args.server else 'client'} certificate {path}")
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    inv = build_inventory(args.executor)
    if args.json:
        print(json.dumps(inv.to_json(), indent=1))
        return 0
    print(f"source: {inv.source}")
    print(f"{'DEVICE':<44} {'KIND':<4} {'MEMORY':>10} {'SERVED':<6} {'HEALTH':<7} NAME")
    for d in inv.devices:
        mem = f"{d.memory_total / (1 << 30):.1f}GiB"
        print(
            f"{d.id:<44} {d.kind:<4} {mem:>10} {'yes' if d.servable else 'no':<6} "
            f"{'ok' if d.healthy else 'BAD':<7} {d.name}"
        )
    if not inv.has_gpu:
        print("no GPU: this agent serves its CPU (NumPy) executor, which is not a GPU")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="vpcie-agent", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve this host's GPUs over the tunnel")
    s.add_argument("--listen", required=True, help="HOST:PORT")
    auth = s.add_mutually_exclusive_group(required=True)
    auth.add_argument("--tls-dir", help="directory with ca.crt and the agent's NAME.crt/.key")
    auth.add_argument("--psk-file", help="pre-shared key file (loopback listeners only)")
    s.add_argument("--cert-name", help="agent certificate name in --tls-dir")
    s.add_argument("--name", default=socket.gethostname(), help="agent name in HELLO/QUERY")
    s.add_argument("--executor", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument(
        "--mem-quota", type=non_negative_int, default=0, help="max device bytes per session"
    )
    s.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT)
    s.add_argument(
        "--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, help="sessions per device"
    )
    s.add_argument("--event-wait-timeout", type=float, default=DEFAULT_EVENT_WAIT_TIMEOUT_S)
    s.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="drop a session after this many seconds without bytes",
    )
    s.add_argument(
        "--auth-timeout",
        type=float,
        default=AUTH_TIMEOUT_S,
        help="seconds a connection has to finish TLS, HELLO, AUTH and OPEN",
    )
    s.add_argument(
        "--max-handshakes",
        type=int,
        default=DEFAULT_MAX_HANDSHAKES,
        help="unauthenticated connections pending at once; over it the oldest is dropped",
    )
    s.add_argument(
        "--max-handshakes-per-source",
        type=int,
        default=DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        help="... from one source address",
    )
    s.add_argument("--state-file", help="JSON file with inventory and sessions, kept current")
    s.add_argument(
        "--fence-file",
        help="JSON file keeping each device's newest pool lease token across restarts",
    )
    s.set_defaults(func=cmd_serve)
    p = sub.add_parser("pki", help="fleet CA and certificates")
    psub = p.add_subparsers(dest="pki_cmd", required=True)
    pi = psub.add_parser("init", help="create the CA")
    pi.add_argument("--dir", required=True)
    pis = psub.add_parser("issue", help="issue an agent (--server) or backend (--client) cert")
    pis.add_argument("--dir", required=True)
    pis.add_argument("--name", required=True)
    kind = pis.add_mutually_exclusive_group()
    kind.add_argument("--server", action="store_true")
    kind.add_argument("--client", action="store_true")
    pis.add_argument("--san", nargs="+", help="IP addresses / DNS names of the agent")
    p.set_defaults(func=cmd_pki)
    inv = sub.add_parser("inventory", help="print what this host would serve")
    inv.add_argument("--json", action="store_true")
    inv.add_argument(
        "--executor",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="as for serve: what would be served with this executor",
    )
    inv.set_defaults(func=cmd_inventory)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        return _fail(args, str(exc), 2)
    except OSError as exc:  # a file the command needed: name it, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, line: str, status: int) -> int:
    """One line on stderr, or with --json one object on stdout, as `vpcie` does."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": line, "status": status}))
    else:
        print(f"vpcie-agent: error: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
