"""``vpcie vgpu``: bind, unbind, migrate and inspect a running vGPU through
its backend's control socket (``vpcie-backend --control-socket``, by default
the vhost-user socket path + ``.ctl``; /run/vpcie/NAME.ctl when libvirt
started it)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from vpcie.errors import ConfigError, VpcieError
from vpcie.oneline_args import non_negative_int
from vpcie.places import DEFAULT_RUN_DIR, control_socket


class ControlFailed(VpcieError):
    """The backend refused or failed the request."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "vgpu",
        help="bind / unbind / migrate / show the GPU behind a running vGPU",
        description="Talk to a vpcie-backend's control socket.",
    )
    vsub = p.add_subparsers(dest="vgpu_cmd", required=True, metavar="ACTION")
    st = vsub.add_parser("status", help="binding, contexts, counters")
    b = vsub.add_parser("bind", help="bind an agent's GPU (or MIG slice) to the vGPU")
    m = vsub.add_parser(
        "migrate",
        help="move the vGPU's GPU state to another agent while the guest runs",
        description="Live migration: the guest's contexts keep their device memory, "
        "modules, events and handles; their work pauses for the copy (the stun) and "
        "goes on on the new agent. If the current agent is dead, the vGPU is bound "
        "to the new one empty (its work ended with DEVICE_LOST).",
        epilog="example: vpcie vgpu migrate vm1 --agent 10.0.0.7:7450 "
        "--tls-dir /etc/vpcie/pki --device GPU-1234",
    )
    m.add_argument(
        "name",
        nargs="?",
        help=f"the vGPU's name: its control socket is {DEFAULT_RUN_DIR}/NAME.ctl "
        "(or give --backend)",
    )
    for q in (b, m):
        q.add_argument("--agent", required=True, metavar="HOST:PORT")
        auth = q.add_mutually_exclusive_group(required=True)
        auth.add_argument("--psk-file", help="pre-shared key (loopback labs only)")
        auth.add_argument("--tls-dir", help="PKI folder (ca.crt, NAME.crt, NAME.key)")
        q.add_argument("--tls-name", default="backend", help="client certificate name")
        q.add_argument("--device", default="", help="GPU or MIG UUID on the agent (default: any)")
        q.add_argument(
            "--mem-quota", type=non_negative_int, default=0, help="device memory bytes per context"
        )
        q.add_argument(
            "--lease-token",
            type=non_negative_int,
            default=0,
            help="the pool lease's fencing token (0: no pool lease)",
        )
        q.add_argument(
            "--lease-live",
            type=_token_list,
            default=(),
            metavar="T1,T2,...",
            help="the tokens of the device's leases live when this one was made, its own "
            "included (default with --lease-token: that token alone, an exclusive lease)",
        )
    b.add_argument(
        "--replace",
        action="store_true",
        help="replace the current binding (refused without it): its device memory is lost, "
        "work in flight ends with DEVICE_LOST, old handles get STALE_HANDLE",
    )
    u = vsub.add_parser("unbind", help="unbind: in-flight work ends with DEVICE_LOST")
    for q in (st, b, u, m):
        q.add_argument(
            "--backend", required=q is not m, metavar="CTL_SOCKET", help="control socket"
        )
        q.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=run)


