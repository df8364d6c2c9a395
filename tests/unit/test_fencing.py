"""Lease fencing without an agent: the rule (host_agent/fencing.py, docs/SECURITY.md
"Lease fencing") and its file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.fencing import MAX_TOKEN, Fence, Fences, Verdict, load, malformed, save
from vpcie.protocol.codes import MAX_LIVE_LEASES

TOKENS = st.integers(0, MAX_TOKEN)


def test_the_rule() -> None:
    f = Fences()
    assert f.admit("cpu0", 0, ()).verdict is Verdict.ALLOWED  # manual bind, never leased
    assert f.get("cpu0") == 0
    assert f.admit("cpu0", 5, (5,)).verdict is Verdict.RAISED and f.get("cpu0") == 5
    assert f.admit("cpu0", 5, (5,)).verdict is Verdict.ALLOWED  # the same lease, another context
    stale = f.admit("cpu0", 4, (4,))
    assert stale.verdict is Verdict.STALE and f.get("cpu0") == 5
    assert stale.message == (
        "lease token 4 is older than 5, the newest for cpu0: the lease was given to someone else"
    )
    zero = f.admit("cpu0", 0, ())
    assert zero.verdict is Verdict.STALE and "leased through the pool" in zero.message
    assert f.admit("cpu0", 9, (9,)).verdict is Verdict.RAISED and f.get("cpu0") == 9
    assert f.admit("cpu0", 5, (5,)).verdict is Verdict.STALE
    assert f.admit("gpu1", 1, (1,)).verdict is Verdict.RAISED  # per device
    assert f.newest() == {"cpu0": 9, "gpu1": 1}
    assert f.to_json() == {"cpu0": {"newest": 9, "live": [9]}, "gpu1": {"newest": 1, "live": [1]}}


def test_leases_sharing_a_device() -> None:
    """A (5) and B (9, created while A was live) share the device by memory:
    B leaves A alone. C (12, created after A's release, B live) ends A only."""
    f = Fences()
    assert f.admit("gpu0", 5, (5,)).verdict is Verdict.RAISED
    assert f.admit("gpu0", 9, (5, 9)).verdict is Verdict.RAISED
    assert f.get("gpu0") == 9 and f.live("gpu0") == {5, 9}
    assert f.admit("gpu0", 5, (5,)).verdict is Verdict.ALLOWED  # A opens another context
    assert f.admit("gpu0", 4, (4,)).verdict is Verdict.STALE  # not live with 9
    assert f.admit("gpu0", 12, (9, 12)).verdict is Verdict.RAISED  # A released
    assert f.admit("gpu0", 5, (5,)).verdict is Verdict.STALE
    assert f.admit("gpu0", 9, (5, 9)).verdict is Verdict.ALLOWED  # B, still live


def test_the_gap_a_floor_left() -> None:
    """A (5) live; B (7) created, then released; C (9) created while A is live:
    C's live set is {5, 9}, so B is refused (and its sessions end) though a
    lease older than B's is still live. A floor (the smallest live token, 5)
    let B through."""
    f = Fences()
    assert f.admit("gpu0", 5, (5,)).verdict is Verdict.RAISED
    assert f.admit("gpu0", 7, (5, 7)).verdict is Verdict.RAISED
    assert f.admit("gpu0", 9, (5, 9)).verdict is Verdict.RAISED
    assert 7 not in f.live("gpu0") and 5 in f.live("gpu0")  # the server ends 7's sessions
    assert f.admit("gpu0", 7, (5, 7)).verdict is Verdict.STALE
    assert f.admit("gpu0", 5, (5,)).verdict is Verdict.ALLOWED


@pytest.mark.parametrize(
    ("token", "live", "why"),
    [
        (5, (6,), "lease token 5 is not in its live set"),
        (5, (), "lease token 5 is not in its live set"),
        (0, (3,), "a live set comes without a lease token"),
        (5, (5, 3), "lease live set is not in ascending order without repeats"),
        (5, (5, 5), "lease live set is not in ascending order without repeats"),
        (
            5,
            tuple(range(1, MAX_LIVE_LEASES + 2)),
            f"lease live set has {MAX_LIVE_LEASES + 1} tokens (the most is {MAX_LIVE_LEASES})",
        ),
    ],
)
def test_malformed_live_set(token: int, live: tuple[int, ...], why: str) -> None:
    f = Fences({"cpu0": Fence(4, frozenset({4}))})
    assert malformed(token, live) == why
    assert f.admit("cpu0", token, live) == (Verdict.MALFORMED, why)
    assert f.to_json() == {"cpu0": {"newest": 4, "live": [4]}}  # nothing moved
    assert malformed(5, tuple(range(1, MAX_LIVE_LEASES + 1))) == ""  # the most is fine


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 12), st.sets(st.integers(1, 12))),
        max_size=40,
    )
)
def test_decide_matches_admit_and_the_rule(opens: list[tuple[str, int, set[int]]]) -> None:
    f = Fences()
    for dev, tok, others in opens:
        live = tuple(sorted(others | {tok})) if tok else ()
        before = Fence(f.get(dev), f.live(dev))
        d = f.decide(dev, tok, live)
        assert f.admit(dev, tok, live) == d  # decide changes nothing, admit agrees with it
        after = Fence(f.get(dev), f.live(dev))
        allowed = d.verdict is not Verdict.STALE
        if tok == 0:
            assert allowed == (before.newest == 0)
        else:
            assert allowed == (tok >= before.newest or tok in before.live)
        assert (d.verdict is Verdict.RAISED) == (tok > before.newest)
        assert after == (Fence(tok, frozenset(live)) if tok > before.newest else before)


