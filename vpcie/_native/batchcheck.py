"""The vGPU batch fast path: ``vb_check`` (batchcheck.c) over preallocated buffers.

For a SUBMIT_3D batch made only of records it fully understands, the C check
gives what ``decode_batch`` + ``prepare`` + ``Prepared.encoded()`` would give
(the forwarded batch, byte for byte, its records' original indices, the
backend-local SIGNALs) at a fraction of the cost; for anything else it
declines and the Python path handles the batch as before. It never accepts a
batch the Python path refuses (tests/unit/test_batchcheck.py, differential).

What an accept does not cover: a SIGNAL that names a reply resource
(``resource != 0``) must still be checked against the context's resource
table, as ``prepare`` does.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from vpcie._native import native, native_available
from vpcie.protocol.codes import MAX_BATCH_BYTES, MAX_BATCH_RECORDS

# SIGNALs one batch may carry on the fast path; more: declined (Python path).
MAX_FAST_SIGNALS = 64

SignalTuple = tuple[int, int, int, int, int, int]  # index, stream, seq, resource, offset, size
_SIGNAL_FIELDS = ("index", "stream", "seq", "resource", "offset", "size")
# The C structs are read in native byte order ("="), padding spelled out.
_OUT = struct.Struct("=III")  # struct vb_out: fwd_len, nfwd, nsigs (size checked against cffi)
_out_unpack = _OUT.unpack_from
_new_tuple = tuple.__new__  # Checked(...) without NamedTuple's keyword handling (hot path)


class Checked(NamedTuple):
    """An accepted batch: what the backend forwards and what it keeps."""

    forward: bytes  # == Prepared.encoded()
    fwd_index: list[int]  # == Prepared.fwd_index
    signals: list[SignalTuple]  # the SIGNAL records in order, index = record index


def _signal_struct(ffi: Any) -> struct.Struct:
    """struct vb_signal's layout read off the compiled struct (padding included),
    so a signal's six fields come out of one ``unpack_from``."""
    fmt, at = "=", 0
    codes = {4: "I", 8: "Q"}
    fields = dict(ffi.typeof("struct vb_signal").fields)
    for name in _SIGNAL_FIELDS:
        f = fields[name]
        size = ffi.sizeof(f.type)
        fmt += ("x" * (f.offset - at)) + codes[size]
        at = f.offset + size
    fmt += "x" * (ffi.sizeof("struct vb_signal") - at)
    st = struct.Struct(fmt)
    if st.size != ffi.sizeof("struct vb_signal") or len(fields) != len(_SIGNAL_FIELDS):
        raise RuntimeError(f"vpcie native module: unexpected struct vb_signal layout {fmt}")
    return st


class BatchChecker:
    """Checks batches with ``vb_check``; one per thread (it owns its buffers).

    ``check(batch)`` returns a ``Checked`` or None (declined: use the Python
    path). ``max_forward_bytes``: decline when the forwarded batch would be
    larger (0: no limit beyond MAX_BATCH_BYTES; outside 0 .. 2**32-1:
    OverflowError)."""

    __slots__ = (
        "_ffi",
        "_fwd",
        "_fwd_buf",
        "_idx",
        "_idx_view",
        "_out",
        "_out_buf",
        "_sig_buf",
        "_sig_size",
        "_sig_unpack",
        "_sigs",
        "_vb_check",
    )

    def __init__(self) -> None:
        ffi, lib = native()
        self._ffi = ffi
        self._vb_check = lib.vb_check
        self._fwd = ffi.new("uint8_t[]", MAX_BATCH_BYTES)
        self._out = ffi.new("struct vb_out *")
        self._sigs = ffi.new("struct vb_signal[]", MAX_FAST_SIGNALS)
        self._idx = ffi.new("uint32_t[]", MAX_BATCH_RECORDS)
        # Views made once: per call only slices of them are taken.
        self._fwd_buf = ffi.buffer(self._fwd)
        self._out_buf = ffi.buffer(self._out)
        self._sig_buf = ffi.buffer(self._sigs)
        self._idx_view = memoryview(ffi.buffer(self._idx)).cast("I")
        sig_st = _signal_struct(ffi)
        self._sig_unpack = sig_st.unpack_from
        self._sig_size = sig_st.size
        if ffi.sizeof("struct vb_out") != _OUT.size or self._idx_view.itemsize != 4:
            raise RuntimeError("vpcie native module: unexpected vb_out / uint32_t layout")

    def check(
        self, batch: bytes | bytearray | memoryview, max_forward_bytes: int = 0
    ) -> Checked | None:
        if type(batch) is bytes:
            src: Any = batch
            n = len(batch)
        else:
            view = memoryview(batch).cast("B")
            src = self._ffi.from_buffer(view)
            n = len(view)
        if not self._vb_check(
            src,
            n,
            max_forward_bytes,
            self._fwd,
            MAX_BATCH_BYTES,
            self._out,
            self._sigs,
            MAX_FAST_SIGNALS,
            self._idx,
            MAX_BATCH_RECORDS,
        ):
            return None
        fwd_len, nfwd, nsigs = _out_unpack(self._out_buf)
        signals: list[SignalTuple]
        if nsigs == 0:
            signals = []
        elif nsigs == 1:
            signals = [self._sig_unpack(self._sig_buf)]
        else:
            unpack, buf, size = self._sig_unpack, self._sig_buf, self._sig_size
            signals = [unpack(buf, k * size) for k in range(nsigs)]
        return _new_tuple(
            Checked, (self._fwd_buf[:fwd_len], self._idx_view[:nfwd].tolist(), signals)
        )


def batch_checker() -> BatchChecker | None:
    """A BatchChecker, or None when the native module is not built (then every
    batch takes the Python path, which behaves the same)."""
    return BatchChecker() if native_available() else None