def _token_list(text: str) -> tuple[int, ...]:
    try:
        tokens = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        msg = f"{text!r} is not a comma-separated list of tokens"
        raise argparse.ArgumentTypeError(msg) from None
    if not tokens or tokens[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: lease tokens are whole numbers from 1")
    return tokens


def run(args: argparse.Namespace) -> int:
    from vpcie.control.client import MIGRATE_TIMEOUT_S, control_request
    from vpcie.control.messages import (
        BindRequest,
        MigrateRequest,
        Request,
        StatusRequest,
        UnbindRequest,
    )

    req: Request = StatusRequest() if args.vgpu_cmd == "status" else UnbindRequest()
    timeout = 30.0
    if args.vgpu_cmd in ("bind", "migrate"):
        kind = BindRequest if args.vgpu_cmd == "bind" else MigrateRequest
        req = kind(
            agent=args.agent,
            # The backend resolves paths in its own working directory: send ours.
            psk_file=args.psk_file and os.path.abspath(args.psk_file),
            tls_dir=args.tls_dir and os.path.abspath(args.tls_dir),
            tls_name=args.tls_name,
            device=args.device,
            mem_quota=args.mem_quota,
            replace=getattr(args, "replace", False),
            lease_token=args.lease_token,
            lease_live=args.lease_live or ((args.lease_token,) if args.lease_token else ()),
        )
    if args.vgpu_cmd == "migrate":
        timeout = MIGRATE_TIMEOUT_S
        if not args.backend:
            if not args.name:
                raise ConfigError("vgpu migrate needs the vGPU's NAME or --backend CTL_SOCKET")
            args.backend = control_socket(args.name)
    try:
        reply = asyncio.run(control_request(args.backend, req, timeout))
    except FileNotFoundError as exc:
        folder = os.path.dirname(os.path.abspath(args.backend))
        msg = f"no control socket at {args.backend} (is vpcie-backend running?)"
        if not os.path.isdir(folder):
            msg = f"no control socket at {args.backend}: folder {folder} does not exist"
        raise ConfigError(msg) from exc
    except (OSError, TimeoutError, json.JSONDecodeError) as exc:
        raise ControlFailed(f"backend at {args.backend}: {exc or type(exc).__name__}") from exc
    if not reply.get("ok"):
        raise ControlFailed(f"{args.vgpu_cmd} refused: {reply.get('error', 'no reason given')}")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0
    print(_human(args.vgpu_cmd, reply))
    return 0


def _human(cmd: str, r: dict[str, Any]) -> str:
    if cmd == "bind":
        was = f" (replaced {r['replaced']})" if r.get("replaced") else ""
        return f"bound: {r['bound']}{was}"
    if cmd == "unbind":
        return f"unbound (was: {r.get('was') or 'nothing'})"
    if cmd == "migrate":
        line = (
            f"migrated: {r['from']} -> {r['migrated']}: {r['contexts']} contexts, "
            f"{r['state_bytes'] / (1 << 20):.1f} MiB, stun {r['stun_ms']:.1f} ms "
            f"(copy {r['copy_ms']:.1f} ms of {r.get('stun_bytes', 0) / (1 << 20):.1f} MiB; "
            f"{r.get('precopy_bytes', 0) / (1 << 20):.1f} MiB pre-copied in "
            f"{r.get('rounds', 0)} rounds while the guest ran)"
        )
        if r.get("state_lost"):
            line += "; state lost: the source was unusable, its work ended with DEVICE_LOST"
        return line
    lines = [
        f"binding : {r['binding']}" + (f" -> {r['target']}" if r.get("target") else ""),
        f"counters: {r['commands']} commands, {r['submits']} submits, "
        f"{r['rejected']} rejected, {r['errors']} errors; {r['resources']} resources",
    ]
    if "lane_submits" in r:
        lines.append(
            f"lane    : {r['lane_submits']} batches sent, {r['lane_completed']} completed in C, "
            f"{r['lane_handed']} chains left to Python, {r['lane_lost']} sessions lost, "
            f"{r.get('lane_backlogged', 0)} frames backed up (agent slow to read)"
        )
    ctxs = r.get("contexts") or []
    if ctxs:
        lines.append(f"{'ctx':>5}  {'name':<20} {'res':>4} {'inflight':>8}  session")
        for c in ctxs:
            state = "open" if c["session"] else "-"
            if c["lost"]:
                state = f"lost: {c.get('lost_reason') or 'no reason recorded'}"
            if c.get("lent"):
                state = "lent to the lane"
            name = c["name"][:20]
            lines.append(
                f"{c['id']:>5}  {name:<20} {c['resources']:>4} {c['inflight']:>8}  {state}"
            )
    else:
        lines.append("no guest contexts")
    return "\n".join(lines)
