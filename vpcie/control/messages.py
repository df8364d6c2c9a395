"""The control socket's messages: one JSON object per line each way.

Requests::

    {"op": "status"}
    {"op": "bind", "agent": "HOST:PORT", "psk_file": PATH | "tls_dir": DIR,
     "tls_name": NAME, "device": UUID, "mem_quota": BYTES, "max_inflight": N,
     "replace": false, "lease_token": N, "lease_live": [N, ...]}
    {"op": "migrate", <bind's fields but replace>}   live migration to that agent
    {"op": "unbind"}

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``.

Sans-IO: ``parse_request`` checks a request line and returns one of the
request classes (ValueError, one line, when it is not a request we serve);
each class and reply writes its own JSON object (``to_wire``). Reading the
PSK file and the TLS folder a bind names is the server's business
(``vpcie.control.target``), not the parser's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"agent address {text!r} is not HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"agent address {text!r}: port {int(port)} is not in 1..65535")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class StatusRequest:
    op: ClassVar[str] = "status"

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op}


@dataclass(frozen=True)
class UnbindRequest:
    op: ClassVar[str] = "unbind"

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op}


@dataclass(frozen=True)
class BindRequest:
    """Bind the vGPU to an agent's GPU. Paths are the backend's: a client
    sends absolute ones (the backend's working directory is not its own)."""

    op: ClassVar[str] = "bind"
    agent: str  # HOST:PORT, checked by parse_request (and by address())
    psk_file: str | None = None
    tls_dir: str | None = None
    tls_name: str = "backend"
    device: str = ""  # GPU / MIG UUID on the agent, "" for any
    mem_quota: int = 0
    max_inflight: int = 0
    replace: bool = False
    lease_token: int = 0  # the pool lease's fencing token (0: no pool lease)
    # The tokens of the device's leases live when this one was made, its own
    # included (docs/SECURITY.md "Lease fencing"); () without a pool lease.
    lease_live: tuple[int, ...] = ()

    def address(self) -> tuple[str, int]:
        return parse_hostport(self.agent)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "op": self.op,
            "agent": self.agent,
            "psk_file": self.psk_file,
            "tls_dir": self.tls_dir,
            "tls_name": self.tls_name,
            "device": self.device,
            "mem_quota": self.mem_quota,
        }
        if self.max_inflight:  # the CLI has no flag for it: 0 is the server's default
            wire["max_inflight"] = self.max_inflight
        if self.op == "bind":
            wire["replace"] = self.replace
        if self.lease_token:
            wire["lease_token"] = self.lease_token
            wire["lease_live"] = list(self.lease_live)
        return wire

    @classmethod
    def from_wire(cls, req: dict[str, Any]) -> BindRequest:
        replace = req.get("replace", False)
        if not isinstance(replace, bool):
            raise ValueError(f"replace must be true or false, not {replace!r}")
        if "agent" not in req:
            raise ValueError(f"{cls.op} needs agent (HOST:PORT)")
        agent = str(req["agent"])
        parse_hostport(agent)  # checked first, as the server always did
        # Empty strings count as absent, as they always did on this socket;
        # a PSK file wins over a TLS folder.
        psk_file = str(req["psk_file"]) if req.get("psk_file") else None
        tls_dir = str(req["tls_dir"]) if req.get("tls_dir") and not psk_file else None
        if psk_file is None and tls_dir is None:
            raise ValueError(f"{cls.op} needs psk_file or tls_dir")
        lease_token = _whole(req, "lease_token")
        if not 0 <= lease_token < 1 << 64:
            raise ValueError(f"lease_token must be in 0..2**64-1, not {lease_token}")
        lease_live = _tokens(req.get("lease_live", []))
        if bool(lease_token) != bool(lease_live) or (lease_token and lease_token not in lease_live):
            raise ValueError(
                "lease_live (the device's live lease tokens) must come with lease_token and hold it"
            )
        return cls(
            agent=agent,
            psk_file=psk_file,
            tls_dir=tls_dir,
            tls_name=str(req.get("tls_name", "backend")),
            device=str(req.get("device", "")),
            mem_quota=_whole(req, "mem_quota"),
            max_inflight=_whole(req, "max_inflight"),
            replace=replace,
            lease_token=lease_token,
            lease_live=lease_live,
        )


@dataclass(frozen=True)
class MigrateRequest(BindRequest):
    """Move the bound GPU's state to the agent named (a bind's fields;
    ``replace`` does not apply): the guest keeps its handles and sees no error."""

    op: ClassVar[str] = "migrate"


Request = StatusRequest | UnbindRequest | BindRequest | MigrateRequest
OPS = ("status", "bind", "unbind", "migrate")


def parse_request(line: bytes | str) -> Request:
    """One request line (JSON) as a request; ValueError (json's own for bad
    JSON) with one line saying what is wrong."""
    req = json.loads(line)
    if not isinstance(req, dict):
        raise ValueError("request must be a JSON object")
    op = req.get("op")
    if op == "status":
        return StatusRequest()
    if op == "unbind":
        return UnbindRequest()
    if op == "bind":
        return BindRequest.from_wire(req)
    if op == "migrate":
        return MigrateRequest.from_wire(req)
    raise ValueError(f"unknown op {op!r} ({', '.join(OPS)})")


def _tokens(value: Any) -> tuple[int, ...]:
    """lease_live: a list of distinct tokens, sorted here (the wire wants them ascending)."""
    if not isinstance(value, list) or not all(type(t) is int and 0 < t < 1 << 64 for t in value):
        raise ValueError(f"lease_live must be a list of lease tokens (1..2**64-1), not {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"lease_live repeats a token: {value!r}")
    return tuple(sorted(value))


def _whole(req: dict[str, Any], key: str) -> int:
    value = req.get(key, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a whole number, not {value!r}") from None


@dataclass(frozen=True)
class StatusReply:
    """The device's status fields (binding, counters, contexts), as it gives them."""

    fields: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, **self.fields}


@dataclass(frozen=True)
class UnbindReply:
    was: str | None  # the binding it ended, None when there was none

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True, "was": self.was}


@dataclass(frozen=True)
class BindReply:
    bound: str
    replaced: str | None = None  # the binding a --replace ended

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"ok": True, "bound": self.bound}
        if self.replaced is not None:
            wire["replaced"] = self.replaced
        return wire


@dataclass(frozen=True)
class MigrateReply:
    """A migration's report (vpcie.gpu.migration_plan.MigrationReport.to_wire)."""

    fields: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {**self.fields, "ok": True}


@dataclass(frozen=True)
class Refusal:
    error: str  # one line

    def to_wire(self) -> dict[str, Any]:
        return {"ok": False, "error": self.error}


Reply = StatusReply | UnbindReply | BindReply | MigrateReply | Refusal
