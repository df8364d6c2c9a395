"""The pool: agents, devices, vGPUs and leases over any ``KV`` store.

Written once over ``vpcie.pool.kv.KV``: every rule (never double-booked,
fencing tokens that grow) is a compare in a store transaction, so it holds
across processes and hosts alike.

Keys (JSON values, ``vpcie.pool.model``)::

    /vpcie/agents/NAME          Agent
    /vpcie/gpus/AGENT/ID        Gpu
    /vpcie/usage/AGENT/ID       Usage: what is booked on that device
    /vpcie/alive/AGENT          TTL key, present while the agent's registrar lives
    /vpcie/vgpus/NAME           Vgpu
    /vpcie/leases/ID            Lease (its token is the key's create_revision)

A reserve is ONE transaction in the common case: the Pool keeps a cache of
agents, devices, usage and vGPUs (a ``scheduler.Fleet``), places the request
on it, and commits "if the device's usage, the device, its agent (and its
alive key) and the vGPU are still the versions I placed on, book it". A
failed compare rereads the compared keys (every few conflicts, everything
changed since the cache was read), backs off with jitter and places again
(bounded); a NoCapacity is only ever answered from a fresh read.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Self

from vpcie.pool.errors import Conflict, NoCapacity, NotFound, PoolError
from vpcie.pool.kv import KV, MAX_TXN_OPS, Compare, Item, LeaseId, open_kv
from vpcie.pool.model import LEASE_STATES, POLICIES, Agent, Gpu, Lease, Request, Usage, Vgpu
from vpcie.pool.scheduler import Fleet

ROOT = "/vpcie/"
AGENTS = ROOT + "agents/"
GPUS = ROOT + "gpus/"
USAGE = ROOT + "usage/"
ALIVE = ROOT + "alive/"
VGPUS = ROOT + "vgpus/"
LEASES = ROOT + "leases/"
_CACHED = (AGENTS, GPUS, USAGE, ALIVE, VGPUS)
ATTEMPTS = 64  # placements tried before a reserve gives up with Conflict
CATCH_UP_EVERY = 4  # conflicts in a row before reading everything changed since (a scan)
BACKOFF_MAX = 0.05  # seconds: racers that collided retry at jittered times


class Pool:
    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._fleet = Fleet()
        self._items: dict[str, Item] = {}  # cached keys (the _CACHED prefixes) and our leases
        self._vgpus: dict[str, Vgpu] = {}
        self._alive: set[str] = set()
        self._loaded = False
        self._synced = 0  # every change at or below this revision is in the cache

    @classmethod
    async def open(cls, url: str) -> Pool:
        return cls(open_kv(url))

    async def close(self) -> None:
        await self.kv.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # agents ------------------------------------------------------------

    async def add_agent(self, agent: Agent, gpus: list[Gpu]) -> Agent:
        """Add an agent and its devices. An agent of that name must not exist."""
        _check_name("agent", agent.name)
        if await self.kv.get(AGENTS + agent.name) is not None:
            raise Conflict(f"agent {agent.name} is already in the pool (remove it first)")
        gpus = [_owned(g, agent.name) for g in gpus]
        puts = [(GPUS + g.key, g.dumps()) for g in gpus]
        if agent.heartbeat == 0.0:
            agent.heartbeat = time.time()
        for chunk in _chunks(puts):  # devices first: without their agent none fits
            await self._write([], chunk, [])
        if not await self._txn(
            [Compare(AGENTS + agent.name, 0)], [(AGENTS + agent.name, agent.dumps())], []
        ):
            raise Conflict(f"agent {agent.name} was added by someone else meanwhile")
        return agent

    async def update_inventory(self, name: str, gpus: list[Gpu]) -> None:
        """Replace an agent's device list with what it reports now, keeping what
        operators set (cordons, labels); devices it no longer lists go."""
        await self._agent_item(name)
        old = {Gpu.loads(i.value).key: i for i in await self.kv.range(f"{GPUS}{name}/")}
        puts: list[tuple[str, bytes]] = []
        for g in (_owned(g, name) for g in gpus):
            prev = old.pop(g.key, None)
            if prev is not None:
                was = Gpu.loads(prev.value)
                g.cordoned, g.labels = was.cordoned, {**g.labels, **was.labels}
                if prev.value == g.dumps():
                    continue
            puts.append((GPUS + g.key, g.dumps()))
        ops: list[tuple[str, bytes] | str] = [*puts, *(GPUS + k for k in old)]
        for chunk in _chunks(ops):
            await self._write(
                [],
                [o for o in chunk if isinstance(o, tuple)],
                [o for o in chunk if isinstance(o, str)],
            )

    async def remove_agent(self, name: str, force: bool = False) -> None:
        """Remove an agent and its devices. Refused while it holds leases,
        unless ``force`` (its leases are then dropped too)."""
        was = Agent.loads((await self._agent_item(name)).value)
        # Cordon first: a reserve that placed on this agent before compares its
        # record and fails, and none places there after; so no lease can slip
        # in between the check below and the delete.
        await self.cordon_agent(name, True)
        held = [ls for ls in await self.leases(agent=name) if ls.state != "released"]
        if held and not force:
            if not was.cordoned:
                await self.cordon_agent(name, False)
            names = ", ".join(sorted({ls.vgpu for ls in held}))
            raise Conflict(
                f"agent {name} holds {len(held)} lease(s) (vGPU {names}): migrate them "
                f"(vpcie drain {name}) or release them first"
            )
        for ls in held:
            try:
                await self.release(ls.id)
            except NotFound:
                pass
        await self._write([], [], [AGENTS + name, ALIVE + name])
        rest = [i.key for p in (GPUS, USAGE) for i in await self.kv.range(f"{p}{name}/")]
        for chunk in _chunks(rest):
            await self._write([], [], [k for k in chunk if isinstance(k, str)])

    async def cordon_agent(self, name: str, on: bool = True) -> Agent:
        def edit(a: Agent) -> None:
            a.cordoned = on

        return await self._edit_agent(name, edit)

    async def heartbeat(self, name: str) -> Agent:
        def edit(a: Agent) -> None:
            a.heartbeat = time.time()

        return await self._edit_agent(name, edit)

    async def cordon_gpu(self, gpu_id: str, on: bool = True) -> Gpu:
        """``gpu_id``: ``AGENT/ID``, or an ID that names one device in the pool."""
        for _ in range(ATTEMPTS):
            item = await self._gpu_item(gpu_id)
            gpu = Gpu.loads(item.value)
            gpu.cordoned = on
            if await self._txn([Compare(item.key, item.version)], [(item.key, gpu.dumps())], []):
                return gpu
        raise Conflict(f"device {gpu_id} kept changing; try again")

    async def register_alive(self, name: str, ttl: float) -> LeaseId:
        """Mark ``name`` registered and give it a TTL key; keep it with
        ``keepalive``. Once the key expires the agent is "down" at once."""
        lease = await self.kv.grant_ttl(ttl)
        for _ in range(ATTEMPTS):
            item = await self._agent_item(name)
            agent = Agent.loads(item.value)
            agent.registered, agent.ttl, agent.heartbeat = True, float(ttl), time.time()
            if await self._txn(
                [Compare(item.key, item.version)],
                [(item.key, agent.dumps())],
                [],
                [(ALIVE + name, b"1", lease)],
            ):
                return lease
        raise Conflict(f"agent {name} kept changing; try again")

    async def keepalive(self, lease: LeaseId) -> bool:
        return await self.kv.keepalive(lease)

    # reads -------------------------------------------------------------

    async def agents(self) -> list[Agent]:
        return [Agent.loads(i.value) for i in await self.kv.range(AGENTS)]

    async def agent_health(self) -> dict[str, str]:
        alive = {i.key[len(ALIVE) :] for i in await self.kv.range(ALIVE)}
        now = time.time()
        return {a.name: a.health(now, a.name in alive) for a in await self.agents()}

    async def gpus(self, agent: str | None = None) -> list[Gpu]:
        prefix = GPUS if agent is None else f"{GPUS}{agent}/"
        return [Gpu.loads(i.value) for i in await self.kv.range(prefix)]

    async def usage(self) -> dict[str, Usage]:
        """Booked memory per device, keyed ``AGENT/ID``."""
        return {
            i.key[len(USAGE) :]: Usage.loads(i.value).resolve(i.mod_revision)
            for i in await self.kv.range(USAGE)
        }

    async def vgpus(self) -> list[Vgpu]:
        return [Vgpu.loads(i.value) for i in await self.kv.range(VGPUS)]

    async def leases(self, vgpu: str | None = None, agent: str | None = None) -> list[Lease]:
        out = [_lease(i) for i in await self.kv.range(LEASES)]
        return [
            ls
            for ls in out
            if (vgpu is None or ls.vgpu == vgpu) and (agent is None or ls.agent == agent)
        ]

    async def lease(self, lease_id: str) -> Lease:
        item = await self.kv.get(LEASES + lease_id)
        if item is None:
            raise NotFound(f"no lease {lease_id} in the pool")
        return _lease(item)

    async def status(self) -> dict[str, Any]:
        """One screen: agents by health, devices, memory booked, leases by state."""
        health = await self.agent_health()
        agents = {a.name: a for a in await self.agents()}
        gpus = await self.gpus()
        usage = await self.usage()
        leases = await self.leases()
        servable = [g for g in gpus if g.servable]
        return {
            "agents": {
                "total": len(agents),
                **{h: sum(1 for v in health.values() if v == h) for h in ("up", "stale", "down")},
                "cordoned": sum(1 for a in agents.values() if a.cordoned),
            },
            "gpus": {
                "total": len(servable),
                "gpu": sum(1 for g in servable if g.kind == "gpu"),
                "mig": sum(1 for g in servable if g.kind == "mig"),
                "cpu": sum(1 for g in servable if g.kind == "cpu"),
                "cordoned": sum(1 for g in servable if g.cordoned),
                "unhealthy": sum(1 for g in servable if not g.healthy),
                "leased": sum(1 for g in servable if usage.get(g.key, Usage()).leases),
            },
            "memory": {
                "total": sum(g.memory_total for g in servable),
                "booked": sum(u.memory for u in usage.values()),
            },
            "leases": dict(Counter(ls.state for ls in leases)),
            "vgpus": len(await self.vgpus()),
        }

    # vGPUs -------------------------------------------------------------

    async def add_vgpu(self, vgpu: Vgpu) -> Vgpu:
        """Add a vGPU, or update its socket and domain (its lease is kept)."""
        _check_name("vGPU", vgpu.name)
        for _ in range(ATTEMPTS):
            item = await self.kv.get(VGPUS + vgpu.name)
            if item is not None:
                vgpu.lease = Vgpu.loads(item.value).lease
            key = VGPUS + vgpu.name
            if await self._txn(
                [Compare(key, item.version if item else 0)], [(key, vgpu.dumps())], []
            ):
                return vgpu
        raise Conflict(f"vGPU {vgpu.name} kept changing; try again")

    async def remove_vgpu(self, name: str) -> None:
        """Remove a vGPU that holds no lease."""
        item = await self.kv.get(VGPUS + name)
        if item is None:
            raise NotFound(f"no vGPU named {name} in the pool")
        held = [ls for ls in await self.leases(vgpu=name) if ls.state != "released"]
        if held:
            raise Conflict(
                f"vGPU {name} holds lease {held[0].id} on {held[0].device}: "
                "unbind or release it first"
            )
        if not await self._txn([Compare(item.key, item.version)], [], [item.key]):
            raise Conflict(f"vGPU {name} changed meanwhile; try again")

    # leases ------------------------------------------------------------

    async def reserve(self, vgpu: str, request: Request, owner: str = "") -> Lease:
        """Book a device for ``vgpu`` (created if the pool does not know it yet).
        One transaction in the common case; ``NoCapacity`` names what was
        asked and why nothing fits."""
        _check_request(request)
        _check_name("vGPU", vgpu)
        fresh = not self._loaded  # a NoCapacity is only answered from a fresh read
        if fresh:
            await self._load()
        for attempt in range(ATTEMPTS):
            try:
                gpu = self._fleet.place(request, _Health(self), choices=min(1 << attempt, 16))
            except NoCapacity:
                if fresh:
                    raise
                await self._load()
                fresh = True
                continue
            lease, compares, puts, objs = self._booking(vgpu, gpu, request, owner)
            res = await self.kv.txn(compares, puts, [])
            if res.succeeded:
                self._cache_writes(puts, res.revision, objs)
                lease.token = res.revision
                return lease
            # Someone booked (or changed) what we placed on. Reread what we
            # compared; every few conflicts also everything changed since the
            # cache was read (a revision-bounded range: a scan on both stores,
            # so not every time); back off with jitter so that racers that
            # all chose the same best device do not collide again in step.
            fresh = False
            if attempt % CATCH_UP_EVERY == CATCH_UP_EVERY - 1:
                await self._catch_up([c.key for c in compares])
            else:
                for c in compares:
                    await self._refresh_key(c.key)
            await asyncio.sleep(random.uniform(0, min(BACKOFF_MAX, 0.001 * 2**attempt)))
        raise Conflict(
            f"could not reserve for {vgpu}: the pool changed under {ATTEMPTS} attempts; try again"
        )

    async def release(self, lease_id: str) -> Lease:
        """Free a lease's booking (one transaction when this Pool made it)."""
        for _ in range(ATTEMPTS):
            litem = self._items.get(LEASES + lease_id) or await self.kv.get(LEASES + lease_id)
            if litem is None:
                raise NotFound(f"no lease {lease_id} in the pool")
            lease = _lease(litem)
            ukey, vkey = f"{USAGE}{lease.agent}/{lease.gpu}", VGPUS + lease.vgpu
            uitem, vitem = await self._cached(ukey), await self._cached(vkey)
            compares = [Compare(litem.key, litem.version), Compare(ukey, _ver(uitem))]
            puts: list[tuple[str, bytes]] = []
            objs: dict[str, object] = {}
            if uitem is not None:
                u = objs[ukey] = Usage.loads(uitem.value).resolve(uitem.mod_revision)
                u.memory -= u.leases.pop(lease_id, 0)
                u.tokens.pop(lease_id, None)
                u.exclusive = u.exclusive and bool(u.leases)
                puts.append((ukey, u.dumps()))
            v = Vgpu.loads(vitem.value) if vitem is not None else None
            if vitem is not None and v is not None and v.lease == lease_id:
                # a migration that failed releases its target's lease: the
                # vGPU names the lease it had before again, if that still holds
                objs[vkey] = v
                v.lease = ""
                if lease.previous:
                    prev = await self.kv.get(LEASES + lease.previous)
                    compares.append(Compare(LEASES + lease.previous, _ver(prev)))
                    v.lease = lease.previous if prev is not None else ""
                compares.append(Compare(vkey, vitem.version))
                puts.append((vkey, v.dumps()))
            res = await self.kv.txn(compares, puts, [litem.key])
            if res.succeeded:
                self._items.pop(litem.key, None)
                self._cache_writes(puts, res.revision, objs)
                lease.state = "released"
                return lease
            for key in (litem.key, ukey, vkey):
                await self._refresh_key(key)
        raise Conflict(f"lease {lease_id} kept changing; try again")

    async def set_lease_state(self, lease_id: str, state: str) -> Lease:
        if state not in LEASE_STATES or state == "released":
            raise PoolError(
                f"lease state {state!r}: one of reserved, bound, migrating (release() ends a lease)"
            )
        for _ in range(ATTEMPTS):
            item = await self.kv.get(LEASES + lease_id)
            if item is None:
                raise NotFound(f"no lease {lease_id} in the pool")
            lease = _lease(item)
            lease.state, lease.updated = state, time.time()
            res = await self.kv.txn(
                [Compare(item.key, item.version)], [(item.key, _lease_value(lease))], []
            )
            if res.succeeded:
                if item.key in self._items:
                    self._cache_writes([(item.key, _lease_value(lease))], res.revision)
                return lease
        raise Conflict(f"lease {lease_id} kept changing; try again")

    # the cache ---------------------------------------------------------

    async def refresh(self) -> None:
        """Reread the placement cache now (a reserve does it when it must)."""
        await self._load()

    def _booking(
        self, vgpu: str, gpu: Gpu, req: Request, owner: str
    ) -> tuple[Lease, list[Compare], list[tuple[str, bytes]], dict[str, object]]:
        now = time.time()
        memory = gpu.memory_total if req.exclusive else req.memory
        v = self._vgpus.get(vgpu) or Vgpu(vgpu)
        old = self._vgpus.get(vgpu) or Vgpu(vgpu)
        u = self._fleet.usage.get(gpu.key, Usage())  # its tokens resolved (_apply)
        lease = Lease(
            secrets.token_hex(6), vgpu, gpu.agent, gpu.id, memory, req.exclusive, "reserved",
            owner, 0, now, now, previous=old.lease, others=tuple(sorted(u.tokens.values())),
        )  # fmt: skip
        ukey, gkey, akey, vkey = (USAGE + gpu.key, GPUS + gpu.key, AGENTS + gpu.agent, VGPUS + vgpu)
        u = Usage(
            u.memory + memory,
            req.exclusive,
            {**u.leases, lease.id: memory},
            {**u.tokens, lease.id: 0},  # 0: this write's revision (Usage.resolve)
        )
        v = Vgpu(old.name, old.socket, old.domain, lease.id)
        compares = [Compare(k, _ver(self._items.get(k))) for k in (ukey, gkey, akey, vkey)]
        if self._fleet.agents[gpu.agent].registered:
            compares.append(Compare(ALIVE + gpu.agent, _ver(self._items.get(ALIVE + gpu.agent))))
        puts = [(LEASES + lease.id, _lease_value(lease)), (ukey, u.dumps()), (vkey, v.dumps())]
        return lease, compares, puts, {ukey: u, vkey: v}

    def _cache_writes(
        self, puts: list[tuple[str, bytes]], rev: int, objs: Mapping[str, object] | None = None
    ) -> None:
        """Our own committed writes into the cache (``objs``: the records
        already decoded, so they are not parsed again)."""
        for key, value in puts:
            old = self._items.get(key)
            item = Item(key, value, _ver(old) + 1, rev, old.create_revision if old else rev)
            self._apply(item, (objs or {}).get(key))

    async def _load(self) -> None:
        """Read every cached prefix afresh."""
        self._fleet, self._vgpus, self._alive = Fleet(), {}, set()
        self._items = {k: i for k, i in self._items.items() if k.startswith(LEASES)}
        synced = 0
        for item in await self.kv.range(ROOT):  # one read: one snapshot
            if item.key.startswith(_CACHED):
                self._apply(item)
            synced = max(synced, item.mod_revision)
        self._synced, self._loaded = synced, True

    async def _catch_up(self, keys: list[str]) -> None:
        """After a failed compare: every change since the cache was read (one
        revision-bounded range), and the compared keys themselves (which also
        shows the ones deleted or expired)."""
        synced = self._synced
        for item in await self.kv.range(ROOT, min_mod_revision=self._synced + 1):
            if item.key.startswith(_CACHED):
                self._apply(item)
                synced = max(synced, item.mod_revision)
        for key in keys:
            await self._refresh_key(key)
        self._synced = synced

    async def _refresh_key(self, key: str) -> None:
        item = await self.kv.get(key)
        if item is None:
            self._forget(key)
        elif key.startswith(_CACHED) or key in self._items:
            self._apply(item)

    async def _cached(self, key: str) -> Item | None:
        if self._loaded and key.startswith(_CACHED):
            return self._items.get(key)
        return self._items.get(key) or await self.kv.get(key)

    def _apply(self, item: Item, obj: object = None) -> None:
        key = item.key
        self._items[key] = item
        if key.startswith(GPUS):
            self._fleet.set_gpu(Gpu.loads(item.value))
        elif key.startswith(USAGE):
            u = (obj if isinstance(obj, Usage) else Usage.loads(item.value)).resolve(
                item.mod_revision
            )
            self._fleet.set_usage(key[len(USAGE) :], u)
        elif key.startswith(AGENTS):
            self._fleet.set_agent(Agent.loads(item.value))
        elif key.startswith(ALIVE):
            self._alive.add(key[len(ALIVE) :])
        elif key.startswith(VGPUS):
            self._vgpus[key[len(VGPUS) :]] = (
                obj if isinstance(obj, Vgpu) else Vgpu.loads(item.value)
            )

    def _forget(self, key: str) -> None:
        self._items.pop(key, None)
        if key.startswith(GPUS):
            self._fleet.drop_gpu(key[len(GPUS) :])
        elif key.startswith(USAGE):
            self._fleet.set_usage(key[len(USAGE) :], None)
        elif key.startswith(AGENTS):
            self._fleet.drop_agent(key[len(AGENTS) :])
        elif key.startswith(ALIVE):
            self._alive.discard(key[len(ALIVE) :])
        elif key.startswith(VGPUS):
            self._vgpus.pop(key[len(VGPUS) :], None)

    # helpers -----------------------------------------------------------

    async def _txn(
        self,
        compares: list[Compare],
        puts: list[tuple[str, bytes]],
        deletes: list[str],
        ttl_puts: list[tuple[str, bytes, LeaseId]] | None = None,
    ) -> bool:
        """A transaction whose writes also go into the cache (when it is loaded)."""
        res = await self.kv.txn(compares, puts, deletes, ttl_puts or [])
        if res.succeeded and self._loaded:
            self._cache_writes([*puts, *((k, v) for k, v, _ in ttl_puts or [])], res.revision)
            for key in deletes:
                self._forget(key)
        return res.succeeded

    async def _write(
        self, compares: list[Compare], puts: list[tuple[str, bytes]], deletes: list[str]
    ) -> None:
        if not await self._txn(compares, puts, deletes):
            raise Conflict("the pool changed meanwhile; try again")

    async def _agent_item(self, name: str) -> Item:
        item = await self.kv.get(AGENTS + name)
        if item is None:
            raise NotFound(f"no agent named {name} in the pool")
        return item

    async def _edit_agent(self, name: str, edit: Any) -> Agent:
        for _ in range(ATTEMPTS):
            item = await self._agent_item(name)
            agent = Agent.loads(item.value)
            edit(agent)
            if await self._txn([Compare(item.key, item.version)], [(item.key, agent.dumps())], []):
                return agent
        raise Conflict(f"agent {name} kept changing; try again")

    async def _gpu_item(self, gpu_id: str) -> Item:
        if "/" in gpu_id:
            item = await self.kv.get(GPUS + gpu_id)
            if item is None:
                raise NotFound(f"no device {gpu_id} in the pool")
            return item
        hits = [i for i in await self.kv.range(GPUS) if i.key.endswith("/" + gpu_id)]
        if not hits:
            raise NotFound(f"no device {gpu_id} in the pool")
        if len(hits) > 1:
            raise PoolError(f"device id {gpu_id} is on {len(hits)} agents: name it AGENT/{gpu_id}")
        return hits[0]


