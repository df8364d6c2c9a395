"""``vpcie-backend``: the vhost-user GPU backend program.

Follows the vhost-user "Backend program conventions" (QEMU
docs/interop/vhost-user.rst), like QEMU's own /usr/lib/qemu/vhost-user-gpu:
``--socket-path PATH`` or ``--fd N``, ``--print-capabilities``. Logs go to
stderr, one JSON object per line; stdout carries only the capabilities. With
``--fd`` (libvirt's managed mode) the control socket and a log file are put
in known places named after the guest (vpcie/backend/managed.py).

Bad input (a socket path that is taken or not a socket, a missing folder, a
TLS or PSK file that cannot be used) is one line on stderr and exit 2,
checked before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vpcie.errors import ConfigError, VpcieError
from vpcie.oneline_args import OneLineParser
from vpcie.places import DEFAULT_LOG_DIR, DEFAULT_RUN_DIR

if TYPE_CHECKING:  # the modules are imported where used: --print-capabilities stays light
    from vpcie.backend.managed import HeldFileHandler, ManagedPaths
    from vpcie.backend.sockpath import SocketAccess
    from vpcie.gpu.binding import AgentTarget

# libvirt reads these; "render-node" must never be listed (libvirt would then
# demand a /dev/dri render node, which GPU-less hosts lack). "virgl": we
# always offer VIRTIO_GPU_F_VIRGL, so libvirt's --virgl is accepted.
CAPABILITIES = {"type": "gpu", "features": ["virgl"]}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per log record: ts, level, logger, event, fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),  # when it happened (a held record is written later)
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _placement_args(p: argparse.ArgumentParser) -> None:
    """Where the sockets and the log go, and who may connect."""
    p.add_argument(
        "--name",
        help="the vGPU's name for --fd mode's RUN_DIR/NAME.ctl and LOG_DIR/NAME.log "
        "(default: the guest's name from the QEMU peer)",
    )
    p.add_argument(
        "--run-dir",
        default=os.environ.get("VPCIE_RUN_DIR", DEFAULT_RUN_DIR),
        help=f"--fd mode: control socket folder (default $VPCIE_RUN_DIR or {DEFAULT_RUN_DIR})",
    )
    p.add_argument(
        "--log-dir",
        default=os.environ.get("VPCIE_LOG_DIR", DEFAULT_LOG_DIR),
        help=f"--fd mode: log folder (default $VPCIE_LOG_DIR or {DEFAULT_LOG_DIR})",
    )
    p.add_argument(
        "--socket-owner", metavar="USER", help="owner of the vhost-user and control sockets"
    )
    p.add_argument(
        "--socket-group", metavar="GROUP", help="group of both sockets (e.g. libvirt-qemu)"
    )
    p.add_argument(
        "--socket-mode",
        metavar="OCTAL",
        help="permission bits of both sockets (e.g. 0660; default: umask, control socket 0600)",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="vpcie-backend",
        description="vpcie vhost-user GPU backend (one process per vGPU).",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket-path", help="listen on this unix socket path")
    where.add_argument("-f", "--fd", type=int, help="use this inherited unix socket fd")
    p.add_argument(
        "-c", "--print-capabilities", action="store_true", help="print capabilities JSON and exit"
    )
    p.add_argument("--virgl", action="store_true", help="accepted for libvirt; always on")
    p.add_argument("-v", "--verbose", action="store_true", help="log every message")
    p.add_argument(
        "--control-socket",
        help="unix socket for bind/unbind/status (default: SOCKET_PATH.ctl with --socket-path)",
    )
    _placement_args(p)
    p.add_argument("--bind", metavar="HOST:PORT", help="bind this agent at start")
    p.add_argument("--psk-file", help="pre-shared key for --bind (loopback labs)")
    p.add_argument("--tls-dir", help="PKI folder for --bind with mutual TLS")
    p.add_argument("--tls-name", default="backend", help="client certificate name in --tls-dir")
    p.add_argument("--device", default="", help="GPU or MIG UUID on the agent for --bind")
    p.add_argument(
        "--null-device", action="store_true", help="serve a null GPU (transport tests only)"
    )
    p.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="busy-poll this long after each guest kick (0: off; costs a CPU while polling)",
    )
    p.add_argument(
        "--migrate-drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a live migration waits this long for the work in flight on the old agent, "
        "then gives up and stays there (default %(default)s s)",
    )
    p.add_argument(
        "--no-lane",
        action="store_true",
        help="serve every batch in Python (no lane thread; for comparison and diagnosis)",
    )
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (uvloop: ~10 µs less per guest command; asyncio if uvloop is missing)",
    )
    from vpcie.tunnel.liveness import HANG_AFTER_NS, UNREACHABLE_AFTER_NS, LivenessConfig

    p.add_argument(
        "--agent-hang-timeout",
        type=float,
        default=HANG_AFTER_NS / 1e9,
        metavar="S",
        help="lose a session whose agent's host answers but the agent says nothing this long"
        " (default %(default)s s; docs/PROTOCOL.md Liveness)",
    )
    p.add_argument(
        "--agent-unreachable-timeout",
        type=float,
        default=UNREACHABLE_AFTER_NS / 1e9,
        metavar="S",
        help="lose a session whose agent's host does not ACK, or is silent on a troubled link,"
        " this long (default %(default)s s)",
    )
    args = p.parse_args(argv)
    try:
        args.liveness = LivenessConfig.from_seconds(
            args.agent_hang_timeout, args.agent_unreachable_timeout
        )
    except (ValueError, OverflowError) as exc:
        p.error(f"--agent-hang-timeout / --agent-unreachable-timeout: {exc}")
    if args.bind and not (args.psk_file or args.tls_dir):
        p.error("--bind needs --psk-file or --tls-dir")
    if not 0 <= args.poll_us <= 10_000:
        p.error("--poll-us must be between 0 and 10000")
    if not 0 < args.migrate_drain_timeout <= 3600:
        p.error("--migrate-drain-timeout must be more than 0 and at most 3600 s")
    if not args.print_capabilities and args.socket_path is None and args.fd is None:
        p.error("one of --socket-path or --fd is required")
    return args


@dataclass
class Plan:
    """What ``prepare`` checked before anything starts."""

    access: SocketAccess
    target: AgentTarget | None = None  # for --bind
    control_path: str | None = None  # None: none, or (managed) once the name is known
    managed: ManagedPaths | None = None  # in --fd mode
    name: str | None = None  # managed mode's name, when known at start
    log_file: HeldFileHandler | None = None  # in --fd mode


def prepare(args: argparse.Namespace) -> Plan:
    """Every check that can fail on bad input, before the first log line:
    ConfigError (one line) where a path, a user or a key file is wrong."""
    from pathlib import Path

    from vpcie.backend.managed import HeldFileHandler, ManagedPaths, fallback_name
    from vpcie.backend.sockpath import SocketAccess, decide, inspect

    plan = Plan(access=SocketAccess.parse(args.socket_owner, args.socket_group, args.socket_mode))
    if args.socket_path is not None:
        decide(args.socket_path, inspect(args.socket_path))
    if args.fd is not None:
        plan.managed = ManagedPaths(Path(args.run_dir), Path(args.log_dir))
        plan.managed.check()
        plan.log_file = HeldFileHandler()
        plan.name = args.name
        listener = _is_listener(args.fd)  # also: is it a unix socket at all
        if plan.name is None and listener:
            plan.name = fallback_name()  # no peer to ask until QEMU connects
    if not args.null_device:
        if args.control_socket:
            plan.control_path = args.control_socket
        elif args.socket_path is not None:
            plan.control_path = args.socket_path + ".ctl"
        elif plan.name is not None and plan.managed is not None:
            plan.control_path = plan.managed.control(plan.name)
        if plan.control_path is not None:
            decide(plan.control_path, inspect(plan.control_path))
    if plan.name is not None and plan.managed is not None and plan.log_file is not None:
        plan.log_file.open(plan.managed.log(plan.name))
    if args.bind:
        plan.target = _bind_target(args)
    return plan


def _is_listener(fd: int) -> bool:
    """Whether inherited ``fd`` listens; ConfigError unless it is a unix stream socket."""
    import socket

    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise ConfigError(f"--fd {fd}: {exc.strerror or exc}") from exc
    with s:
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
            raise ConfigError(f"--fd {fd} is not a unix stream socket")
        return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def _bind_target(args: argparse.Namespace) -> Any:
    from vpcie.control.messages import BindRequest
    from vpcie.control.target import bind_target
    from vpcie.fileerrors import os_error_line

    req = {
        "agent": args.bind,
        "psk_file": args.psk_file,
        # our own working directory is the one a relative path means here
        "tls_dir": args.tls_dir and os.path.abspath(args.tls_dir),
        "tls_name": args.tls_name,
        "device": args.device,
    }
    try:
        return bind_target(BindRequest.from_wire(req))
    except OSError as exc:  # the PSK file
        raise ConfigError("--psk-file: " + os_error_line("read", args.psk_file, exc)) from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


class _DecideOnce(logging.Filter):
    """One budget verdict per record, however many handlers ask (the budget
    counts tokens and edits the message of the record that passes)."""

    def __init__(self, inner: logging.Filter) -> None:
        super().__init__()
        self.inner = inner

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = getattr(record, "vpcie_budget", None)
        if verdict is None:
            verdict = bool(self.inner.filter(record))
            record.vpcie_budget = verdict
        return bool(verdict)


def setup_logging(verbose: bool, log_file: logging.Handler | None = None) -> None:
    from vpcie.backend.logbudget import GuestLogBudget

    budget = _DecideOnce(GuestLogBudget())  # a guest must not flood the journal or our file
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(log_file)  # --fd mode: libvirt discards our stderr
    for handler in handlers:
        handler.setFormatter(JsonLineFormatter())
        handler.addFilter(budget)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


async def run(args: argparse.Namespace, plan: Plan | None = None) -> None:
    from vpcie.backend.device import Device, NullGpuDevice
    from vpcie.backend.server import BackendServer
    from vpcie.control.server import ControlServer
    from vpcie.gpu.binding import Binding
    from vpcie.gpu.device import GpuDevice

    plan = plan or prepare(args)
    log = logging.getLogger("vpcie.backend")
    control: ControlServer | None = None
    tasks: list[asyncio.Task[None]] = []
    device: Device
    if plan.name is not None:
        log.info("managed", extra={"fields": _managed_fields(plan, plan.name)})
    if args.null_device:
        device = NullGpuDevice()
    else:
        binding = Binding(liveness=args.liveness)
        device = GpuDevice(binding, lane=not args.no_lane)
        device.migrate_drain_timeout = args.migrate_drain_timeout
        target = plan.target
        if target is not None:
            binding.bind(target)
            log.info("bound", extra={"fields": {"target": target.describe()}})
        control = ControlServer(device, binding)
        if target is not None:
            # What the capset reports at the guest's driver load: ask the agent
            # now (as `vpcie vgpu bind` does), not at the first session.
            tasks.append(asyncio.create_task(_probe_bound(control, target, log)))
        if plan.control_path:
            await control.start(plan.control_path, plan.access)
    if plan.managed is not None and plan.name is None:
        tasks.append(asyncio.create_task(_name_later(args.fd, plan, control, log)))
    server = BackendServer(device, poll_s=args.poll_us / 1e6)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    try:
        if args.fd is not None:
            await server.serve_fd(args.fd)
        else:
            await server.serve_path(args.socket_path, plan.access)
    finally:
        for task in tasks:
            task.cancel()
        if control is not None:
            control.close()
        server.core.close()
        log.info("exiting", extra={"fields": {"status": server.status()}})


def _managed_fields(plan: Plan, name: str) -> dict[str, Any]:
    log = plan.managed.log(name) if plan.managed is not None else None
    return {"name": name, "control": plan.control_path, "log": str(log)}


async def _name_later(fd: int, plan: Plan, control: Any, log: logging.Logger) -> None:
    """--fd without --name: learn the guest's name from QEMU once it holds the
    other end of our socket, then open the log and the control socket."""
    from vpcie.backend.managed import fallback_name, learn_guest_name

    try:
        learned = await learn_guest_name(fd)
    except Exception as exc:  # a /proc or netlink surprise must not cost the guest its GPU
        log.error("guest name lookup failed", extra={"fields": {"error": repr(exc)}})
        learned = None
    name = learned or fallback_name()
    if learned is None:
        log.warning("guest name not learned from the QEMU peer; give --name", extra={})
    assert plan.managed is not None and plan.log_file is not None
    try:
        plan.log_file.open(plan.managed.log(name))
        if control is not None and plan.control_path is None:  # else --control-socket has it
            plan.control_path = plan.managed.control(name)
            await control.start(plan.control_path, plan.access)
    except VpcieError as exc:  # the guest is running: keep serving it, say why unbindable
        log.error("managed mode incomplete", extra={"fields": {"error": str(exc)}})
        return
    log.info("managed", extra={"fields": _managed_fields(plan, name)})


async def _probe_bound(control: Any, target: Any, log: logging.Logger) -> None:
    try:
        await control.probe(target)
    except Exception as exc:  # the agent may come up later: sessions open on demand
        log.warning(
            "agent not reachable yet; the capset says no GPU until a session opens",
            extra={"fields": {"target": target.describe(), "error": str(exc)}},
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    try:
        plan = prepare(args)
    except ConfigError as exc:
        print(f"vpcie-backend: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.verbose, plan.log_file)
    if args.loop == "uvloop":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            logging.getLogger("vpcie.backend").warning("uvloop missing: using asyncio")
    profile_to = os.environ.get("VPCIE_BACKEND_PROFILE")  # operators: where time goes
    try:
        if profile_to:
            import cProfile

            cProfile.runctx(
                "asyncio.run(run(args, plan))", globals(), {"args": args, "plan": plan}, profile_to
            )
        else:
            asyncio.run(run(args, plan))
    except (VpcieError, OSError, ValueError) as exc:
        logging.getLogger("vpcie.backend").error("fatal", extra={"fields": {"error": str(exc)}})
        print(f"vpcie-backend: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
