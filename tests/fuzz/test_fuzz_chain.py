"""Bounded runs of the chain-walker fuzz target (tests/fuzz/fuzz_chain.py)."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fuzz_chain import one_input  # type: ignore[import-not-found]  # noqa: E402


def test_target_on_random_inputs() -> None:
    """Without atheris: a few thousand seeded random and structured inputs."""
    rng = random.Random(1234)
    for i in range(3000):
        size = rng.choice([2, 16, 64, 0x210, 0x1002])
        data = bytearray(rng.randbytes(size))
        if size > 4 and i % 2:
            # a plausible avail.idx so chains are actually walked
            data[4:6] = (rng.randint(0, 8)).to_bytes(2, "little")
        one_input(bytes(data))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_bounded(tmp_path: Path) -> None:
    """20k iterations or 30 s of coverage-guided fuzzing, whichever comes first."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_chain.py"),
            "-runs=20000",
            "-max_total_time=30",
            f"-artifact_prefix={tmp_path}/",
            "-seed=1",
            "-max_len=4200",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr or "DONE" in proc.stderr, proc.stderr[-2000:]
