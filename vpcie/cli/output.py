"""Shared output of the pool verbs: tables for people, one JSON object for
scripts, byte sizes both ways."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``80GiB``, ``512M``, ``1.5G``, ``4096``: bytes. Units are binary
    (G = GiB), as device memory is counted."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 512MiB, 10GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def fmt_age(ts: float, now: float | None = None) -> str:
    """Seconds since ``ts`` (a time.time() stamp), short: 4s, 3m, 2h, 5d."""
    if not ts:
        return "-"
    s = max(0.0, (time.time() if now is None else now) - ts)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= scale:
            return f"{int(s // scale)}{unit}"
    return f"{int(s)}s"


def fmt_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> str:
    """Columns padded to their widest cell; ``empty`` when there are no rows."""
    if not rows:
        return empty
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(as_json: bool, obj: dict[str, Any], human: str) -> None:
    """``--json``: one JSON object on one line (``"ok": true`` first); else the
    text for people."""
    if as_json:
        print(json.dumps({"ok": True, **obj}, sort_keys=False, default=str))
    else:
        print(human)


def progress(line: str) -> None:
    """Progress of a long operation: on stderr, so --json's stdout stays one object."""
    print(line, file=sys.stderr, flush=True)
