"""Is the agent still there? The liveness rule, sans-IO (docs/PROTOCOL.md "Liveness").

``Liveness.step(now_ns, snapshot)`` is fed every tick (PING_INTERVAL) with a
monotonic time and a ``TcpSnapshot`` (what the kernel knows about the
connection, vpcie.tunnel.tcpinfo) and answers with a ``Verdict``. The client
(TunnelClient._tick) and the lane (lane.c vl_live_step) run this same rule with
the same constants: the lane gets ``LivenessConfig`` from Python when a session
is lent to it, and tests/unit/test_liveness.py holds the two to each other on
the same inputs.

Why kernel counters and not only PONGs: the agent's PONG waits behind bulk data
on the same connection (ours behind our upload, its behind its download), and
TCP's retransmission backoff alone (200, 400, 800 ms ...) passes 1 s at a few
percent of loss. What the kernel counts does not wait:
- life: bytes arrived from the agent (``rx``), or our bytes acknowledged beyond
  what the pings alone would be (``acked``): its application is draining its
  socket (a stopped one lets its receive window fill, and ``acked`` stalls);
- trouble on the link: retransmissions on our side, packets from the agent
  arriving out of order (a hole in the receive direction: a healthy agent's
  PONGs wait behind a lost segment), or our bytes unacknowledged for longer
  than ``hang_after``, seen while silent. Silence with trouble is the
  network's, not the agent's (trouble seen together with life is not counted).

Verdicts: HUNG after ``hang_after`` of silence with no trouble (its host acks
us, its application says nothing; with our data waiting on its closed receive
window, once an ACK has confirmed the window still closed that late);
UNREACHABLE when our bytes have waited ``unreachable_after`` for an ACK; SILENT
after ``unreachable_after`` of silence (with trouble, or a closed window never
confirmed). A killed agent needs none of this: its kernel's FIN/RST ends the
connection at once (EOF/reset in the client and the lane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

PING_INTERVAL_NS = 250_000_000  # the client's and the lane's tick
HANG_AFTER_NS = 1_000_000_000  # silence with a healthy link -> HUNG
UNREACHABLE_AFTER_NS = 4_000_000_000  # no ACK, or silence with trouble -> lost
# Our bytes acknowledged in one tick that are only keepalive: a PING frame is 32
# bytes (~60 under TLS), a PONG as much; more acknowledged means the agent's
# application is taking real data.
ACK_ALLOWANCE = 1024
# TCP_USER_TIMEOUT beyond unreachable_after: the kernel's own backstop (a
# stalled event loop still gets ETIMEDOUT) that leaves the rule the first word.
USER_TIMEOUT_MARGIN_NS = 1_000_000_000


class Verdict(IntEnum):
    ALIVE = 0
    HUNG = 1  # host answers, application silent for hang_after
    UNREACHABLE = 2  # bytes outstanding, no ACK for unreachable_after
    SILENT = 3  # silent for unreachable_after on a link in trouble


class TcpSnapshot(NamedTuple):
    """The counters of one connection the rule reads (struct tcp_info names)."""

    rx: int = 0  # tcpi_bytes_received: in-order bytes from the agent
    acked: int = 0  # tcpi_bytes_acked: our bytes the agent's host acknowledged
    unacked: int = 0  # tcpi_unacked: segments in flight
    last_ack_ms: int = 0  # tcpi_last_ack_recv: ms since the last ACK
    last_rx_ms: int = 0  # tcpi_last_data_recv: ms since the last data arrived
    retransmits: int = 0  # tcpi_retransmits: consecutive timeouts now
    total_retrans: int = 0  # tcpi_total_retrans
    ooo: int = 0  # tcpi_rcv_ooopack: out-of-order packets received
    notsent: int = 0  # tcpi_notsent_bytes: our bytes queued, not sent yet
    snd_wnd: int = 0  # tcpi_snd_wnd: the window the agent's host last advertised


@dataclass(frozen=True)
class LivenessConfig:
    """The knobs (vpcie-backend --agent-hang-timeout / --agent-unreachable-timeout)."""

    hang_after_ns: int = HANG_AFTER_NS
    unreachable_after_ns: int = UNREACHABLE_AFTER_NS
    ack_allowance: int = ACK_ALLOWANCE

    def __post_init__(self) -> None:
        if self.hang_after_ns < 2 * PING_INTERVAL_NS:
            raise ValueError(f"hang timeout must be at least {2 * PING_INTERVAL_NS / 1e9} s")
        if self.unreachable_after_ns < self.hang_after_ns:
            raise ValueError("unreachable timeout must be at least the hang timeout")
        if self.unreachable_after_ns > 3_600_000_000_000:
            raise ValueError("unreachable timeout must be at most 3600 s")

    @classmethod
    def from_seconds(cls, hang: float, unreachable: float) -> LivenessConfig:
        if not (math.isfinite(hang) and math.isfinite(unreachable)):
            raise ValueError("timeouts must be finite numbers of seconds")
        return cls(round(hang * 1e9), round(unreachable * 1e9))

    @property
    def stall_ns(self) -> int:
        """A tick this late means we were not running: the silence may be ours."""
        return self.hang_after_ns // 2

    @property
    def user_timeout_ms(self) -> int:
        return (self.unreachable_after_ns + USER_TIMEOUT_MARGIN_NS) // 1_000_000


class Liveness:
    """The rule's state for one connection (lane.c struct vl_live mirrors it)."""

    __slots__ = (
        "acked", "cfg", "last_life", "last_tick", "ooo", "retrans", "rx", "stuck_since", "trouble",
    )  # fmt: skip

    def __init__(self, cfg: LivenessConfig, now_ns: int, snap: TcpSnapshot) -> None:
        self.cfg = cfg
        self.last_tick = self.last_life = self.stuck_since = now_ns
        self.trouble = False
        self.rx, self.acked = snap.rx, snap.acked
        self.retrans, self.ooo = snap.total_retrans, snap.ooo

    def silent_ns(self, now_ns: int) -> int:
        return now_ns - self.last_life

    def step(self, now_ns: int, snap: TcpSnapshot) -> Verdict:
        cfg = self.cfg
        late = now_ns - self.last_tick > cfg.stall_ns
        self.last_tick = now_ns
        # Counters are compared for change, not growth: a snapshot from a new
        # socket after a take-back starts them anew.
        # When the life happened, from the kernel's timestamps (a tick sees it
        # up to PING_INTERVAL late): the verdicts then keep their times exactly.
        seen = []
        if snap.rx != self.rx:
            seen.append(now_ns - snap.last_rx_ms * 1_000_000)
        if snap.acked - self.acked > cfg.ack_allowance:
            seen.append(now_ns - snap.last_ack_ms * 1_000_000)
        if late:
            seen.append(now_ns)
        life = bool(seen)
        # How long our bytes have waited with no ACK moving them, as we saw it:
        # tcpi_last_ack_recv alone also grows while nothing is sent (our own
        # loop stalled), and a segment sent just now is not one that waited.
        if late or snap.unacked == 0 or snap.acked != self.acked:
            self.stuck_since = now_ns
        waited = now_ns - self.stuck_since
        trouble = (
            snap.retransmits > 0
            or snap.total_retrans != self.retrans
            or snap.ooo != self.ooo
            or waited > cfg.hang_after_ns
        )
        self.rx, self.acked = snap.rx, snap.acked
        self.retrans, self.ooo = snap.total_retrans, snap.ooo
        if life:
            # Trouble seen with life is the link's normal weather (a loss the
            # kernel repaired, a retransmission as the agent's window closed).
            self.last_life = max(self.last_life, *seen)
            self.trouble = False
        else:
            self.trouble = self.trouble or trouble  # sticky until the next sign of life
        if (
            waited > cfg.unreachable_after_ns
            and snap.last_ack_ms * 1_000_000 > cfg.unreachable_after_ns
        ):
            return Verdict.UNREACHABLE
        silent = now_ns - self.last_life
        if silent > cfg.unreachable_after_ns:
            return Verdict.SILENT
        # Our bytes wait on a closed window: the agent is not reading, or the
        # ACK that reopened its window was lost (the kernel's zero-window
        # probes will learn it, with backoff). Hung only once an ACK from its
        # host has confirmed the closed window hang_after into the silence.
        if snap.notsent > 0 and snap.snd_wnd == 0:
            silent = now_ns - snap.last_ack_ms * 1_000_000 - self.last_life
        if silent > cfg.hang_after_ns and not self.trouble:
            return Verdict.HUNG
        return Verdict.ALIVE


def lost_reason(verdict: Verdict, endpoint: str, silent_ns: int, last_ack_ms: int) -> str:
    """The one line a lost session carries (DEVICE_LOST message, logs)."""
    who = f"agent {endpoint}" if endpoint else "agent"
    if verdict is Verdict.HUNG:
        return f"{who}'s host answers but the agent is silent for {silent_ns / 1e9:.2f} s"
    if verdict is Verdict.UNREACHABLE:
        return f"no ACK from {who}'s host for {last_ack_ms / 1e3:.2f} s"
    return (
        f"{who} silent for {silent_ns / 1e9:.2f} s on a troubled link"
        " (retransmissions or out-of-order arrivals)"
    )
