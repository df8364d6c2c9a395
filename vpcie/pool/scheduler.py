"""Where a request goes: pure placement over the pool's devices.

``place(gpus, usage, agents, request)`` is the whole decision, without a store.
``Fleet`` is the same decision kept as an index that the Pool updates as its
cache changes, so a reserve on a fleet of 1,000 agents costs a few bisects,
not a scan of 36,000 devices:

* devices are bucketed by (kind, profile, memory size, model), and each
  bucket is a list sorted by (free memory, untouched, agent, parent GPU, id);
* pack, shared memory: in each bucket the first device with enough free
  memory is that bucket's best fit (bisect); the best of those wins, MIG
  slices and already-used GPUs first, untouched whole GPUs only when nothing
  else fits. That keeps whole GPUs free and never strands a slice: the
  smallest slice that fits is taken;
* pack, exclusive (a whole GPU, a MIG profile): the smallest fitting bucket,
  its first untouched device in (agent, parent, id) order, so slices are
  taken GPU by GPU and agents fill up one after another;
* spread, and requests naming an agent or a device: a scan (the emptiest
  agent, then the emptiest device).

Health is the caller's: ``health[agent]`` ("up" | "stale" | "down"); only
"down" (or a missing agent) keeps its devices out.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections import Counter
from collections.abc import Iterable, Mapping

from vpcie.pool.errors import NoCapacity
from vpcie.pool.model import Agent, Gpu, Request, Usage

_Bucket = tuple[str, str, int, str]  # kind, profile, memory_total, model
_Entry = tuple[int, int, str, str, str]  # free, untouched, agent, parent, id
_NO_USAGE = Usage()


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def describe(request: Request) -> str:
    """The request in one phrase: ``memory=80 GiB model=H100``."""
    parts = []
    if request.whole:
        parts.append("a whole GPU")
    if request.profile:
        parts.append(f"profile={request.profile}")
    if request.memory or not parts:
        parts.append(f"memory={fmt_bytes(request.memory)}")
    for name in ("model", "agent", "gpu"):
        if getattr(request, name):
            parts.append(f"{name}={getattr(request, name)}")
    if request.labels:
        parts.append("labels=" + ",".join(f"{k}={v}" for k, v in sorted(request.labels.items())))
    if request.exclude_agents:
        parts.append("not on " + ",".join(request.exclude_agents))
    return " ".join(parts)


def place(
    gpus: Iterable[Gpu],
    usage: Mapping[str, Usage],
    agents: Mapping[str, Agent],
    request: Request,
    *,
    health: Mapping[str, str] | None = None,
) -> Gpu:
    """The device ``request`` goes to, or ``NoCapacity`` with the reason.
    ``usage`` is keyed by ``Gpu.key`` (absent: nothing booked); ``health``
    by agent name (absent: every agent is up)."""
    fleet = Fleet()
    for a in agents.values():
        fleet.set_agent(a)
    for g in gpus:
        fleet.set_gpu(g)
        if g.key in usage:
            fleet.set_usage(g.key, usage[g.key])
    return fleet.place(request, health or {})


class Fleet:
    """The placement index (see the module doc). Mutate it only through
    ``set_*`` / ``drop_*``; read ``gpus``, ``usage`` and ``agents`` freely."""

    def __init__(self) -> None:
        self.gpus: dict[str, Gpu] = {}
        self.usage: dict[str, Usage] = {}
        self.agents: dict[str, Agent] = {}
        self._buckets: dict[_Bucket, list[_Entry]] = {}
        self._entries: dict[str, tuple[_Bucket, _Entry]] = {}
        self._by_agent: dict[str, set[str]] = {}
        self._used: Counter[str] = Counter()  # agent -> its devices holding leases

    # updates -----------------------------------------------------------

    def set_agent(self, agent: Agent) -> None:
        self.agents[agent.name] = agent

    def drop_agent(self, name: str) -> None:
        self.agents.pop(name, None)

    def set_gpu(self, gpu: Gpu) -> None:
        self._unindex(gpu.key)
        self.gpus[gpu.key] = gpu
        self._by_agent.setdefault(gpu.agent, set()).add(gpu.key)
        self._index(gpu.key)

    def drop_gpu(self, key: str) -> None:
        self._unindex(key)
        gpu = self.gpus.pop(key, None)
        if gpu is not None:
            self._by_agent.get(gpu.agent, set()).discard(key)

    def set_usage(self, key: str, usage: Usage | None) -> None:
        self._unindex(key)
        if usage is None or not (usage.leases or usage.memory or usage.exclusive):
            self.usage.pop(key, None)
        else:
            self.usage[key] = usage
        self._index(key)

    def _index(self, key: str) -> None:
        gpu = self.gpus.get(key)
        if gpu is None or not gpu.servable:
            return
        u = self.usage.get(key, _NO_USAGE)
        if u.leases:
            self._used[gpu.agent] += 1
        bucket = (gpu.kind, gpu.profile, gpu.memory_total, gpu.model)
        entry = (u.free(gpu.memory_total), 0 if u.leases else 1, gpu.agent, gpu.parent, gpu.id)
        bisect.insort(self._buckets.setdefault(bucket, []), entry)
        self._entries[key] = (bucket, entry)

    def _unindex(self, key: str) -> None:
        got = self._entries.pop(key, None)
        if got is None:
            return
        bucket, entry = got
        lst = self._buckets[bucket]
        del lst[bisect.bisect_left(lst, entry)]
        if not entry[1]:
            self._used[entry[2]] -= 1

    # decisions ---------------------------------------------------------

    def place(
        self,
        request: Request,
        health: Mapping[str, str],
        *,
        choices: int = 1,
        rng: random.Random | None = None,
    ) -> Gpu:
        """The best device for ``request``; with ``choices`` > 1 one of the best
        that many, at random (a reserve that lost a race: racers that all
        chose the same best device would otherwise collide again in step)."""
        if request.policy not in ("pack", "spread"):
            raise NoCapacity(f"no capacity: unknown policy {request.policy!r} (pack or spread)")
        found = self.best(request, health, choices)
        if not found:
            raise NoCapacity(self.explain(request, health))
        return self.gpus[found[0] if len(found) == 1 else (rng or random).choice(found)]

    def best(self, req: Request, health: Mapping[str, str], k: int = 1) -> list[str]:
        """The ``k`` best fitting devices, best first (by ``rank``)."""
        if req.policy == "pack" and not (req.agent or req.gpu):
            return self._pack_indexed(req, health, k)
        return self._scan(req, health, k)

    def _pack_indexed(self, req: Request, health: Mapping[str, str], k: int) -> list[str]:
        need = req.memory
        buckets = [b for b in self._buckets if _bucket_fits(b, req)]
        if req.exclusive:
            found = [(b[2], e) for b in buckets for e in self._first(b, (b[2], 1), k, req, health)]
            return [_key(e) for _, e in heapq.nsmallest(k, found)]
        # shared: the best fit of each bucket, MIG slices and used GPUs first
        near: list[tuple[int, int, int, _Entry]] = []
        for b in buckets:
            mig = b[0] == "mig"
            for e in self._first(b, (need,), k, req, health, stop_untouched=not mig):
                near.append((e[0] - need, 0 if mig else 1, b[2], e))
        out = [_key(c[3]) for c in heapq.nsmallest(k, near)]
        if len(out) < k:  # untouched whole GPUs last, the smallest first
            far = [(b[2] - need, b[2], e) for b in buckets if b[0] != "mig"
                   for e in self._first(b, (b[2], 1), k - len(out), req, health)]  # fmt: skip
            out += [_key(c[2]) for c in heapq.nsmallest(k - len(out), far)]
        return out

    def _first(
        self,
        b: _Bucket,
        start: tuple[int, ...],
        k: int,
        req: Request,
        health: Mapping[str, str],
        stop_untouched: bool = False,
    ) -> list[_Entry]:
        """Up to ``k`` entries of bucket ``b`` from ``start`` on that pass the
        checks the bucket does not make (``stop_untouched``: stop at the
        first untouched device)."""
        lst = self._buckets[b]
        out: list[_Entry] = []
        for i in range(bisect.bisect_left(lst, start), len(lst)):  # no slice: no copy
            e = lst[i]
            if stop_untouched and e[1]:
                break
            if self._static_reason(_key(e), req, health) is None:
                out.append(e)
                if len(out) == k:
                    break
        return out

    def _scan(self, req: Request, health: Mapping[str, str], k: int) -> list[str]:
        if req.gpu:
            keys: Iterable[str] = [
                key for key in self._entries if key.split("/", 1)[1] == req.gpu or key == req.gpu
            ]
        elif req.agent:
            keys = self._by_agent.get(req.agent, set())
        else:
            keys = self._entries
        fits = [(self.rank(key, req), key) for key in keys
                if key in self._entries and self.reason(key, req, health) is None]  # fmt: skip
        return [key for _, key in heapq.nsmallest(k, fits)]

    def rank(self, key: str, req: Request) -> tuple[object, ...]:
        """The order a policy prefers fitting devices in (smallest first); the
        indexed pack path takes the same device as a scan with this order."""
        gpu = self.gpus[key]
        _, entry = self._entries[key]
        free, untouched = entry[0], entry[1]
        if req.policy == "spread":
            booked = gpu.memory_total - free
            return (self._used[gpu.agent], booked / max(gpu.memory_total, 1), -free, entry)
        if req.exclusive:
            return (gpu.memory_total, entry)
        mig = gpu.kind == "mig"
        return (untouched and not mig, free - req.memory, 0 if mig else 1, gpu.memory_total, entry)

    def reason(self, key: str, req: Request, health: Mapping[str, str]) -> str | None:
        """Why device ``key`` does not fit ``req`` (a short phrase), or None."""
        gpu = self.gpus[key]
        if not gpu.servable:
            return "not servable"
        why = self._static_reason(key, req, health)
        if why is not None:
            return why
        if req.whole and gpu.kind == "mig":
            return "MIG slices"
        if req.profile and gpu.profile != req.profile:
            return "other profile"
        if req.model and req.model.lower() not in gpu.model.lower():
            return "other model"
        if gpu.memory_total < req.memory:
            return "too small"
        u = self.usage.get(key, _NO_USAGE)
        if u.exclusive or (req.exclusive and u.leases):
            return "in use"
        if u.free(gpu.memory_total) < req.memory:
            return "full"
        return None

    def _static_reason(self, key: str, req: Request, health: Mapping[str, str]) -> str | None:
        """The checks a bucket does not already make."""
        gpu = self.gpus[key]
        agent = self.agents.get(gpu.agent)
        if agent is None or health.get(gpu.agent, "up") == "down":
            return "down"
        if agent.cordoned or gpu.cordoned:
            return "cordoned"
        if not gpu.healthy:
            return "unhealthy"
        if gpu.agent in req.exclude_agents or (req.agent and gpu.agent != req.agent):
            return "other agent"
        if req.gpu and req.gpu not in (gpu.id, key):
            return "other device"
        for k, v in req.labels.items():
            if gpu.labels.get(k, agent.labels.get(k)) != v:
                return "other labels"
        return None

    def explain(self, req: Request, health: Mapping[str, str]) -> str:
        """The one-line NoCapacity reason: what was asked, why nothing fits."""
        why = Counter(self.reason(k, req, health) for k in self._entries)
        fit = why.pop(None, 0)
        if not self._entries:
            return f"no capacity for {describe(req)}: the pool has no servable devices"
        counts = ", ".join(f"{n} {r}" for r, n in why.most_common())
        return f"no capacity: {fit} of {len(self._entries)} devices fit {describe(req)} ({counts})"


def _key(e: _Entry) -> str:
    return f"{e[2]}/{e[4]}"


def _bucket_fits(b: _Bucket, req: Request) -> bool:
    kind, profile, total, model = b
    if total < req.memory:
        return False
    if req.model and req.model.lower() not in model.lower():
        return False
    if req.whole:
        return kind != "mig"
    if req.profile:
        return kind == "mig" and profile == req.profile
    return True
