"""The liveness rule (vpcie/tunnel/liveness.py), its TCP_INFO reader, and the
lane's C copy of both (lane.c vl_live_step / vl_tcp_snapshot) held to them."""

from __future__ import annotations

import random
import socket
import time

import pytest

from vpcie._native import native_available
from vpcie.tunnel import tcpinfo
from vpcie.tunnel.liveness import (
    ACK_ALLOWANCE,
    PING_INTERVAL_NS,
    Liveness,
    LivenessConfig,
    TcpSnapshot,
    Verdict,
    lost_reason,
)

TICK = PING_INTERVAL_NS
CFG = LivenessConfig()
needs_native = pytest.mark.skipif(not native_available(), reason="native module not built")


def run(snaps: list[TcpSnapshot], cfg: LivenessConfig = CFG) -> list[tuple[int, Verdict]]:
    """Feed one snapshot per tick from t=0; (tick time, verdict) of each step."""
    live = Liveness(cfg, 0, snaps[0])
    return [(i * TICK, live.step(i * TICK, s)) for i, s in enumerate(snaps[1:], 1)]


def first_loss(snaps: list[TcpSnapshot], cfg: LivenessConfig = CFG) -> tuple[float, Verdict]:
    for t, v in run(snaps, cfg):
        if v is not Verdict.ALIVE:
            return t / 1e9, v
    return float("inf"), Verdict.ALIVE


def pings_acked(n: int, **kw: int) -> list[TcpSnapshot]:
    """n ticks in which only our pings (32 bytes) are acked, nothing arrives."""
    return [TcpSnapshot(acked=32 * i, **kw) for i in range(n)]


def test_silence_on_a_healthy_link_is_a_hung_agent_after_hang_after() -> None:
    t, v = first_loss(pings_acked(40))
    assert v is Verdict.HUNG and t == 1.25  # the first tick past 1.0 s


def test_pings_alone_acked_are_not_life_but_data_taken_is() -> None:
    assert first_loss(pings_acked(40))[1] is Verdict.HUNG
    upload = [TcpSnapshot(acked=(ACK_ALLOWANCE + 1) * i) for i in range(40)]
    assert first_loss(upload) == (float("inf"), Verdict.ALIVE)
    download = [TcpSnapshot(rx=i) for i in range(40)]
    assert first_loss(download) == (float("inf"), Verdict.ALIVE)


@pytest.mark.parametrize(
    "trouble",
    [
        {"retransmits": 1},  # an RTO backoff in progress
        {"total_retrans": 1},  # a retransmission since the last life
        {"ooo": 3},  # PONGs arriving behind a hole
    ],
)
def test_silence_with_trouble_waits_for_unreachable_after(trouble: dict[str, int]) -> None:
    snaps = pings_acked(40)
    snaps[2] = snaps[2]._replace(**trouble)
    for i in range(3, 40):  # counters stay where they got to
        snaps[i] = snaps[i]._replace(**{k: v for k, v in trouble.items() if k != "retransmits"})
    t, v = first_loss(snaps)
    assert v is Verdict.SILENT and t == 4.25


def test_no_ack_for_unreachable_after_is_unreachable() -> None:
    # A partition: the ping stays unacknowledged and the kernel retransmits it.
    snaps = [TcpSnapshot()] + [
        TcpSnapshot(unacked=1, last_ack_ms=250 * i, retransmits=1 if i > 1 else 0)
        for i in range(1, 40)
    ]
    t, v = first_loss(snaps)
    assert v is Verdict.UNREACHABLE and t == 4.25
    assert lost_reason(v, "h:1", 0, 4250) == "no ACK from agent h:1's host for 4.25 s"


def test_long_unacked_bytes_are_trouble_even_before_a_retransmission() -> None:
    snaps = [TcpSnapshot(unacked=1, last_ack_ms=250 * i) for i in range(40)]
    assert first_loss(snaps)[1] is Verdict.UNREACHABLE  # never HUNG at 1 s


def test_no_ack_while_we_sent_nothing_is_not_unreachable() -> None:
    """Our loop stalled 4.2 s with nothing to send; the segment it sent just
    before this tick is outstanding and the last ACK is 4.2 s old. It has not
    waited: not lost (seen in the four-copier test under CPU load)."""
    live = Liveness(CFG, 0, TcpSnapshot())
    for i in range(1, 5):
        assert live.step(i * TICK, TcpSnapshot(acked=32 * i)) is Verdict.ALIVE
    late = 5 * TICK + 4_200_000_000
    assert live.step(late, TcpSnapshot(acked=128, unacked=1, last_ack_ms=4204)) is Verdict.ALIVE
    then = TcpSnapshot(acked=128, unacked=1, last_ack_ms=4454)
    assert live.step(late + TICK, then) is Verdict.ALIVE  # waited one tick, not 4.45 s


