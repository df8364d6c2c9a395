"""``vpcie reserve | release | bind | unbind | migrate | drain``: leases and
the vGPUs that use them."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from vpcie.cli import pool_session as ps
from vpcie.cli.output import emit, fmt_size, progress
from vpcie.errors import ConfigError

if TYPE_CHECKING:
    from vpcie.fleet.binder import BindResult, UnbindResult
    from vpcie.fleet.mover import DrainReport, MoveResult
    from vpcie.pool.model import Lease
    from vpcie.pool.pool import Pool

RAW = argparse.RawDescriptionHelpFormatter


def add_parsers(sub: Any) -> None:
    r = sub.add_parser(
        "reserve",
        help="book a device for a vGPU (no backend involved)",
        description="Reserve a lease for VGPU: the scheduler picks a device that fits "
        "(memory, MIG profile or a whole device; model, labels, agent), packing by default.",
        epilog="""examples:
  vpcie reserve web1 --memory 8GiB
  vpcie reserve web1 --profile 1g.10gb --model "NVIDIA H100 80GB HBM3"
  vpcie reserve train --whole --label rack=b --policy spread
  vpcie reserve web1 --memory 2GiB --agent gpu7 --json
""",
        formatter_class=RAW,
    )
    r.add_argument("vgpu")
    ps.request_args(r)
    r.add_argument("--backend", metavar="CTL_SOCKET", help="the vGPU's control socket "
                   "(recorded when the vGPU is new; default /run/vpcie/VGPU.ctl)")  # fmt: skip
    r.set_defaults(func=cmd_reserve)

    rl = sub.add_parser(
        "release",
        help="give a lease back (a bound vGPU: use vpcie unbind)",
        description="Release a lease by id. The backend is not told: use vpcie unbind for a "
        "bound vGPU. Its fencing token is then stale for the agent once the device is leased "
        "again.",
        epilog="""examples:
  vpcie release 7f3a9c...
  vpcie release 7f3a9c... --json
""",
        formatter_class=RAW,
    )
    rl.add_argument("lease")
    rl.set_defaults(func=cmd_release)

    b = sub.add_parser(
        "bind",
        help="reserve a device and bind the vGPU's backend to it",
        description="Bind VGPU through the pool: reserve (or use the vGPU's reserved lease), "
        "tell its backend (control socket) to open its sessions on the lease's agent and "
        "device with the lease's memory quota and fencing token, mark the lease bound. "
        "A refused bind releases the lease it reserved.",
        epilog="""examples:
  vpcie bind web1 --memory 8GiB                       # backend /run/vpcie/web1.ctl
  vpcie bind web1 --backend /tmp/vgpu.sock.ctl --profile 1g.10gb
  vpcie reserve web1 --whole && vpcie bind web1      # bind the reserved lease
""",
        formatter_class=RAW,
    )
    b.add_argument("vgpu")
    ps.request_args(b)
    b.add_argument("--backend", metavar="CTL_SOCKET", help="the vGPU's control socket "
                   "(recorded when the vGPU is new; default /run/vpcie/VGPU.ctl)")  # fmt: skip
    b.add_argument("--domain", default="", help="the domain it serves (recorded when new)")
    b.set_defaults(func=cmd_bind)

    u = sub.add_parser(
        "unbind",
        help="unbind the vGPU's backend and release its lease",
        description="Unbind VGPU (its work in flight ends with DEVICE_LOST) and release its "
        "lease. A backend that is gone does not keep the lease booked.",
        epilog="""examples:
  vpcie unbind web1
""",
        formatter_class=RAW,
    )
    u.add_argument("vgpu")
    u.set_defaults(func=cmd_unbind)

    m = sub.add_parser(
        "migrate",
        help="move a vGPU to another agent while its guest runs",
        description="Reserve a device like the vGPU's current one on another agent (or on "
        "--to), have the backend move every session there (allocations and contents, "
        "modules, events; the guest's handles unchanged; held batches resume on the "
        "target), then release the old lease. On failure the vGPU stays where it was. "
        "Progress on stderr.",
        epilog="""examples:
  vpcie migrate web1                    # anywhere else that fits
  vpcie migrate web1 --to gpu9          # onto agent gpu9
  vpcie migrate web1 --to gpu9/MIG-...  # onto that device
""",
        formatter_class=RAW,
    )
    m.add_argument("vgpu")
    m.add_argument("--to", metavar="AGENT[/GPU]", help="where (default: the scheduler's choice)")
    m.add_argument("--owner", help="who holds the new lease (default USER@HOST)")
    m.set_defaults(func=cmd_migrate)

    d = sub.add_parser(
        "drain",
        help="cordon an agent and migrate every vGPU off it",
        description="Cordon AGENT (no new leases there), then migrate each vGPU holding a "
        "lease on it, one at a time. What cannot move (no capacity, backend refused) is "
        "reported and stays; exit status 1 if anything stayed. Progress on stderr.",
        epilog="""examples:
  vpcie drain gpu7
  vpcie drain gpu7 --json 2>progress.log
  vpcie agents uncordon gpu7            # afterwards, to take leases again
