"""What a live migration moves, decided without I/O (migration.py runs it).

A context's agent session holds device buffers, loaded modules, recorded
events and its handle counter. The source agent describes them
(STATE_EXPORT's STATE_SUMMARY, MODULE_EXPORT's code); ``restore_batches``
turns that into the target's records (MODULE_LOAD_AT, ALLOC_AT, then
SESSION_RESTORE), cut into batches under the batch caps; ``copy_chunks`` cuts
the buffers' contents into the COPY_D2H / COPY_H2D pieces that travel
source -> backend -> target. ``MigrationReport`` is what the control socket
answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vpcie.protocol.batch import Record, rec
from vpcie.protocol.codes import MAX_BATCH_RECORDS, MAX_DATA_CHUNK, Opcode
from vpcie.protocol.frames import STATE_SUMMARY

# One copy piece: a DATA frame's worth, so each piece is one frame each way
# and a few in flight keep both links busy without holding much memory.
COPY_CHUNK = MAX_DATA_CHUNK
# ALLOC_AT records per batch: 32 bytes each, far under MAX_BATCH_BYTES.
ALLOCS_PER_BATCH = min(2048, MAX_BATCH_RECORDS)


@dataclass(frozen=True)
class ModuleInfo:
    handle: int
    kind: int
    name: str
    code_size: int


@dataclass(frozen=True)
class SessionState:
    """A session's STATE_SUMMARY: everything but the contents."""

    handle_epoch: int
    next_index: int
    mem_used: int
    events_set: bytes
    buffers: tuple[tuple[int, int], ...]  # (handle, size)
    modules: tuple[ModuleInfo, ...]
    gens: tuple[int, ...] = ()  # each buffer's write generation, as ``buffers``

    @classmethod
    def parse(cls, blob: bytes) -> SessionState:
        """STATE_EXPORT's completion blob (ValueError, one line, if malformed)."""
        try:
            s = STATE_SUMMARY.parse(blob)
        except Exception as exc:  # construct raises its own hierarchy
            raise ValueError(f"malformed STATE_SUMMARY ({len(blob)} bytes): {exc}") from None
        return cls(
            int(s.handle_epoch),
            int(s.next_index),
            int(s.mem_used),
            bytes(s.events_set),
            tuple((int(b.handle), int(b.size)) for b in s.buffers),
            tuple(
                ModuleInfo(int(m.handle), int(m.kind), str(m.name), int(m.code_size))
                for m in s.modules
            ),
            tuple(int(b.gen) for b in s.buffers),
        )

    @property
    def buffer_bytes(self) -> int:
        return sum(size for _h, size in self.buffers)


def restore_batches(state: SessionState, codes: dict[int, bytes]) -> list[list[Record]]:
    """The target's records for ``state``, in batches: each module alone (its
    code may be near a batch's size), allocations in groups, and
    SESSION_RESTORE last (it sets the counter past every handle made here)."""
    batches: list[list[Record]] = []
    for m in state.modules:
        batches.append([rec(Opcode.MODULE_LOAD_AT, m.handle, m.kind, m.name, codes[m.handle])])
    allocs = [rec(Opcode.ALLOC_AT, h, size, 0) for h, size in state.buffers]
    for i in range(0, len(allocs), ALLOCS_PER_BATCH):
        batches.append(allocs[i : i + ALLOCS_PER_BATCH])
    batches.append([rec(Opcode.SESSION_RESTORE, state.next_index, state.events_set)])
    return batches


def copy_chunks(
    buffers: tuple[tuple[int, int], ...], chunk: int = COPY_CHUNK
) -> list[tuple[int, int, int]]:
    """(handle, offset, size) pieces covering every buffer's contents."""
    out: list[tuple[int, int, int]] = []
    for handle, size in buffers:
        for off in range(0, size, chunk):
            out.append((handle, off, min(chunk, size - off)))
    return out


@dataclass(frozen=True)
class MigrationReport:
    source: str  # the binding migrated from (AgentTarget.describe())
    target: str
    contexts: int  # contexts whose state moved
    state_bytes: int  # device memory contents + module code moved
    stun_ms: float  # hold start -> release: no batch of this vGPU ran meanwhile
    copy_ms: float  # the contents' copy, within the stun
    state_lost: bool  # the source was unusable: contexts ended DEVICE_LOST, target empty

    def to_wire(self) -> dict[str, Any]:
        return {
            "ok": True,
            "migrated": self.target,
            "from": self.source,
            "contexts": self.contexts,
            "state_bytes": self.state_bytes,
            "stun_ms": round(self.stun_ms, 3),
            "copy_ms": round(self.copy_ms, 3),
            "state_lost": self.state_lost,
        }
