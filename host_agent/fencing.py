"""Lease fencing: per device, the newest pool lease this agent has seen and
the leases that were live when it was created.

A pool lease carries a token (the store revision that created it, always
rising) and its live set: the tokens of the device's leases that were live
when it was created, its own included (an exclusive lease's set is just its
token). A backend presents both in OPEN. The agent keeps, per device D,
``newest[D]`` (the highest token seen) and ``live[D]`` (the set that came
with it). OPEN (t, L):

- t == 0: allowed iff D was never leased through the pool (newest 0);
- t > newest: newest = t, live = L, and every session on D whose token is not
  in L ends (its lease was released before lease t was created);
- t == newest: the same lease, another guest context;
- t < newest: allowed iff t is in live (it shares D with the newest lease),
  else STALE_LEASE.

So a session is ended, or its OPEN refused, exactly when its lease was not
live when the newest lease opened on the agent was created: leases that share
a device by memory never fence each other out, and a lease released and
replaced while an older one stays live is fenced all the same. Expiry alone
never keeps two tenants apart (an etcd lease's TTL restarts on a leader
change: etcd issues 9395, 13294); this rule does. docs/SECURITY.md
"Lease fencing".

``Fences`` is sans-IO: the server (host_agent/server.py) asks ``admit`` and
acts on the verdict (terminate the fenced-out workers, persist).
``load``/``save`` are the file edge (``--fence-file``: JSON, atomic replace).
"""

from __future__ import annotations

import enum
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from vpcie.fileerrors import os_error_line
from vpcie.protocol.codes import MAX_LIVE_LEASES

MAX_TOKEN = (1 << 64) - 1  # OPEN's lease_token and each lease_live entry are u64


class Verdict(enum.Enum):
    ALLOWED = "allowed"  # the newest lease, one live with it, or no lease on an unleased D
    RAISED = "raised"  # a newer lease: sessions whose lease is not in its live set must end
    STALE = "stale"  # refused (STALE_LEASE)
    MALFORMED = "malformed"  # refused (INVALID_ARGUMENT): not a token/live set a pool gives


class Decision(NamedTuple):
    verdict: Verdict
    message: str = ""  # why it was refused (one line), "" otherwise


class Fence(NamedTuple):
    """One device's: the newest lease token seen and the leases live at its creation."""

    newest: int = 0
    live: frozenset[int] = frozenset()


def malformed(token: int, live: Sequence[int]) -> str:
    """Why (token, live) cannot come from a pool lease (one line), "" if it can."""
    if len(live) > MAX_LIVE_LEASES:
        return f"lease live set has {len(live)} tokens (the most is {MAX_LIVE_LEASES})"
    if any(a >= b for a, b in itertools.pairwise(live)):
        return "lease live set is not in ascending order without repeats"
    if token == 0:
        return "a live set comes without a lease token" if live else ""
    if token not in live:
        return f"lease token {token} is not in its live set"
    return ""


class Fences:
    """Per device id its Fence (absent: never leased through the pool)."""

    def __init__(self, fences: dict[str, Fence] | None = None) -> None:
        self.fences: dict[str, Fence] = dict(fences or {})

    def get(self, device: str) -> int:
        """The newest lease token seen for ``device`` (0: none)."""
        return self.fences.get(device, Fence()).newest

    def live(self, device: str) -> frozenset[int]:
        """The tokens live when ``device``'s newest lease was created."""
        return self.fences.get(device, Fence()).live

    def decide(self, device: str, token: int, live: Sequence[int]) -> Decision:
        """The verdict for an OPEN of ``device`` under lease ``token`` whose
        live set is ``live``; changes nothing."""
        bad = malformed(token, live)
        if bad:
            return Decision(Verdict.MALFORMED, bad)
        fence = self.fences.get(device, Fence())
        if token == 0:
            if fence.newest == 0:
                return Decision(Verdict.ALLOWED)  # the manual `vpcie vgpu bind` path
            return Decision(
                Verdict.STALE, f"{device} is leased through the pool; open with its lease token"
            )
        if token > fence.newest:
            return Decision(Verdict.RAISED)
        # The same lease (one session per guest context), or one that shares the
        # device with the newest lease (live when that was created).
        if token == fence.newest or token in fence.live:
            return Decision(Verdict.ALLOWED)
        return Decision(
            Verdict.STALE,
            f"lease token {token} is older than {fence.newest}, the newest for {device}: "
            "the lease was given to someone else",
        )

    def admit(self, device: str, token: int, live: Sequence[int]) -> Decision:
        """``decide``, and on RAISED make (token, live) the device's fence."""
        d = self.decide(device, token, live)
        if d.verdict is Verdict.RAISED:
            self.fences[device] = Fence(token, frozenset(live))
        return d

    def newest(self) -> dict[str, int]:
        """{device: newest token} (INVENTORY's "fences")."""
        return {dev: f.newest for dev, f in sorted(self.fences.items())}

    def to_json(self) -> dict[str, dict[str, object]]:
        return {
            dev: {"newest": f.newest, "live": sorted(f.live)}
            for dev, f in sorted(self.fences.items())
        }

    @classmethod
    def from_json(cls, data: object) -> Fences:
        """From a parsed fence file; ValueError (one line) when it is not one.
        Also reads the older {device: token} form (live: just that token)."""
        if not isinstance(data, dict):
            raise ValueError('a fence file holds one JSON object {device: {"newest", "live"}}')
        fences: dict[str, Fence] = {}
        for dev, entry in data.items():
            if not isinstance(dev, str):
                raise ValueError(f"fence {dev!r}: not a device id")
            if _is_token(entry):
                fences[dev] = Fence(entry, frozenset([entry] if entry else []))
                continue
            newest = entry.get("newest") if isinstance(entry, dict) else None
            live = entry.get("live") if isinstance(entry, dict) else None
            if (
                type(newest) is not int
                or not _is_token(newest)
                or not isinstance(live, list)
                or not all(map(_is_token, live))
            ):
                raise ValueError(
                    f'fence {dev!r}: {entry!r} is not {{"newest": token, "live": [token, ...]}}'
                    " (tokens 0 .. 2^64-1)"
                )
            bad = malformed(newest, live)
            if bad:
                raise ValueError(f"fence {dev!r}: {bad}")
            fences[dev] = Fence(newest, frozenset(live))
        return cls(fences)


def _is_token(x: object) -> bool:
    return type(x) is int and 0 <= x <= MAX_TOKEN


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
