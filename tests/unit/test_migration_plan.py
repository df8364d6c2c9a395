"""What a live migration moves, decided without I/O (vpcie/gpu/migration_plan.py):
the source's STATE_SUMMARY read back, the target's records in batches under
the caps, the contents cut into copy pieces, the report's JSON."""

from __future__ import annotations

import pytest

from vpcie.gpu.migration_plan import (
    ALLOCS_PER_BATCH,
    COPY_CHUNK,
    MigrationReport,
    ModuleInfo,
    SessionState,
    copy_chunks,
    restore_batches,
)
from vpcie.protocol.batch import decode_batch, encode_batch
from vpcie.protocol.codes import MAX_BATCH_BYTES, Opcode
from vpcie.protocol.frames import STATE_SUMMARY


def summary(nbuf: int, modules: list[tuple[int, int, str, int]]) -> bytes:
    return bytes(
        STATE_SUMMARY.build(
            {
                "handle_epoch": 3,
                "next_index": nbuf + len(modules) + 1,
                "mem_used": 4096 * nbuf,
                "events_set": b"\x05\x80",
                "nbuffers": nbuf,
                "buffers": [
                    {"handle": (3 << 24) | (i + 1), "size": 4096 + i, "gen": (i + 1) << 32}
                    for i in range(nbuf)
                ],
                "nmodules": len(modules),
                "modules": [
                    {"handle": h, "kind": k, "name": n, "code_size": c} for h, k, n, c in modules
                ],
            }
        )
    )


def test_summary_parses_into_the_state() -> None:
    blob = summary(2, [((3 << 24) | 9, 2, "axpy", 120)])
    st = SessionState.parse(blob)
    assert (st.handle_epoch, st.next_index, st.events_set) == (3, 4, b"\x05\x80")
    assert st.buffers == (((3 << 24) | 1, 4096), ((3 << 24) | 2, 4097))
    assert st.modules == (ModuleInfo((3 << 24) | 9, 2, "axpy", 120),)
    assert st.buffer_bytes == 8193
    with pytest.raises(ValueError, match=r"^malformed STATE_SUMMARY \(5 bytes\)"):
        SessionState.parse(blob[:5])


def test_restore_batches_modules_then_allocations_then_the_counter() -> None:
    mod = (3 << 24) | 7
    n = ALLOCS_PER_BATCH + 5
    st = SessionState.parse(summary(n, [(mod, 1, "k", 3)]))
    batches = restore_batches(st, {mod: b"abc"})
    ops = [[r.opcode for r in b] for b in batches]
    assert ops[0] == [Opcode.MODULE_LOAD_AT]
    assert ops[1] == [Opcode.ALLOC_AT] * ALLOCS_PER_BATCH and ops[2] == [Opcode.ALLOC_AT] * 5
    assert ops[3] == [Opcode.SESSION_RESTORE]
    # Every batch encodes under the caps and says what the summary said.
    decoded = [decode_batch(encode_batch(b)) for b in batches]
    assert all(len(encode_batch(b)) <= MAX_BATCH_BYTES for b in batches)
    assert tuple(decoded[0][0].body) == (mod, 1, "k", b"abc")
    allocs = [tuple(r.body) for b in decoded[1:3] for r in b]
    assert allocs == [(h, size, 0) for h, size in st.buffers]
    assert tuple(decoded[3][0].body) == (st.next_index, b"\x05\x80")


def test_an_empty_session_restores_only_its_counter() -> None:
    st = SessionState.parse(summary(0, []))
    assert [[r.opcode for r in b] for b in restore_batches(st, {})] == [[Opcode.SESSION_RESTORE]]
    assert copy_chunks(st.buffers) == []


def test_copy_chunks_cover_every_byte_once() -> None:
    bufs = ((1, 2 * COPY_CHUNK + 10), (2, 5), (3, 0), (4, COPY_CHUNK))
    chunks = copy_chunks(bufs)
    assert all(0 < size <= COPY_CHUNK for _h, _o, size in chunks)
    for handle, size in bufs:
        mine = sorted((o, s) for h, o, s in chunks if h == handle)
        pos = 0
        for off, n in mine:
            assert off == pos
            pos += n
        assert pos == size
    assert len(chunks) == 3 + 1 + 0 + 1


def test_report_json() -> None:
    r = MigrationReport(
        "a:1 device=any auth=psk", "b:2 device=any auth=psk", 2, 10, 1.23456, 0.5, False
    )
    assert r.to_wire() == {
        "ok": True,
        "migrated": "b:2 device=any auth=psk",
        "from": "a:1 device=any auth=psk",
        "contexts": 2,
        "state_bytes": 10,
        "stun_ms": 1.235,
        "copy_ms": 0.5,
        "state_lost": False,
    }
