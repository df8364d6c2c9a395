"""``vpcie demo`` end to end: a real agent, a GEMM through the tunnel, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vpcie.cli.main import main


def test_demo_runs_and_says_it_is_not_a_gpu() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vpcie.cli.main", "demo", "--tunnel", "--size", "48", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["verified"] is True
    assert report["executor_kind"] == "CPU"
    assert "NOT a GPU" in report["executor"]
    assert report["max_abs_error"] < 1e-3


def test_demo_human_report() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vpcie.cli.main", "demo", "--tunnel", "--size", "16"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NOT a GPU" in proc.stdout and "matches NumPy" in proc.stdout


def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpcie: error:")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert "tunnel protocol 2" in capsys.readouterr().out
