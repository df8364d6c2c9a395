"""``vpcie``: the admin command.

The pool: ``agents``, ``gpus``, ``vgpus``, ``leases``, ``reserve``, ``release``,
``bind``, ``unbind``, ``migrate``, ``drain``, ``status`` (vpcie/cli/inventory_verbs.py,
lease_verbs.py; docs/POOL.md). The low-level path, no pool: ``vgpu
status|bind|unbind``. And ``demo``, ``version``.

Every failure prints one line (``vpcie: error: ...``) and exits non-zero
(STYLE.md habit 15): 1 for a failed operation, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vpcie.errors import ConfigError, VpcieError
from vpcie.oneline_args import OneLineParser


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from vpcie.protocol.codes import BATCH_VERSION, PROTOCOL_VERSION

    try:
        v = version("vpcie")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    print(f"vpcie {v} (tunnel protocol {PROTOCOL_VERSION}, batch format {BATCH_VERSION})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vpcie.cli import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    from vpcie.cli import inventory_verbs, lease_verbs, pool_session

    ap = OneLineParser(
        prog="vpcie",
        description="network-attached virtual GPUs",
        epilog="examples:\n  vpcie status\n  vpcie agents\n  vpcie bind web1 --memory 8GiB\n"
        "  vpcie migrate web1 --to gpu9\n  vpcie drain gpu7\n"
        "  vpcie --pool etcd://10.0.0.5:2379 leases --json\n"
        "every COMMAND has --help with examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pool", default=None, metavar="URL", help=pool_session.POOL_HELP)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    inventory_verbs.add_parsers(sub)
    lease_verbs.add_parsers(sub)
    d = sub.add_parser(
        "demo",
        help="boot a QEMU guest whose vGPU runs a GEMM on a local agent; verify it",
        description="Start a vpcie-agent on loopback (CPU executor, PSK) and a "
        "vpcie-backend bound to it, boot a QEMU guest (TCG) with that vGPU, and run a "
        "GEMM and a 1 MiB round trip through the guest's virtio_gpu driver; the guest "
        "checks the results. --tunnel: only the tunnel, from this process.",
    )
    demo_args(d)
    d.set_defaults(func=cmd_demo)
    from vpcie.cli import vgpu

    vgpu.add_parser(sub)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=cmd_version)
    return ap


def demo_args(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--size",
        type=int,
        default=None,
        help="matrix size N (N x N fp32; default 32 in the guest, 256 with --tunnel)",
    )
    d.add_argument("--tunnel", action="store_true", help="tunnel only: no guest, no backend")
    d.add_argument("--timeout", type=float, default=300.0, help="seconds the guest may take")
    d.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        return _fail(args, exc, 2)
    except VpcieError as exc:
        return _fail(args, exc, 1)
    except OSError as exc:  # a file or socket the command needed: name it, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, exc: object, status: int) -> int:
    """One line on stderr, or with --json one object on stdout (scripts read
    stdout): {"ok": false, "error": "...", "status": N}."""
    line = str(exc) or type(exc).__name__
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": line, "status": status}))
    else:
        print(f"vpcie: error: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
