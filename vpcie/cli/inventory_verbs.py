"""``vpcie agents | gpus | vgpus | leases | status``: what the pool holds."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING, Any

from vpcie.cli import pool_session as ps
from vpcie.cli.output import emit, fmt_age, fmt_labels, fmt_size, table
from vpcie.errors import ConfigError

if TYPE_CHECKING:
    from vpcie.pool.model import Agent, Gpu, Lease, Usage
    from vpcie.pool.pool import Pool

LIVE = ("reserved", "bound", "migrating")
RAW = argparse.RawDescriptionHelpFormatter

AGENTS_EPILOG = """examples:
  vpcie agents                                   # the table: health, devices, leases
  vpcie agents add gpu7 --address 10.0.0.7:7000  # TLS with the fleet PKI (pki in vpcie.toml)
  vpcie agents add lab --address 127.0.0.1:7000 --psk-file /etc/vpcie/lab.psk --label rack=a
  vpcie agents cordon gpu7                        # no new leases there (vpcie drain moves the rest)
  vpcie agents uncordon gpu7
  vpcie agents refresh gpu7                       # ask it again for its devices
  vpcie agents remove gpu7 [--force]              # refused while it holds leases, unless --force
"""


def add_parsers(sub: Any) -> None:
    a = sub.add_parser(
        "agents",
        help="list, add, remove, cordon the pool's agents",
        description="The pool's agents: an agent is added by asking it over the tunnel "
        "what it serves (its GPUs and MIG slices), or registers itself "
        "(vpcie-agent serve --pool URL).",
        epilog=AGENTS_EPILOG,
        formatter_class=RAW,
    )
    ps.common(a)
    asub = a.add_subparsers(dest="agents_cmd", metavar="ACTION")
    ls = asub.add_parser("list", help="the table (the default)", epilog=AGENTS_EPILOG,
                         formatter_class=RAW)  # fmt: skip
    add = asub.add_parser("add", help="ask an agent for its devices and add it",
                          epilog=AGENTS_EPILOG, formatter_class=RAW)  # fmt: skip
    add.add_argument("name")
    add.add_argument("--address", required=True, metavar="HOST:PORT", help="as backends reach it")
    auth = add.add_mutually_exclusive_group()
    auth.add_argument("--psk-file", help="pre-shared key (loopback labs only)")
    auth.add_argument("--tls-dir", help="PKI folder (default: 'pki' of vpcie.toml)")
    add.add_argument("--tls-name", default="backend", help="client certificate name in it")
    add.add_argument("--label", type=ps.label, action="append", default=[], help="KEY=VALUE")
    rm = asub.add_parser("remove", help="remove an agent and its devices",
                         epilog=AGENTS_EPILOG, formatter_class=RAW)  # fmt: skip
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="even with live leases (they end)")
    verbs = {"list": ls, "add": add, "remove": rm}
    for verb, text in (("cordon", "no new leases on it"), ("uncordon", "take leases again"),
                       ("refresh", "ask it again for its devices")):  # fmt: skip
        c = asub.add_parser(verb, help=text, epilog=AGENTS_EPILOG, formatter_class=RAW)
        c.add_argument("name")
        verbs[verb] = c
    for c in verbs.values():
        ps.common(c)
    a.set_defaults(func=cmd_agents, agents_cmd="list")

    g = sub.add_parser(
        "gpus",
        help="the pool's GPUs and MIG slices (cordon / uncordon one)",
        description="Devices of every agent: kind, model, memory, booked memory, health.",
        epilog="""examples:
  vpcie gpus                       # every device
  vpcie gpus --agent gpu7          # one agent's
  vpcie gpus cordon MIG-1c2d...    # no new leases on this device
  vpcie gpus uncordon MIG-1c2d...
""",
        formatter_class=RAW,
    )
    ps.common(g)
    g.add_argument("action", nargs="?", choices=("list", "cordon", "uncordon"), default="list")
    g.add_argument("gpu", nargs="?", help="device id (cordon / uncordon)")
    g.add_argument("--agent", default=None, help="only this agent's devices")
    g.set_defaults(func=cmd_gpus)

    v = sub.add_parser(
        "vgpus",
        help="the pool's vGPUs (add / remove one)",
        description="vGPUs: a backend (its control socket), the domain it serves, its lease. "
        "vpcie bind adds one on first use.",
        epilog="""examples:
  vpcie vgpus
  vpcie vgpus add web1 --socket /run/vpcie/web1.ctl --domain web1
  vpcie vgpus remove web1          # refused while it holds a lease
