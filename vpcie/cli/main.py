"""``vpcie``: the admin command: ``demo``, ``vgpu status|bind|unbind``, ``version``.

Every failure prints one line (``vpcie: error: ...``) and exits non-zero
(STYLE.md habit 15): 1 for a failed operation, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vpcie.errors import ConfigError, VpcieError


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
    ap = argparse.ArgumentParser(prog="vpcie", description="network-attached virtual GPUs")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="start a local agent, run a GEMM through the tunnel, verify it",
        description="Start a vpcie-agent on loopback (CPU executor, PSK), run a GEMM "
        "through the tunnel and check it against NumPy.",
    )
    demo_args(d)
    d.set_defaults(func=cmd_demo)
    from vpcie.cli import vgpu

    vgpu.add_parser(sub)
    v = sub.add_parser("version", help="print the version")
    v.set_defaults(func=cmd_version)
    return ap


def demo_args(d: argparse.ArgumentParser) -> None:
    d.add_argument("--size", type=int, default=256, help="matrix size N (N x N fp32)")
    d.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        print(f"vpcie: error: {exc}", file=sys.stderr)
        return 2
    except VpcieError as exc:
        print(f"vpcie: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