""",
        formatter_class=RAW,
    )
    d.add_argument("agent")
    d.add_argument("--owner", help="who holds the new leases (default USER@HOST)")
    d.set_defaults(func=cmd_drain)
    for p in (r, rl, b, u, m, d):
        ps.common(p)


def _lease_line(lease: Lease) -> str:
    mem = f"{fmt_size(lease.memory)}{' exclusive' if lease.exclusive else ''}"
    return (
        f"lease {lease.id}: {lease.vgpu} -> {lease.agent}/{lease.gpu} ({mem}), token {lease.token}"
    )


def _abs(path: str | None) -> str | None:
    # The backend resolves paths in its own working directory: send ours.
    return os.path.abspath(path) if path else None


def cmd_reserve(args: argparse.Namespace) -> int:
    from vpcie.fleet.binder import ensure_vgpu

    async def body(pool: Pool) -> Lease:
        await ensure_vgpu(pool, args.vgpu, _abs(args.backend))
        return await pool.reserve(args.vgpu, ps.request(args), ps.owner(args))

    lease = ps.run(args, body)
    emit(args.json, {"lease": lease.to_json()}, f"reserved {_lease_line(lease)}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    async def body(pool: Pool) -> None:
        await pool.release(args.lease)

    ps.run(args, body)
    emit(args.json, {"released": args.lease}, f"released lease {args.lease}")
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    from vpcie.fleet import binder

    async def body(pool: Pool) -> BindResult:
        return await binder.bind(
            pool, args.vgpu, ps.request(args), ps.owner(args), _abs(args.backend), args.domain
        )

    res = ps.run(args, body)
    emit(
        args.json,
        {"vgpu": res.vgpu.to_json(), "lease": res.lease.to_json(), "bound": res.bound},
        f"bound {res.vgpu.name}: {res.bound}\n{_lease_line(res.lease)}",
    )
    return 0


def cmd_unbind(args: argparse.Namespace) -> int:
    from vpcie.fleet import binder

    async def body(pool: Pool) -> UnbindResult:
        return await binder.unbind(pool, args.vgpu)

    res = ps.run(args, body)
    was = (
        f"backend unbound (was {res.backend_was or 'nothing'})"
        if res.backend_was is not None
        else f"no backend at {res.vgpu.socket}"
    )
    emit(
        args.json,
        {"vgpu": res.vgpu.name, "released": res.lease.id, "backend_was": res.backend_was},
        f"unbound {res.vgpu.name}: {was}; released lease {res.lease.id}",
    )
    return 0


def _move_json(r: MoveResult) -> dict[str, Any]:
    return {
        "vgpu": r.vgpu,
        "from": f"{r.old.agent}/{r.old.gpu}",
        "to": f"{r.new.agent}/{r.new.gpu}",
        "lease": r.new.id,
        "released": r.old.id,
        "token": r.new.token,
        "seconds": round(r.seconds, 3),
        "backend": {k: v for k, v in r.report.items() if k != "ok"},
    }


def cmd_migrate(args: argparse.Namespace) -> int:
    from vpcie.fleet import mover

    try:
        mover.parse_to(args.to)  # bad input (exit 2), before the pool is opened
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    async def body(pool: Pool) -> MoveResult:
        return await mover.migrate(pool, args.vgpu, ps.owner(args), args.to, progress)

    r = ps.run(args, body)
    emit(
        args.json,
        _move_json(r),
        f"migrated {r.vgpu}: {r.old.agent}/{r.old.gpu} -> {r.new.agent}/{r.new.gpu}, "
        f"lease {r.new.id} ({mover.summary(r.report, r.seconds)})",
    )
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from vpcie.fleet import mover

    async def body(pool: Pool) -> DrainReport:
        return await mover.drain(pool, args.agent, ps.owner(args), progress)

    rep = ps.run(args, body)
    lines = [f"drained {rep.agent}: {len(rep.moved)} moved, {len(rep.failed)} could not move"]
    lines += [f"  moved {r.vgpu} -> {r.new.agent}/{r.new.gpu}" for r in rep.moved]
    lines += [f"  STAYED {v}: {why}" for v, why in rep.failed]
    obj = {
        "agent": rep.agent,
        "moved": [_move_json(r) for r in rep.moved],
        "failed": [{"vgpu": v, "error": why} for v, why in rep.failed],
    }
    if args.json:
        import json

        print(json.dumps({"ok": not rep.failed, **obj}, default=str))
    else:
        print("\n".join(lines))
    return 1 if rep.failed else 0