""",
        formatter_class=RAW,
    )
    ps.common(v)
    v.add_argument("action", nargs="?", choices=("list", "add", "remove"), default="list")
    v.add_argument("name", nargs="?")
    v.add_argument("--socket", help="the backend's control socket (default /run/vpcie/NAME.ctl)")
    v.add_argument("--domain", default="", help="the libvirt domain it serves")
    v.set_defaults(func=cmd_vgpus)

    le = sub.add_parser(
        "leases",
        help="the pool's leases",
        description="Leases: vGPU -> device, memory, state (reserved, bound, migrating), owner, "
        "fencing token (the store revision that created it; agents refuse older ones).",
        epilog="""examples:
  vpcie leases
  vpcie leases --vgpu web1
  vpcie leases --agent gpu7 --json
  vpcie leases --all               # released ones too, where the store keeps them
""",
        formatter_class=RAW,
    )
    ps.common(le)
    le.add_argument("--vgpu", default=None)
    le.add_argument("--agent", default=None)
    le.add_argument("--all", action="store_true", help="released leases too")
    le.set_defaults(func=cmd_leases)

    st = sub.add_parser(
        "status",
        help="one screen: capacity, used, health",
        description="The pool at a glance: agents by health, devices, memory booked, leases.",
        epilog="""examples:
  vpcie status
  vpcie --pool etcd://10.0.0.5:2379 status --json
