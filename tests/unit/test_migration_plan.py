"""What a live migration moves, decided without I/O (vpcie/gpu/migration_plan.py):
the source's STATE_SUMMARY read back, the target's records in batches under
the caps, the contents cut into copy pieces, the report's JSON."""

from __future__ import annotations

import pytest

from vpcie.gpu.migration_plan import (
    ALLOCS_PER_BATCH,
    COPY_CHUNK,
    Copied,
    MigrationReport,
    ModuleInfo,
    RoundPlan,
    SessionState,
    copy_chunks,
    plan_round,
    restore_batches,
    target_batches,
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
        "a:1 device=any auth=psk", "b:2 device=any auth=psk", 2, 10, 1.23456, 0.5, False,
        precopy_bytes=8, stun_bytes=2, rounds=1, precopy_ms=3.0,
    )  # fmt: skip
    assert r.to_wire() == {
        "ok": True,
        "migrated": "b:2 device=any auth=psk",
        "from": "a:1 device=any auth=psk",
        "contexts": 2,
        "state_bytes": 10,
        "stun_ms": 1.235,
        "copy_ms": 0.5,
        "state_lost": False,
        "precopy_bytes": 8,
        "stun_bytes": 2,
        "rounds": 1,
        "precopy_ms": 3.0,
    }


E = 3 << 24  # the handles' epoch in these summaries


def state(bufs: list[tuple[int, int, int]], mods: tuple[ModuleInfo, ...] = ()) -> SessionState:
    """A summary of buffers (index, size, gen) and modules."""
    return SessionState(
        3, 50, 0, b"",
        tuple((E | i, size) for i, size, _g in bufs), mods, tuple(g for *_r, g in bufs),
    )  # fmt: skip


def test_the_final_round_copies_only_what_changed_since_its_copy() -> None:
    """Pre-copy's last round: unchanged gens stay, written ones are copied
    again, new ones allocated and copied, freed ones freed, a handle made
    again with another size freed and allocated, modules the same way."""
    k1, k2 = ModuleInfo(E | 20, 1, "k1", 10), ModuleInfo(E | 21, 1, "k2", 10)
    first = state([(1, 100, 5), (2, 200, 7), (3, 300, 0), (4, 400, 1)], (k1, k2))
    copied = Copied()
    plan = plan_round(first, copied)
    assert plan.copy == first.buffers and plan.alloc == first.buffers and not plan.free
    assert plan.module_load == (k1, k2) and plan.copy_bytes == 1000
    copied.update(first)
    k2b = ModuleInfo(E | 21, 1, "k2-again", 12)
    final = state([(1, 100, 5), (2, 200, 9), (4, 64, 2 << 32), (5, 50, 3 << 32)], (k1, k2b))
    plan = plan_round(final, copied)
    assert plan.free == (E | 3, E | 4)  # freed; freed and made again smaller
    assert plan.alloc == ((E | 4, 64), (E | 5, 50))
    assert plan.copy == ((E | 2, 200), (E | 4, 64), (E | 5, 50))  # not 1: its gen held
    assert plan.module_free == (E | 21,) and plan.module_load == (k2b,)
    ops = [[r.opcode for r in b] for b in target_batches(plan, {E | 21: b"x" * 12})]
    assert ops == [
        [Opcode.MODULE_FREE, Opcode.MEM_FREE, Opcode.MEM_FREE],
        [Opcode.MODULE_LOAD_AT],
        [Opcode.ALLOC_AT, Opcode.ALLOC_AT],
    ]
    copied.update(final)
    assert plan_round(final, copied) == RoundPlan()  # nothing left to move


def test_a_summary_without_gens_copies_everything_again() -> None:
    first = state([(1, 100, 5)])
    copied = Copied()
    copied.update(first)
    nogen = SessionState(3, 50, 0, b"", first.buffers, ())
    assert plan_round(nogen, copied).copy == first.buffers
