"""Which chain walker a queue gets: ``select_walker("auto")`` gives the native
one when the C module is built and the pure-Python one otherwise (with a
warning, once); "native" insists, "python" never loads C. Both behave
identically (differential tests)."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

from vpcie._native import BUILD_HINT, native, native_available, native_error
from vpcie.protocol.virtq import MAX_CHAIN_SEGMENTS
from vpcie.virtqueue.chain import ChainWalker, PythonWalker

Impl = Literal["auto", "native", "python"]

log = logging.getLogger("vpcie._native")
_warned = False


def select_walker(impl: Impl = "auto", max_segments: int | None = None) -> ChainWalker:
    """A chain walker: native when asked for or available, else pure Python."""
    global _warned
    segs = MAX_CHAIN_SEGMENTS if max_segments is None else max_segments
    if impl not in ("auto", "native", "python"):
        raise ValueError(f"unknown virtqueue impl {impl!r} (auto, native or python)")
    if impl == "python":
        return PythonWalker(segs)
    if not native_available():
        if impl == "native":
            native()  # raises with the reason
        if not _warned:
            _warned = True
            msg = (
                f"vpcie native virtqueue walker unavailable ({native_error()}); using pure Python: "
                + (BUILD_HINT)
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning("%s", msg)
        return PythonWalker(segs)
    from vpcie.virtqueue.native_walker import NativeWalker

    return NativeWalker(segs)
