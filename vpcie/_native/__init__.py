"""Loader for the cffi hot path (``_vq_native``, built by ``python -m vpcie._native._build``).

This package holds the C and its loader only, and imports nothing else of
ours: the Python faces of the C live beside their Python twins
(vpcie/virtqueue/native_ring.py, native_walker.py; vpcie/gpu/native_lane.py;
batchcheck.py here, which needs only vpcie.protocol), so no layer above
imports back down into a layer that imports it (docs/ARCHITECTURE.md "Layers").
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_lib: Any = None
_ffi: Any = None
_error: str | None = None
try:
    import vpcie._native._vq_native as _vq_native

    _lib, _ffi = _vq_native.lib, _vq_native.ffi
except ImportError as exc:  # not built (or built for another Python)
    _error = str(exc)

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
