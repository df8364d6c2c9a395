"""What the pool stores: agents, their GPUs and MIG slices, vGPUs, leases.

Each record is a dataclass with ``to_json`` / ``from_json`` (the stored
value is that JSON). ``from_json`` ignores fields it does not know and fills
the ones it lacks with their defaults, so a newer writer and an older reader
(or the other way round) can share a store.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

Health = Literal["up", "stale", "down"]
LeaseState = Literal["reserved", "bound", "migrating", "released"]
LEASE_STATES: tuple[str, ...] = ("reserved", "bound", "migrating", "released")
KINDS: tuple[str, ...] = ("gpu", "mig", "cpu")
POLICIES: tuple[str, ...] = ("pack", "spread")
STALE_AFTER_TTLS = 3  # an unregistered agent is "down" after this many TTLs without a heartbeat


_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


class _Record:
    _tuples: ClassVar[tuple[str, ...]] = ()

    # Records are flat: fields are scalars, dicts of scalars, or tuples of
    # scalars, so a shallow copy per field is a full copy (and much cheaper
    # than dataclasses.asdict on the reserve path).
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _names(type(self)):
            v = getattr(self, name)
            out[name] = dict(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        known = _names(cls)
        kw = {k: v for k, v in data.items() if k in known}
        for name in cls._tuples:
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> Self:
        return cls.from_json(json.loads(raw))


@dataclass
class Agent(_Record):
    """A host agent. ``address`` is HOST:PORT; ``auth`` is ``{"psk_file": P}``
    or ``{"tls_dir": D, "tls_name": N}``. ``registered``: a registrar keeps a
    TTL key alive for it (its health is that key); otherwise its health is the
    age of ``heartbeat`` against ``ttl`` (``ttl`` 0: no heartbeat expected,
    always up: an agent the operator vouches for)."""

    name: str
    address: str
    auth: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    cordoned: bool = False
    registered: bool = False
    heartbeat: float = 0.0
    version: int = 0  # the agent's protocol version, from its inventory
    ttl: float = 10.0

    def health(self, now: float, alive: bool) -> Health:
        """``alive``: its ``/vpcie/alive/`` TTL key exists."""
        if self.registered:
            return "up" if alive else "down"
        if alive or self.ttl <= 0:
            return "up"
        age = now - self.heartbeat
        if age <= self.ttl:
            return "up"
        return "stale" if age <= STALE_AFTER_TTLS * self.ttl else "down"


@dataclass
class Gpu(_Record):
    """A device an agent lists: a whole GPU, a MIG slice, or its CPU executor.

    ``id`` is the agent's device id (GPU or MIG UUID, or ``cpu0``): unique on
    its agent, not across agents (every CPU agent has a ``cpu0``), so the pool
    names a device ``AGENT/ID`` (``key``). A GPU in MIG mode is listed but not
    ``servable``; its slices are."""

    id: str
    agent: str
    kind: str = "gpu"
    parent: str = ""
    model: str = ""
    memory_total: int = 0
    profile: str = ""
    cc_major: int = 0
    cc_minor: int = 0
    healthy: bool = True
    servable: bool = True
    cordoned: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.agent}/{self.id}"


@dataclass
class Vgpu(_Record):
    """A vGPU: its backend's control ``socket``, the ``domain`` it serves, and
    ``lease``, the id of its newest lease ("" when it holds none). While it
    migrates it holds two leases; ``lease`` names the target's."""

    name: str
    socket: str = ""
    domain: str = ""
    lease: str = ""


@dataclass
class Lease(_Record):
    """A vGPU's claim on a device. ``token`` is the store revision of the
    transaction that created it (the key's create_revision: never stored, filled
    in on every read): the fencing token the backend presents to the agent.
    ``gpu`` is the agent's device id; ``memory`` the quota in bytes.
    Releasing a lease whose vGPU still names it hands the vGPU back its
    ``previous`` lease if that still exists (a migration that failed)."""

    id: str
    vgpu: str
    agent: str
    gpu: str
    memory: int = 0
    exclusive: bool = False
    state: str = "reserved"
    owner: str = ""
    token: int = 0
    created: float = 0.0
    updated: float = 0.0
    previous: str = ""  # the vGPU's lease when this one was made (a migration's source)
    # The tokens of the device's other leases live when this one was made: the
    # agent's fencing (docs/SECURITY.md "Lease fencing") ends sessions of
    # leases outside ``live`` and keeps those in it (shared devices).
    others: tuple[int, ...] = ()

    _tuples: ClassVar[tuple[str, ...]] = ("others",)

    @property
    def device(self) -> str:
        return f"{self.agent}/{self.gpu}"

    @property
    def live(self) -> tuple[int, ...]:
        """What the backend presents with ``token``: ``others`` and itself, ascending."""
        return tuple(sorted({*self.others, self.token}))


@dataclass
class Usage(_Record):
    """What is booked on one device: the ``/vpcie/usage/AGENT/GPU`` record every
    reserve and release compares. ``leases`` maps lease id -> bytes booked,
    ``tokens`` lease id -> its token, 0 for the lease this very write created
    (its token is the revision of the write, unknown until it commits:
    ``resolve`` fills it in from the record's mod_revision)."""

    memory: int = 0
    exclusive: bool = False
    leases: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def resolve(self, mod_revision: int) -> Usage:
        """Tokens left 0 by the write that made this record are that write's
        revision (only the latest writer leaves one: every writer resolves first)."""
        for lid, tok in self.tokens.items():
            if not tok:
                self.tokens[lid] = mod_revision
        return self

    def free(self, total: int) -> int:
        return -1 if self.exclusive else total - self.memory


@dataclass
class Request(_Record):
    """What a vGPU asks for. ``whole``: a whole device, exclusively; ``profile``:
    a MIG slice of that profile, exclusively; otherwise ``memory`` bytes on any
    device, shared. ``model`` matches a substring of the device's model (any
    case); ``labels`` must all be on the device or its agent."""

    _tuples: ClassVar[tuple[str, ...]] = ("exclude_agents",)

    memory: int = 0
    profile: str = ""
    whole: bool = False
    model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    agent: str = ""
    gpu: str = ""
    policy: str = "pack"
    exclude_agents: tuple[str, ...] = ()

    @property
    def exclusive(self) -> bool:
        return self.whole or bool(self.profile)
