"""Lease fencing: per device, the newest lease floor this agent has seen.

A pool lease carries a token (the store revision that created it, always
rising) and a floor: the smallest token among the device's leases that were
live when it was created, its own included (an exclusive lease's floor is
its token). A backend presents both in OPEN. The agent keeps, per device,
the highest floor seen (the fence) and refuses a token below it: every lease
older than a floor had been released before a newer lease was created, so
its holder (partitioned away, expired) can never open a session there again,
and the first OPEN carrying that floor ends the old holder's sessions. Leases
that share a device by memory have floors at or below each other's tokens,
so they never fence one another out. Expiry alone never keeps two tenants
apart (an etcd lease's TTL restarts on a leader change: etcd issues 9395,
13294); this rule does. docs/SECURITY.md "Lease fencing".

The floor is a lower bound, not the set of live leases: a lease released
while an older one on the same device is still live is fenced only once a
lease created after that older one's release is opened.

``Fences`` is sans-IO: the server (host_agent/server.py) asks ``admit`` and
acts on the verdict (terminate the fenced-out workers, persist).
``load``/``save`` are the file edge (``--fence-file``: JSON, atomic replace).
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import NamedTuple

from vpcie.fileerrors import os_error_line

MAX_TOKEN = (1 << 64) - 1  # OPEN's lease_token and lease_floor are u64


class Verdict(enum.Enum):
    ALLOWED = "allowed"  # token at or above the fence, or no pool lease on an unfenced device
    RAISED = "raised"  # a higher floor: the fence moved up; sessions below it must end
    STALE = "stale"  # refused (STALE_LEASE)
    MALFORMED = "malformed"  # refused (INVALID_ARGUMENT): not a token/floor pair a pool gives


class Decision(NamedTuple):
    verdict: Verdict
    message: str = ""  # why it was refused (one line), "" otherwise


def malformed(token: int, floor: int) -> str:
    """Why (token, floor) cannot come from a pool lease (one line), "" if it can."""
    if floor > token:
        return f"lease floor {floor} is above lease token {token}"
    if token and not floor:
        return f"lease token {token} comes without its lease floor"
    return ""


class Fences:
    """Per device id the highest lease floor seen (0: never leased through the pool)."""

    def __init__(self, tokens: dict[str, int] | None = None) -> None:
        self.tokens: dict[str, int] = dict(tokens or {})

    def get(self, device: str) -> int:
        return self.tokens.get(device, 0)

    def decide(self, device: str, token: int, floor: int) -> Decision:
        """The verdict for an OPEN of ``device`` under lease ``token`` whose
        floor is ``floor``; changes nothing."""
        bad = malformed(token, floor)
        if bad:
            return Decision(Verdict.MALFORMED, bad)
        fence = self.get(device)
        if token == 0:
            if fence == 0:
                return Decision(Verdict.ALLOWED)  # the manual `vpcie vgpu bind` path
            return Decision(
                Verdict.STALE, f"{device} is leased through the pool; open with its lease token"
            )
        if token < fence:
            return Decision(
                Verdict.STALE,
                f"lease token {token} is older than {fence}, the newest for {device}: "
                "the lease was given to someone else",
            )
        if floor > fence:
            return Decision(Verdict.RAISED)
        # The same lease (one session per guest context), or one that shares the
        # device with leases still live when it was created.
        return Decision(Verdict.ALLOWED)

    def admit(self, device: str, token: int, floor: int) -> Decision:
        """``decide``, and on RAISED move the fence up to ``floor``."""
        d = self.decide(device, token, floor)
        if d.verdict is Verdict.RAISED:
            self.tokens[device] = floor
        return d

    def to_json(self) -> dict[str, int]:
        return dict(sorted(self.tokens.items()))

    @classmethod
    def from_json(cls, data: object) -> Fences:
        """From a parsed fence file; ValueError (one line) when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("a fence file holds one JSON object {device: token}")
        tokens: dict[str, int] = {}
        for dev, tok in data.items():
            if not isinstance(dev, str) or type(tok) is not int or not 0 <= tok <= MAX_TOKEN:
                raise ValueError(f"fence {dev!r}: {tok!r} is not a token (0 .. 2^64-1)")
            tokens[dev] = tok
        return cls(tokens)


def load(path: Path) -> Fences:
    """The fences saved in ``path`` (none yet if it does not exist).
    ValueError with one line for an unreadable or malformed file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Fences()
    except OSError as exc:
        raise ValueError(os_error_line("read", f"fence file {path}", exc)) from None
    try:
        return Fences.from_json(json.loads(raw))  # UTF-8 (or -16/-32) JSON
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ValueError(f"fence file {path}: {exc}") from None


def save(fences: Fences, path: Path) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old
    or the new fences, never a torn file. OSError to the caller."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(fences.to_json()).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
