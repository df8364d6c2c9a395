"""Lease fencing without an agent: the rule (host_agent/fencing.py, docs/SECURITY.md
"Lease fencing") and its file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.fencing import MAX_TOKEN, Fences, Verdict, load, malformed, save

TOKENS = st.integers(0, MAX_TOKEN)


def test_the_rule() -> None:
    f = Fences()
    assert f.admit("cpu0", 0, 0).verdict is Verdict.ALLOWED  # manual bind, never leased
    assert f.get("cpu0") == 0
    assert f.admit("cpu0", 5, 5).verdict is Verdict.RAISED and f.get("cpu0") == 5
    assert f.admit("cpu0", 5, 5).verdict is Verdict.ALLOWED  # the same lease, another context
    stale = f.admit("cpu0", 4, 4)
    assert stale.verdict is Verdict.STALE and f.get("cpu0") == 5
    assert stale.message == (
        "lease token 4 is older than 5, the newest for cpu0: the lease was given to someone else"
    )
    zero = f.admit("cpu0", 0, 0)
    assert zero.verdict is Verdict.STALE and "leased through the pool" in zero.message
    assert f.admit("cpu0", 9, 9).verdict is Verdict.RAISED and f.get("cpu0") == 9
    assert f.admit("cpu0", 5, 5).verdict is Verdict.STALE
    assert f.admit("gpu1", 1, 1).verdict is Verdict.RAISED  # per device
    assert f.to_json() == {"cpu0": 9, "gpu1": 1}


def test_leases_sharing_a_device() -> None:
    """A (5) and B (9, created while A was live: floor 5) share the device by
    memory: B leaves A alone. C (12), created after both were released, ends both."""
    f = Fences()
    assert f.admit("gpu0", 5, 5).verdict is Verdict.RAISED
    assert f.admit("gpu0", 9, 5).verdict is Verdict.ALLOWED and f.get("gpu0") == 5
    assert f.admit("gpu0", 5, 5).verdict is Verdict.ALLOWED  # A opens another context
    assert f.admit("gpu0", 7, 5).verdict is Verdict.ALLOWED  # a third sharer
    assert f.admit("gpu0", 4, 4).verdict is Verdict.STALE  # below the fence all the same
    assert f.admit("gpu0", 12, 9).verdict is Verdict.RAISED and f.get("gpu0") == 9  # A released
    assert f.admit("gpu0", 5, 5).verdict is Verdict.STALE
    assert f.admit("gpu0", 9, 5).verdict is Verdict.ALLOWED  # B, still live
    assert f.admit("gpu0", 14, 14).verdict is Verdict.RAISED and f.get("gpu0") == 14
    assert f.admit("gpu0", 12, 9).verdict is Verdict.STALE


@pytest.mark.parametrize(
    ("token", "floor", "why"),
    [
        (5, 6, "lease floor 6 is above lease token 5"),
        (0, 3, "lease floor 3 is above lease token 0"),
        (5, 0, "lease token 5 comes without its lease floor"),
    ],
)
def test_malformed_pair(token: int, floor: int, why: str) -> None:
    f = Fences({"cpu0": 4})
    assert malformed(token, floor) == why
    assert f.admit("cpu0", token, floor) == (Verdict.MALFORMED, why)
    assert f.get("cpu0") == 4  # nothing moved


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), TOKENS, TOKENS), max_size=40))
def test_fence_only_rises_and_stale_never_admitted(opens: list[tuple[str, int, int]]) -> None:
    f = Fences()
    for dev, tok, raw_floor in opens:
        floor = min(raw_floor, tok) if raw_floor % 7 else raw_floor  # mostly well formed
        before = f.get(dev)
        d = f.decide(dev, tok, floor)
        assert f.admit(dev, tok, floor) == d  # decide changes nothing, admit agrees with it
        after = f.get(dev)
        if floor > tok or (tok and not floor):
            assert d.verdict is Verdict.MALFORMED and after == before
            continue
        allowed = d.verdict is not Verdict.STALE
        assert allowed == (tok >= before if tok else before == 0)
        assert after == (max(before, floor) if allowed else before)
        assert (d.verdict is Verdict.RAISED) == (allowed and floor > before)


# One device through a model of the pool: ("reserve",), ("release", i), ("open", i).
POOL_OPS = st.lists(
    st.one_of(
        st.just(("reserve", 0)),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("open"), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=400)
@given(POOL_OPS)
def test_with_the_pools_floors(ops: list[tuple[str, int]]) -> None:
    """Leases come and go on one device as the pool makes them: a token is
    the revision of the txn that creates the lease (every reserve and release
    is a txn), its floor the smallest token live then, its own included. Any
    lease's holder (released or not: a partitioned backend does not know)
    opens sessions. The agent's rule ends a session, or refuses its OPEN,
    exactly when a lease that opened on the agent had been created at a time
    when no lease with a token at or below the session's was live; so a lease
    that is live is never fenced, and one created after every older lease was
    released fences all of them out."""
    f = Fences()
    revision = 0
    leases: list[tuple[int, int]] = []  # (token, floor) in creation order
    live: set[int] = set()  # tokens
    live_at_creation: dict[int, frozenset[int]] = {}
    opened: list[int] = []  # tokens of leases that opened on the agent
    sessions: dict[int, bool] = {}  # session id -> ended (fenced out or refused)
    session_token: dict[int, int] = {}

    def must_end(t: int) -> bool:  # from the pool's history alone, not from floors
        return any(not any(x <= t for x in live_at_creation[o]) for o in opened if o > t)

    for op, i in ops:
        if op == "reserve":
            revision += 1
            live_at_creation[revision] = frozenset(live | {revision})
            leases.append((revision, min(live | {revision})))
            live.add(revision)
        elif op == "release" and leases and leases[i % len(leases)][0] in live:
            revision += 1
            live.discard(leases[i % len(leases)][0])
        elif op == "open" and leases:
            token, floor = leases[i % len(leases)]
            d = f.admit("gpu0", token, floor)
            sid = len(sessions)
            session_token[sid] = token
            sessions[sid] = d.verdict is Verdict.STALE
            if d.verdict is Verdict.STALE:
                continue
            assert d.verdict is not Verdict.MALFORMED  # the pool's pairs are well formed
            opened.append(token)
            if d.verdict is Verdict.RAISED:  # the server ends the sessions below the fence
                for s, t in session_token.items():
                    if t < f.get("gpu0"):
                        sessions[s] = True
        for s, ended in sessions.items():
            t = session_token[s]
            assert ended == must_end(t), (s, t, leases, live, opened)
            if t in live:
                assert not ended  # a live lease is never fenced out


def test_file_round_trip_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "fences.json"
    assert load(path).to_json() == {}  # none yet
    f = Fences({"GPU-1": MAX_TOKEN, "cpu0": 3})
    save(f, path)
    assert load(path).to_json() == f.to_json()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not (tmp_path / "fences.json.tmp").exists()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2]", "one JSON object"),
        ('{"cpu0": -1}', "is not a token"),
        ('{"cpu0": 1.5}', "is not a token"),
        ('{"cpu0": true}', "is not a token"),
        ('{"cpu0": 18446744073709551616}', "is not a token"),
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
