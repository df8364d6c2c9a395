"""Loader for the cffi hot path (``_vq_native``, built by ``python -m vpcie._native._build``).

``select_walker("auto")`` gives the native chain walker when the module is
built and the pure-Python one otherwise (with a warning, once); "native"
insists, "python" never loads C. Both behave identically (differential tests).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vpcie.virtqueue.chain import ChainWalker

Impl = Literal["auto", "native", "python"]

log = logging.getLogger(__name__)

_lib: Any = None
_ffi: Any = None
_error: str | None = None
try:
    import vpcie._native._vq_native as _vq_native

    _lib, _ffi = _vq_native.lib, _vq_native.ffi
except ImportError as exc:  # not built (or built for another Python)
    _error = str(exc)

_warned = False

BUILD_HINT = "build it with `python -m vpcie._native._build` (needs gcc and python3-dev)"


def native_available() -> bool:
    return _lib is not None


def native_error() -> str | None:
    """Why the native module could not be loaded (None when it is loaded)."""
    return _error


def native() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the native module; RuntimeError when it is not built."""
    if _lib is None:
        raise RuntimeError(f"vpcie native module unavailable ({_error}); {BUILD_HINT}")
    return _ffi, _lib


def select_walker(impl: Impl = "auto", max_segments: int | None = None) -> ChainWalker:
    """A chain walker: native when asked for or available, else pure Python."""
    global _warned
    from vpcie.virtqueue.chain import PythonWalker
    from vpcie.virtqueue.layout import MAX_CHAIN_SEGMENTS

    segs = MAX_CHAIN_SEGMENTS if max_segments is None else max_segments
    if impl not in ("auto", "native", "python"):
        raise ValueError(f"unknown virtqueue impl {impl!r} (auto, native or python)")
    if impl == "python":
        return PythonWalker(segs)
    if _lib is None:
        if impl == "native":
            native()  # raises with the reason
        if not _warned:
            _warned = True
            msg = f"vpcie native virtqueue walker unavailable ({_error}); using pure Python: " + (
                BUILD_HINT
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning("%s", msg)
        return PythonWalker(segs)
    from vpcie._native.walker import NativeWalker

    return NativeWalker(segs)