def test_life_dates_from_the_kernel_timestamps() -> None:
    """A PONG that arrived 200 ms before the tick that saw it: silence is
    counted from its arrival, so the verdicts keep their times exactly."""
    live = Liveness(CFG, 0, TcpSnapshot())
    assert live.step(TICK, TcpSnapshot(rx=32, last_rx_ms=200)) is Verdict.ALIVE
    assert live.last_life == TICK - 200_000_000
    both = TcpSnapshot(rx=64, acked=5000, last_ack_ms=10, last_rx_ms=100)
    assert live.step(2 * TICK, both) is Verdict.ALIVE
    assert live.last_life == 2 * TICK - 10_000_000  # the later of the two
    old = TcpSnapshot(rx=96, acked=5000, last_rx_ms=900)
    assert live.step(2 * TICK + 1, old) is Verdict.ALIVE
    assert live.last_life == 2 * TICK - 10_000_000  # never earlier than it was


def test_a_closed_window_is_hung_only_once_an_ack_confirms_it() -> None:
    """Our upload waits on the agent's zero window. Its window update may have
    been lost (5 % loss): no ACK since -> not hung, however long (until
    unreachable_after). An ACK 1.1 s into the silence that still shows the
    window closed -> hung (seen in the 5 % loss soak, and SIGSTOP mid-upload)."""
    live = Liveness(CFG, 0, TcpSnapshot())
    up = TcpSnapshot(acked=10**6, notsent=10**6, snd_wnd=0)  # the last data taken at t=0.25
    assert live.step(TICK, up) is Verdict.ALIVE
    t = TICK
    for _ in range(16):  # no ACK since: 4.0 s of silence, never hung
        t += TICK
        assert live.step(t, up._replace(last_ack_ms=(t - TICK) // 10**6)) is Verdict.ALIVE
    assert live.step(t + TICK, up._replace(last_ack_ms=(t - TICK) // 10**6)) is Verdict.SILENT
    live = Liveness(CFG, 0, TcpSnapshot())
    assert live.step(TICK, up) is Verdict.ALIVE
    for i in range(2, 7):  # probes answered at 0.9 s (0.65 s into the silence)
        ack_at = TICK if i < 4 else 900_000_000
        assert live.step(i * TICK, up._replace(last_ack_ms=(i * TICK - ack_at) // 10**6)) == 0
    # a probe answered at 1.45 s, 1.2 s into the silence: the window is still closed
    assert live.step(7 * TICK, up._replace(last_ack_ms=300)) is Verdict.HUNG


def test_a_late_tick_counts_as_life() -> None:
    """Our own process did not run: the silence may be ours, not the agent's."""
    live = Liveness(CFG, 0, TcpSnapshot())
    assert live.step(900_000_000, TcpSnapshot()) is Verdict.ALIVE
    assert live.step(1_150_000_000, TcpSnapshot()) is Verdict.ALIVE  # 0.25 s after life
    assert live.silent_ns(1_150_000_000) == 250_000_000


def test_knobs_move_the_verdicts_and_are_checked() -> None:
    cfg = LivenessConfig.from_seconds(2.0, 6.0)
    assert first_loss(pings_acked(60), cfg) == (2.25, Verdict.HUNG)
    snaps = pings_acked(60)
    snaps[1] = snaps[1]._replace(total_retrans=1)
    for i in range(2, 60):
        snaps[i] = snaps[i]._replace(total_retrans=1)
    assert first_loss(snaps, cfg) == (6.25, Verdict.SILENT)
    assert cfg.user_timeout_ms == 7000
    with pytest.raises(ValueError, match="at least"):
        LivenessConfig.from_seconds(0.1, 4)
    with pytest.raises(ValueError, match="at least the hang"):
        LivenessConfig.from_seconds(2, 1)


def test_reasons_name_the_case() -> None:
    assert "host answers but the agent is silent for 1.25 s" in lost_reason(
        Verdict.HUNG, "h:1", 1_250_000_000, 0
    )
    assert "troubled link" in lost_reason(Verdict.SILENT, "", 4_250_000_000, 0)


# -- TCP_INFO ------------------------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
    return c, a


def recv_exactly(s: socket.socket, n: int) -> None:
    while n:
        n -= len(s.recv(min(n, 1 << 16)))


def test_tcp_info_reads_a_real_socket() -> None:
    c, a = tcp_pair()
    try:
        c.sendall(b"x" * 100_000)
        recv_exactly(a, 100_000)
        a.sendall(b"y" * 777)
        recv_exactly(c, 777)
        deadline = time.monotonic() + 5
        while (snap := tcpinfo.snapshot(c)) is not None and snap.acked != 100_001:
            assert time.monotonic() < deadline, snap  # the ACK is on its way
            time.sleep(0.001)
        assert snap is not None
        assert (snap.rx, snap.acked, snap.unacked) == (777, 100_001, 0)  # +1: the SYN
        assert (snap.retransmits, snap.total_retrans, snap.ooo) == (0, 0, 0)
        assert 0 <= snap.last_ack_ms < 5000
        assert tcpinfo.parse(b"") == TcpSnapshot()  # a short struct reads 0
        with socket.socket(socket.AF_UNIX) as u:
            assert tcpinfo.snapshot(u) is None
        assert tcpinfo.set_user_timeout(c, 5000)
        assert c.getsockopt(socket.IPPROTO_TCP, tcpinfo.TCP_USER_TIMEOUT) == 5000
    finally:
        c.close()
        a.close()


@needs_native
def test_tcp_info_layout_is_the_kernel_header() -> None:
    from vpcie._native import native

    ffi, _lib = native()
    for _name, (field, off, fmt) in tcpinfo.FIELDS.items():
        assert ffi.offsetof("struct tcp_info", field) == off, field
        assert ffi.sizeof(ffi.typeof("struct tcp_info").fields[0][1].type) >= 1
        size = {"B": 1, "I": 4, "Q": 8}[fmt]
        ftype = dict(ffi.typeof("struct tcp_info").fields)[field].type
        assert ffi.sizeof(ftype) == size, field


@needs_native
def test_c_snapshot_equals_python_on_a_real_socket() -> None:
    from vpcie._native import native

    ffi, lib = native()
    c, a = tcp_pair()
    try:
        c.sendall(b"x" * 5000)
        recv_exactly(a, 5000)
        a.sendall(b"y" * 300)
        recv_exactly(c, 300)
        out = ffi.new("struct vl_tcpsnap *")
        for _ in range(100):  # idle now; last_ack_ms may tick between the two reads
            py = tcpinfo.snapshot(c)
            assert lib.vl_tcp_snapshot(c.fileno(), out) == 0 and py is not None
            cs = TcpSnapshot(
                out.rx, out.acked, out.unacked, out.last_ack_ms, out.last_rx_ms,
                out.retransmits, out.total_retrans, out.ooo, out.notsent, out.snd_wnd,
            )  # fmt: skip
            if cs == py:
                break
        assert cs == py
        with socket.socket(socket.AF_UNIX) as u:
            assert lib.vl_tcp_snapshot(u.fileno(), out) == -1
    finally:
        c.close()
        a.close()


# -- C and Python: the same rule -------------------------------------------------------


def random_run(rng: random.Random, n: int) -> tuple[list[int], list[TcpSnapshot]]:
    """Tick times (sometimes late) and snapshots with every counter moving at
    random: growth by a little or a lot, standing still, starting anew; in a
    quiet run (a third), nothing but pings for stretches (so HUNG comes too)."""
    times, snaps, t = [], [], 0
    s = TcpSnapshot()
    quiet = rng.random() < 0.33
    for _ in range(n):
        if quiet and rng.random() < 0.9:
            t += TICK
            s = s._replace(acked=s.acked + 32, retransmits=0, unacked=0)
            times.append(t)
            snaps.append(s)
            continue
        t += rng.choice([TICK, TICK, TICK, TICK + rng.randrange(0, 10**9), 1])
        s = TcpSnapshot(
            rx=s.rx + rng.choice([0, 0, 0, 1, 30_000]),
            acked=rng.choice([s.acked, s.acked + 32, s.acked + ACK_ALLOWANCE,
                              s.acked + ACK_ALLOWANCE + 1, 0]),
            unacked=rng.choice([0, 0, 1, 7]),
            last_ack_ms=rng.choice([0, 10, 999, 1000, 1001, 3999, 4000, 4001, 2**32 - 1]),
            retransmits=rng.choice([0, 0, 0, 1, 255]),
            total_retrans=s.total_retrans + rng.choice([0, 0, 0, 1]),
            ooo=s.ooo + rng.choice([0, 0, 0, 0, 2]),
            last_rx_ms=rng.choice([0, 5, 240, 2**32 - 1]),
            notsent=rng.choice([0, 0, 1, 70_000]),
            snd_wnd=rng.choice([0, 0, 65_535]),
        )  # fmt: skip
        times.append(t)
        snaps.append(s)
    return times, snaps


@needs_native
def test_c_rule_equals_python_rule() -> None:
    from vpcie._native import native
    from vpcie.gpu.native_lane import live_cfg

    ffi, lib = native()
    rng = random.Random(11)
    csnap = ffi.new("struct vl_tcpsnap *")
    cst = ffi.new("struct vl_live *")

    def fill(s: TcpSnapshot) -> None:
        csnap.rx, csnap.acked, csnap.unacked = s.rx, s.acked, s.unacked
        csnap.last_ack_ms, csnap.retransmits = s.last_ack_ms, s.retransmits
        csnap.total_retrans, csnap.ooo, csnap.last_rx_ms = s.total_retrans, s.ooo, s.last_rx_ms
        csnap.notsent, csnap.snd_wnd = s.notsent, s.snd_wnd

    seen = set()
    for run_i in range(400):
        cfg = rng.choice([CFG, LivenessConfig.from_seconds(0.5, 0.5),
                          LivenessConfig.from_seconds(2, 9)])  # fmt: skip
        ccfg = live_cfg(ffi, cfg)
        times, snaps = random_run(rng, 60)
        live = Liveness(cfg, 0, TcpSnapshot())
        fill(TcpSnapshot())
        lib.vl_live_init(cst, 0, csnap)
        for t, s in zip(times, snaps, strict=True):
            want = live.step(t, s)
            fill(s)
            got = lib.vl_live_step(ccfg, cst, t, csnap)
            assert got == want, (run_i, t, s)
            assert (cst.last_life, cst.last_tick, cst.stuck_since, bool(cst.trouble)) == (
                live.last_life,
                live.last_tick,
                live.stuck_since,
                live.trouble,
            ), (run_i, t, s)
            seen.add(want)
    assert seen == set(Verdict)  # every verdict was compared


# -- the knobs: backend options -> binding target -> session ------------------------


def test_backend_options_make_the_config() -> None:
    from vpcie.backend_main import parse_args

    args = parse_args(["-s", "/x.sock"])
    assert args.liveness == LivenessConfig()
    args = parse_args(
        ["-s", "/x.sock", "--agent-hang-timeout", "2", "--agent-unreachable-timeout", "9.5"]
    )
    assert args.liveness == LivenessConfig(2_000_000_000, 9_500_000_000)
    bad_values = [
        ["--agent-hang-timeout", "0.1"],
        ["--agent-unreachable-timeout", "0.5"],
        ["--agent-hang-timeout", "nan"],
        ["--agent-unreachable-timeout", "inf"],
    ]
    for bad in bad_values:
        with pytest.raises(SystemExit) as e:
            parse_args(["-s", "/x.sock", *bad])
        assert e.value.code == 2


async def test_binding_gives_its_sessions_the_config(tmp_path: object) -> None:
    from pathlib import Path

    from vpcie.gpu.binding import AgentTarget, Binding, tunnel_session
    from vpcie.tunnel.local_agent import LocalAgent

    cfg = LivenessConfig.from_seconds(2, 6)
    binding = Binding(liveness=cfg)
    own = LivenessConfig.from_seconds(3, 3)
    binding.bind(AgentTarget("h", 1, psk=b"k", liveness=own))
    assert binding.target is not None and binding.target.liveness is own  # its own wins
    with LocalAgent(Path(str(tmp_path))) as agent:
        binding.bind(AgentTarget(agent.host, agent.port, psk=agent.psk))
        assert binding.target is not None
        session = await tunnel_session(binding.target, "knobs")
        try:
            assert getattr(session, "liveness", None) == cfg
            sock = session._transport.get_extra_info("socket")  # type: ignore[attr-defined]
            assert sock.getsockopt(socket.IPPROTO_TCP, tcpinfo.TCP_USER_TIMEOUT) == 7000
        finally:
            await session.close()