# One device through a model of the pool: ("reserve",), ("release", i), ("open", i)
# (a holder of lease i opens a session), ("manual", 0) (an open without a lease).
POOL_OPS = st.lists(
    st.one_of(
        st.just(("reserve", 0)),
        st.just(("manual", 0)),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("open"), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=400)
@given(POOL_OPS)
def test_with_the_pools_live_sets(ops: list[tuple[str, int]]) -> None:
    """Leases come and go on one device as the pool makes them: a token is
    the revision of the txn that creates the lease (every reserve and release
    is a txn), its live set the tokens of the leases live then, its own
    included. Any lease's holder (released or not: a partitioned backend does
    not know) opens sessions. A session is ended, or its OPEN refused, exactly
    when its lease was not live when the newest lease opened on the agent was
    created; so a live lease is never fenced."""
    f = Fences()
    revision = 0
    tokens: list[int] = []  # in creation order
    live: set[int] = set()
    live_at_creation: dict[int, frozenset[int]] = {}
    newest_opened = 0
    ended: dict[int, bool] = {}  # session id -> ended (fenced out or refused)
    session_token: dict[int, int] = {}

    def must_end(t: int) -> bool:  # from the pool's history alone
        return newest_opened > 0 and t not in live_at_creation[newest_opened]

    for op, i in ops:
        if op == "reserve":
            revision += 1
            live.add(revision)
            live_at_creation[revision] = frozenset(live)
            tokens.append(revision)
        elif op == "release" and tokens and tokens[i % len(tokens)] in live:
            revision += 1
            live.discard(tokens[i % len(tokens)])
        elif op in ("open", "manual") and (tokens or op == "manual"):
            token = tokens[i % len(tokens)] if op == "open" else 0
            offered = sorted(live_at_creation[token]) if token else []
            d = f.admit("gpu0", token, offered)
            assert d.verdict is not Verdict.MALFORMED  # the pool's sets are well formed
            sid = len(ended)
            session_token[sid] = token
            ended[sid] = d.verdict is Verdict.STALE
            if d.verdict is Verdict.STALE:
                continue
            newest_opened = max(newest_opened, token)
            if d.verdict is Verdict.RAISED:  # the server ends the sessions not in the set
                for s, t in session_token.items():
                    if t not in f.live("gpu0"):
                        ended[s] = True
        for s, gone in ended.items():
            t = session_token[s]
            assert gone == must_end(t), (s, t, tokens, live, newest_opened)
            if t in live:
                assert not gone  # a live lease is never fenced out


def test_file_round_trip_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "fences.json"
    assert load(path).to_json() == {}  # none yet
    f = Fences(
        {"GPU-1": Fence(MAX_TOKEN, frozenset({MAX_TOKEN})), "cpu0": Fence(3, frozenset({1, 3}))}
    )
    save(f, path)
    assert load(path).to_json() == f.to_json()
    assert json.loads(path.read_bytes())["cpu0"] == {"newest": 3, "live": [1, 3]}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not (tmp_path / "fences.json.tmp").exists()


def test_older_file_form_is_read(tmp_path: Path) -> None:
    """{device: token} (a fence file written before live sets): newest, live [token]."""
    path = tmp_path / "fences.json"
    path.write_text('{"cpu0": 7, "gpu1": 0}')
    f = load(path)
    assert f.get("cpu0") == 7 and f.live("cpu0") == {7} and f.get("gpu1") == 0
    assert f.admit("cpu0", 5, (5,)).verdict is Verdict.STALE
    assert f.admit("gpu1", 0, ()).verdict is Verdict.ALLOWED


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2]", "one JSON object"),
        ('{"cpu0": -1}', "is not {"),
        ('{"cpu0": 1.5}', "is not {"),
        ('{"cpu0": true}', "is not {"),
        ('{"cpu0": 18446744073709551616}', "is not {"),
        ('{"cpu0": {"newest": 3}}', "is not {"),
        ('{"cpu0": {"newest": true, "live": []}}', "is not {"),
        ('{"cpu0": {"newest": 3, "live": [-1, 3]}}', "is not {"),
        ('{"cpu0": {"newest": 3, "live": [1]}}', "lease token 3 is not in its live set"),
        ('{"cpu0": {"newest": 3, "live": [3, 1]}}', "ascending"),
        ("{", "fence file"),
        ("\udcff", "fence file"),  # the byte 0xff: not UTF-8
    ],
)
def test_malformed_file_one_line(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "fences.json"
    path.write_text(text, errors="surrogateescape")
    with pytest.raises(ValueError) as err:
        load(path)
    msg = str(err.value)
    assert why in msg and str(path) in msg and "\n" not in msg


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        load(tmp_path)  # a directory
    assert "cannot read fence file" in str(err.value)
    assert json.loads(json.dumps(Fences().to_json())) == {}
