"""Lease fencing: per device, the newest pool lease token this agent has seen.

A pool lease carries a token (the store revision that created it, always
rising); a backend presents it in OPEN. The agent keeps, per device, the
highest token seen, and refuses an older one: a backend that lost its lease
(partitioned away, expired) and whose device was leased again to someone
else can never open a session there again, and the new holder's first OPEN
ends the old holder's sessions. Expiry alone never keeps two tenants apart
(an etcd lease's TTL restarts on a leader change: etcd issues 9395, 13294);
this rule does. docs/SECURITY.md "Lease fencing".

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

MAX_TOKEN = (1 << 64) - 1  # OPEN's lease_token is a u64


class Verdict(enum.Enum):
    ALLOWED = "allowed"  # token equals the fence, or no pool lease on an unfenced device
    RAISED = "raised"  # a newer token: the fence moved up; older sessions must end
    STALE = "stale"  # refused (STALE_LEASE)


class Decision(NamedTuple):
    verdict: Verdict
    message: str = ""  # why it was refused (one line), "" otherwise


class Fences:
    """Per device id the highest lease token seen (0: never leased through the pool)."""

    def __init__(self, tokens: dict[str, int] | None = None) -> None:
        self.tokens: dict[str, int] = dict(tokens or {})

    def get(self, device: str) -> int:
        return self.tokens.get(device, 0)

    def decide(self, device: str, token: int) -> Decision:
        """The verdict for an OPEN of ``device`` with ``token``; changes nothing."""
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
        if token > fence:
            return Decision(Verdict.RAISED)
        return Decision(Verdict.ALLOWED)  # the same lease: one session per guest context

    def admit(self, device: str, token: int) -> Decision:
        """``decide``, and on RAISED move the fence up to ``token``."""
        d = self.decide(device, token)
        if d.verdict is Verdict.RAISED:
            self.tokens[device] = token
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
