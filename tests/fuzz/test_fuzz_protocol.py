"""Bounded CI runs of the protocol fuzz targets (fuzz_frames.py, fuzz_batch.py):
each runs in a subprocess for 10k iterations or 20 s, whichever comes first,
seeded from tests/golden/protocol. Skips, with the reason, when atheris is not
importable. To fuzz for longer, see the docstrings of the targets."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TARGETS = ["fuzz_frames.py", "fuzz_batch.py"]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_bounded(target: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        reason = "atheris is not importable (pip install atheris): protocol fuzz targets not run"
        print(reason)
        pytest.skip(reason)
    script = str(HERE / target)
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, script, "--seeds", str(corpus)], check=True, timeout=60)
    assert any(corpus.iterdir()), "no seed inputs written"
    proc = subprocess.run(
        [
            sys.executable,
            script,
            "-runs=10000",
            "-max_total_time=20",
            "-seed=1",  # reproducible in CI; run by hand without it for new paths
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    crashes = [
        p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))
    ]
    assert proc.returncode == 0 and not crashes, f"{target} failed ({crashes}):\n{tail}"
    assert "Done " in proc.stderr + proc.stdout, f"{target} did not run:\n{tail}"