""",
        formatter_class=RAW,
    )
    ps.common(st)
    st.set_defaults(func=cmd_status)


# ---- agents


def cmd_agents(args: argparse.Namespace) -> int:
    verb = args.agents_cmd
    if verb == "add":
        return _agents_add(args)
    if verb == "list":
        return _agents_list(args)

    async def body(pool: Pool) -> str:
        from vpcie.fleet import agents

        if verb == "remove":
            await pool.remove_agent(args.name, force=args.force)
            return f"removed agent {args.name}"
        if verb == "refresh":
            gpus = await agents.refresh(pool, args.name)
            return f"agent {args.name}: {len(gpus)} devices"
        await agents.find_agent(pool, args.name)
        await pool.cordon_agent(args.name, verb == "cordon")
        return f"agent {args.name} {verb}ed"

    line = ps.run(args, body)
    emit(args.json, {"agent": args.name, "done": verb}, line)
    return 0


def _agents_add(args: argparse.Namespace) -> int:
    from vpcie.fleet import agents

    tls_dir = args.tls_dir
    if not args.psk_file and not tls_dir:
        tls_dir = ps.pki_dir(args)
    auth = agents.auth_record(args.psk_file, tls_dir, args.tls_name)

    async def body(pool: Pool) -> tuple[Agent, list[Gpu]]:
        return await agents.add(pool, args.name, args.address, auth, dict(args.label))

    agent, gpus = ps.run(args, body)
    served = sum(1 for g in gpus if g.servable)
    emit(
        args.json,
        {"agent": agent.to_json(), "gpus": ps.as_json(gpus)},
        f"added agent {agent.name} at {agent.address}: {len(gpus)} devices, {served} servable",
    )
    return 0


def _agents_list(args: argparse.Namespace) -> int:
    async def body(pool: Pool) -> tuple[list[Agent], dict[str, str], list[Gpu], list[Lease]]:
        return (
            await pool.agents(),
            await pool.agent_health(),
            await pool.gpus(),
            await pool.leases(),
        )

    agents_, healths, gpus, leases = ps.run(args, body)
    per_agent = Counter(g.agent for g in gpus if g.servable)
    per_agent_leases = Counter(lease.agent for lease in leases if lease.state in LIVE)
    rows = [
        (
            a.name,
            a.address,
            healths.get(a.name, "down"),
            "cordoned" if a.cordoned else "-",
            per_agent[a.name],
            per_agent_leases[a.name],
            fmt_age(a.heartbeat),
            fmt_labels(a.labels),
        )
        for a in sorted(agents_, key=lambda a: a.name)
    ]
    out = [dict(a.to_json(), health=healths.get(a.name, "down")) for a in agents_]
    emit(
        args.json,
        {"agents": out},
        table(
            ("NAME", "ADDRESS", "HEALTH", "CORDON", "DEVICES", "LEASES", "HEARTBEAT", "LABELS"),
            rows,
            "no agents (vpcie agents add NAME --address HOST:PORT)",
        ),
    )
    return 0


# ---- gpus


def cmd_gpus(args: argparse.Namespace) -> int:
    if args.action != "list":
        if not args.gpu:
            raise ConfigError(f"gpus {args.action} needs a device id (see vpcie gpus)")

        async def flip(pool: Pool) -> None:
            await pool.cordon_gpu(args.gpu, args.action == "cordon")

        ps.run(args, flip)
        emit(args.json, {"gpu": args.gpu, "done": args.action}, f"{args.gpu} {args.action}ed")
        return 0

    async def body(pool: Pool) -> tuple[list[Gpu], dict[str, Usage]]:
        return await pool.gpus(agent=args.agent), await pool.usage()

    gpus, usage = ps.run(args, body)
    booked = {g.key: usage[g.key].memory if g.key in usage else 0 for g in gpus}
    rows = []
    for g in sorted(gpus, key=lambda g: (g.agent, g.parent or g.id, g.kind != "gpu", g.id)):
        state = "cordoned" if g.cordoned else ("-" if g.servable else "MIG-mode")
        rows.append(
            (
                g.agent,
                g.id,
                g.kind,
                g.model,
                g.profile or "-",
                fmt_size(g.memory_total),
                fmt_size(booked[g.key]),
                "ok" if g.healthy else "BAD",
                state,
            )
        )
    out = [dict(g.to_json(), booked=booked[g.key]) for g in gpus]
    emit(
        args.json,
        {"gpus": out},
        table(
            ("AGENT", "DEVICE", "KIND", "MODEL", "PROFILE", "MEMORY", "BOOKED", "HEALTH", "STATE"),
            rows,
            "no devices" + (f" on agent {args.agent}" if args.agent else ""),
        ),
    )
    return 0


# ---- vgpus


def cmd_vgpus(args: argparse.Namespace) -> int:
    if args.action != "list":
        if not args.name:
            raise ConfigError(f"vgpus {args.action} needs a vGPU name")
        return _vgpus_change(args)

    async def body(pool: Pool) -> tuple[list[Any], list[Lease]]:
        return await pool.vgpus(), await pool.leases()

    vgpus, leases = ps.run(args, body)
    live = {lease.vgpu: lease for lease in leases if lease.state in LIVE}
    rows = []
    for v in sorted(vgpus, key=lambda v: v.name):
        lease = live.get(v.name)
        where = f"{lease.agent}/{lease.gpu}" if lease else "-"
        rows.append((v.name, v.domain or "-", v.socket, lease.id if lease else "-", where,
                     lease.state if lease else "unleased"))  # fmt: skip
    emit(
        args.json,
        {"vgpus": ps.as_json(vgpus)},
        table(
            ("NAME", "DOMAIN", "SOCKET", "LEASE", "DEVICE", "STATE"),
            rows,
            "no vGPUs (vpcie bind NAME adds one)",
        ),
    )
    return 0


def _vgpus_change(args: argparse.Namespace) -> int:
    import os

    from vpcie.fleet import backends
    from vpcie.pool.model import Vgpu

    async def body(pool: Pool) -> str:
        if args.action == "remove":
            await pool.remove_vgpu(args.name)
            return f"removed vGPU {args.name}"
        sock = os.path.abspath(args.socket) if args.socket else backends.default_socket(args.name)
        await pool.add_vgpu(Vgpu(name=args.name, socket=sock, domain=args.domain, lease=""))
        return f"added vGPU {args.name} (control socket {sock})"

    line = ps.run(args, body)
    emit(args.json, {"vgpu": args.name, "done": args.action}, line)
    return 0


# ---- leases


def cmd_leases(args: argparse.Namespace) -> int:
    async def body(pool: Pool) -> list[Lease]:
        return await pool.leases(vgpu=args.vgpu, agent=args.agent)

    leases = ps.run(args, body)
    if not args.all:
        leases = [lease for lease in leases if lease.state in LIVE]
    rows = [
        (
            lease.id,
            lease.vgpu,
            f"{lease.agent}/{lease.gpu}",
            fmt_size(lease.memory),
            "yes" if lease.exclusive else "-",
            lease.state,
            lease.token,
            lease.owner,
            fmt_age(lease.created),
        )
        for lease in sorted(leases, key=lambda x: x.created)
    ]
    emit(
        args.json,
        {"leases": ps.as_json(leases)},
        table(
            ("LEASE", "VGPU", "DEVICE", "MEMORY", "EXCL", "STATE", "TOKEN", "OWNER", "AGE"),
            rows,
            "no leases",
        ),
    )
    return 0


# ---- status


def cmd_status(args: argparse.Namespace) -> int:
    from vpcie.fleet import config

    cfg = config.load(getattr(args, "pool", None))

    async def body(pool: Pool) -> dict[str, Any]:
        return await pool.status()

    s = ps.run(args, body)
    a, d, m, le = s["agents"], s["gpus"], s["memory"], s["leases"]
    used = 100.0 * m["booked"] / m["total"] if m["total"] else 0.0
    human = "\n".join(
        [
            f"pool    : {cfg.pool} (from {cfg.pool_from})",
            f"agents  : {a['total']} ({a['up']} up, {a['stale']} stale, {a['down']} down; "
            f"{a['cordoned']} cordoned)",
            f"devices : {d['total']} servable ({d['gpu']} GPUs, {d['mig']} MIG slices, "
            f"{d['cpu']} CPU); {d['leased']} leased, {d['unhealthy']} unhealthy, "
            f"{d['cordoned']} cordoned",
            f"memory  : {fmt_size(m['booked'])} booked of {fmt_size(m['total'])} ({used:.0f}%)",
            f"leases  : {sum(le.values())} ("
            + ", ".join(f"{le.get(k, 0)} {k}" for k in ("bound", "reserved", "migrating"))
            + f"); {s['vgpus']} vGPUs",
        ]
    )
    emit(args.json, {"pool": cfg.pool, **s}, human)
    return 0
