"""Bounded fuzzing of the vhost-user codec (atheris when importable)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_vhost_user import one_input  # type: ignore[import-not-found]

GOLDEN = Path(__file__).parent.parent / "golden" / "vhost_user"


def test_mutated_goldens_only_raise_protocol_error() -> None:
    """Deterministic, always-on: byte flips and splices of every golden message."""
    rng = random.Random(1234)
    seeds = [p.read_bytes() for p in sorted(GOLDEN.glob("*.bin"))]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                data += rng.choice(seeds)
            elif data:
                pos = rng.randrange(min(len(data), 12))
                data[pos : pos + 4] = struct.pack("<I", rng.choice([0, 1, 5, 8, 255, 1 << 31]))
        one_input(bytes(data))


def test_atheris_campaign(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not importable: coverage-guided fuzzing skipped")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in GOLDEN.glob("*.bin"):
        (corpus / p.name).write_bytes(p.read_bytes())
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("fuzz_vhost_user.py")),
            "-runs=4000",
            "-max_total_time=30",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done" in out.stderr  # libFuzzer finished its runs
