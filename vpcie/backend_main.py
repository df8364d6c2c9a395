"""``vpcie-backend``: the vhost-user GPU backend program.

Follows the vhost-user "Backend program conventions" (QEMU
docs/interop/vhost-user.rst), like QEMU's own /usr/lib/qemu/vhost-user-gpu:
``--socket-path PATH`` or ``--fd N``, ``--print-capabilities``. Logs go to
stderr, one JSON object per line; stdout carries only the capabilities.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from vpcie.errors import VpcieError

# libvirt reads these; "render-node" must never be listed (libvirt would then
# demand a /dev/dri render node, which GPU-less hosts lack). "virgl": we
# always offer VIRTIO_GPU_F_VIRGL, so libvirt's --virgl is accepted.
CAPABILITIES = {"type": "gpu", "features": ["virgl"]}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per log record: ts, level, logger, event, fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(time.time(), 6),
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
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
    if not args.print_capabilities and args.socket_path is None and args.fd is None:
        p.error("one of --socket-path or --fd is required")
    return args


def setup_logging(verbose: bool) -> None:
    from vpcie.backend.logbudget import GuestLogBudget

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    handler.addFilter(GuestLogBudget())  # a guest must not flood the host's journal
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


async def run(args: argparse.Namespace) -> None:
    from vpcie.backend.device import Device, NullGpuDevice
    from vpcie.backend.server import BackendServer
    from vpcie.gpu.binding import Binding
    from vpcie.gpu.control import ControlServer, target_from_request
    from vpcie.gpu.device import GpuDevice

    log = logging.getLogger("vpcie.backend")
    control: ControlServer | None = None
    probe: asyncio.Task[None] | None = None
    device: Device
    if args.null_device:
        device = NullGpuDevice()
    else:
        binding = Binding(liveness=args.liveness)
        device = GpuDevice(binding, lane=not args.no_lane)
        if args.bind:
            target = target_from_request(
                {
                    "agent": args.bind,
                    "psk_file": args.psk_file,
                    "tls_dir": args.tls_dir,
                    "tls_name": args.tls_name,
                    "device": args.device,
                }
            )
            binding.bind(target)
            log.info("bound", extra={"fields": {"target": target.describe()}})
        control = ControlServer(device, binding)
        if args.bind:
            # What the capset reports at the guest's driver load: ask the agent
            # now (as `vpcie vgpu bind` does), not at the first session.
            probe = asyncio.create_task(_probe_bound(control, target, log))
        ctl_path = args.control_socket or (args.socket_path + ".ctl" if args.socket_path else None)
        if ctl_path:
            await control.start(ctl_path)
    server = BackendServer(device, poll_s=args.poll_us / 1e6)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    try:
        if args.fd is not None:
            await server.serve_fd(args.fd)
        else:
            await server.serve_path(args.socket_path)
    finally:
        if probe is not None:
            probe.cancel()
        if control is not None:
            control.close()
        server.core.close()
        log.info("exiting", extra={"fields": {"status": server.status()}})


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
    setup_logging(args.verbose)
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

            cProfile.runctx("asyncio.run(run(args))", globals(), {"args": args}, profile_to)
        else:
            asyncio.run(run(args))
    except (VpcieError, OSError, ValueError) as exc:
        logging.getLogger("vpcie.backend").error("fatal", extra={"fields": {"error": str(exc)}})
        print(f"vpcie-backend: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