class _Health(Mapping[str, str]):
    """Agent health computed when the scheduler asks (a reserve looks at a
    few agents, not all of them)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._now = time.time()

    def __getitem__(self, name: str) -> str:
        agent = self._pool._fleet.agents[name]
        return agent.health(self._now, name in self._pool._alive)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pool._fleet.agents)

    def __len__(self) -> int:
        return len(self._pool._fleet.agents)


def _ver(item: Item | None) -> int:
    return item.version if item is not None else 0


def _lease(item: Item) -> Lease:
    lease = Lease.loads(item.value)
    lease.token = item.create_revision
    return lease


def _lease_value(lease: Lease) -> bytes:
    data = lease.to_json()
    data.pop("token")  # the key's create_revision is the token
    return json.dumps(data, separators=(",", ":")).encode()


def _owned(gpu: Gpu, agent: str) -> Gpu:
    if gpu.agent and gpu.agent != agent:
        raise PoolError(f"device {gpu.id} belongs to agent {gpu.agent}, not {agent}")
    gpu.agent = agent
    _check_name("device", gpu.id)
    return gpu


def _check_name(what: str, name: str) -> None:
    if not name or "/" in name or not name.isprintable() or len(name) > 200:
        raise PoolError(f"{what} name {name!r}: 1 to 200 printable characters, no '/'")


def _check_request(req: Request) -> None:
    if req.policy not in POLICIES:
        raise PoolError(f"policy {req.policy!r}: one of {', '.join(POLICIES)}")
    if req.memory < 0:
        raise PoolError(f"memory {req.memory}: must not be negative")
    if req.whole and req.profile:
        raise PoolError("ask for a whole GPU or a MIG profile, not both")


def _chunks(ops: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(ops), MAX_TXN_OPS):
        yield ops[i : i + MAX_TXN_OPS]
