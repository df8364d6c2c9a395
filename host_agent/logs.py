"""Structured log lines on stderr: ``ts=... level=... proc=... event=... k=v``.

One line per event, logfmt style, so both people and log shippers read them.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

_PROC = ["agent"]


def set_process(name: str) -> None:
    _PROC[0] = name


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(ch in text for ch in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def log(level: str, event: str, **fields: Any) -> None:
    ts = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        + f".{int(time.time() * 1000) % 1000:03d}Z"
    )
    parts = [
        f"ts={ts}",
        f"level={level}",
        f"proc={_PROC[0]}",
        f"pid={os.getpid()}",
        f"event={event}",
    ]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
    try:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
