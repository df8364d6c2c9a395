"""Which agent (and which GPU on it) this vGPU is bound to, right now.

The PCI function is fixed when the domain starts; the GPU behind it is hot
(DESIGN.md "Hotplug"). ``Binding`` holds the target and its state; each guest
context opens its own agent session from it (one agent worker per context, so
one guest process cannot touch another's device memory).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Protocol

from vpcie.errors import ErrorCode, VgpuError
from vpcie.tunnel.liveness import LivenessConfig


@dataclass(frozen=True)
class AgentTarget:
    host: str
    port: int
    psk: bytes | None = None
    tls: ssl.SSLContext | None = None
    device: str = ""  # GPU / MIG UUID on that agent, "" for any
    mem_quota: int = 0
    max_inflight: int = 0
    liveness: LivenessConfig | None = None  # when the agent counts as lost (None: defaults)
    lease_token: int = 0  # the pool lease's fencing token, sent in OPEN (0: no pool lease)
    # the device's leases live when it was created, its own included, sent in
    # OPEN (ascending; () with token 0)
    lease_live: tuple[int, ...] = ()

    def describe(self) -> str:
        dev = self.device or "any"
        return f"{self.host}:{self.port} device={dev} auth={'tls' if self.tls else 'psk'}"


class CompletionLike(Protocol):
    status: Any
    failed_index: int
    message: str
    results: dict[int, int]
    blob: bytes


class Session(Protocol):
    """What the device needs of a tunnel session (vpcie.tunnel.TunnelClient)."""

    @property
    def info(self) -> Any: ...

    @property
    def inflight(self) -> int: ...

    def send_encoded(
        self,
        data: bytes,
        h2d_total: int,
        d2h_total: int,
        *,
        h2d: Sequence[memoryview] = (),
        d2h: Sequence[memoryview] = (),
        on_done: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one encoded, already checked batch whose copies move
        ``h2d_total``/``d2h_total`` bytes; the future gives its Completion, and
        ``on_done`` gets it synchronously (every way the command ends)."""
        ...

    async def close(self) -> None: ...


def info_bytes(info: Any) -> bytes:
    """QUERY_INFO bytes for a session's info (a QueryInfo dataclass)."""
    from dataclasses import astuple

    from vpcie.protocol.frames import encode_payload

    return encode_payload("QUERY_INFO", *astuple(info))


# (target, client name, handle epoch) -> an open session
SessionFactory = Callable[[AgentTarget, str, int], Awaitable[Session]]


async def tunnel_session(target: AgentTarget, name: str, handle_epoch: int = 0) -> Session:
    """The real factory: a TunnelClient session on the target agent whose
    handles carry ``handle_epoch`` (vpcie/protocol/codes.py)."""
    from vpcie.tunnel import TunnelClient

    client: Session = await TunnelClient.connect(
        target.host,
        target.port,
        psk=target.psk,
        ssl=target.tls,
        device=target.device,
        mem_quota=target.mem_quota,
        max_inflight=target.max_inflight,
        name=name,
        handle_epoch=handle_epoch,
        liveness=target.liveness,
        lease_token=target.lease_token,
        lease_live=target.lease_live,
    )
    return client


class BindState(Enum):
    UNBOUND = "unbound"
    BOUND = "bound"


class Binding:
    """The vGPU's current target. ``generation`` changes on every bind/unbind,
    so sessions opened under an old binding are recognised and dropped."""

    def __init__(
        self, factory: SessionFactory = tunnel_session, liveness: LivenessConfig | None = None
    ) -> None:
        self.factory = factory
        self.liveness = liveness  # given to every target bound without its own
        self.target: AgentTarget | None = None
        self.generation = 0
        self.listeners: list[Callable[[], None]] = []

    @property
    def state(self) -> BindState:
        return BindState.BOUND if self.target is not None else BindState.UNBOUND

    def bind(self, target: AgentTarget) -> None:
        if target.liveness is None and self.liveness is not None:
            target = replace(target, liveness=self.liveness)
        self.target = target
        self.generation += 1
        self._changed()

    def move(self, target: AgentTarget) -> None:
        """A live migration's switch (migration.py): the contexts' sessions
        moved to ``target`` with their state, so nothing is dropped (no
        listener runs); sessions still opening under the old target are
        recognised by the new generation and closed."""
        if target.liveness is None and self.liveness is not None:
            target = replace(target, liveness=self.liveness)
        self.target = target
        self.generation += 1

    def unbind(self) -> None:
        self.target = None
        self.generation += 1
        self._changed()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    async def open(self, name: str, handle_epoch: int = 0) -> tuple[Session, int]:
        target, gen = self.target, self.generation
        if target is None:
            raise VgpuError(ErrorCode.NO_DEVICE, "no GPU is bound to this vGPU")
        try:
            session = await self.factory(target, name, handle_epoch)
        except VgpuError:
            raise
        except (OSError, ConnectionError) as exc:
            raise VgpuError(ErrorCode.DEVICE_LOST, f"agent {target.describe()}: {exc}") from exc
        return session, gen
