"""Lease fencing without an agent: the rule (host_agent/fencing.py, docs/SECURITY.md
"Lease fencing") and its file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.fencing import MAX_TOKEN, Fences, Verdict, load, save

TOKENS = st.integers(0, MAX_TOKEN)


def test_the_rule() -> None:
    f = Fences()
    assert f.admit("cpu0", 0).verdict is Verdict.ALLOWED  # manual bind, never leased
    assert f.get("cpu0") == 0
    assert f.admit("cpu0", 5).verdict is Verdict.RAISED and f.get("cpu0") == 5
    assert f.admit("cpu0", 5).verdict is Verdict.ALLOWED  # the same lease, another context
    stale = f.admit("cpu0", 4)
    assert stale.verdict is Verdict.STALE and f.get("cpu0") == 5
    assert stale.message == (
        "lease token 4 is older than 5, the newest for cpu0: the lease was given to someone else"
    )
    zero = f.admit("cpu0", 0)
    assert zero.verdict is Verdict.STALE and "leased through the pool" in zero.message
    assert f.admit("cpu0", 9).verdict is Verdict.RAISED and f.get("cpu0") == 9
    assert f.admit("cpu0", 5).verdict is Verdict.STALE
    assert f.admit("gpu1", 1).verdict is Verdict.RAISED  # per device
    assert f.to_json() == {"cpu0": 9, "gpu1": 1}


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), TOKENS), max_size=40))
def test_fence_only_rises_and_stale_never_admitted(opens: list[tuple[str, int]]) -> None:
    f = Fences()
    for dev, tok in opens:
        before = f.get(dev)
        d = f.decide(dev, tok)
        assert f.admit(dev, tok) == d  # decide changes nothing, admit agrees with it
        after = f.get(dev)
        assert after == max(before, tok)
        allowed = d.verdict is not Verdict.STALE
        assert allowed == (tok >= before if tok else before == 0)
        assert (d.verdict is Verdict.RAISED) == (tok > before)


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
