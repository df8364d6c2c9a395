"""Shared helpers for the benchmarks: arguments, percentiles, machine, output.

Every benchmark takes ``--quick`` (a smoke run, under a minute) and ``--json``
(the last line of stdout is one JSON object with the figures). People read the
lines before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="short smoke run (< 1 minute)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    return ap


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted samples."""
    if not samples:
        raise ValueError("no samples")
    s = sorted(samples)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50)


def machine() -> dict[str, Any]:
    """nproc, CPU model, kernel, Python: what a figure needs next to it."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count() or 0,
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def say(line: str = "") -> None:
    print(line, flush=True)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header)), *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        say(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            say("  ".join("-" * w for w in widths))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def emit_json(result: dict[str, Any]) -> None:
    """The machine-readable last line."""
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
