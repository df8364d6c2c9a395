"""What a live migration moves, decided without I/O (migration.py runs it).

A context's agent session holds device buffers, loaded modules, recorded
events and its handle counter. The source agent describes them
(STATE_EXPORT's STATE_SUMMARY, with each buffer's write generation ``gen``;
MODULE_EXPORT's code). The target is brought there in rounds: ``Copied``
is what the target holds so far (each buffer with the gen it had at the
export its copy followed), ``plan_round`` compares a new summary with it and
says what to free, load, allocate and copy; ``target_batches`` turns that
into the target's records (MEM_FREE / MODULE_FREE, MODULE_LOAD_AT, ALLOC_AT)
cut into batches under the batch caps, and SESSION_RESTORE ends the last
round. ``copy_chunks`` cuts contents into the COPY_D2H / COPY_H2D pieces that
travel source -> backend -> target. ``MigrationReport`` is what the control
socket answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class Copied:
    """What a target session holds of its source, as of the last round:
    handle -> (size, the buffer's gen in the export that round's copy
    followed), and the modules loaded there."""

    buffers: dict[int, tuple[int, int]] = field(default_factory=dict)
    modules: dict[int, ModuleInfo] = field(default_factory=dict)

    def update(self, state: SessionState) -> None:
        """The target now matches ``state`` (its round's records ran, its
        copies are done)."""
        pairs = zip(state.buffers, _gens(state), strict=True)
        self.buffers = {h: (size, g) for (h, size), g in pairs}
        self.modules = {m.handle: m for m in state.modules}

    def forget(self, handle: int) -> None:
        """``handle``'s contents on the target are unknown (its copy failed:
        the guest freed it meanwhile); the next round copies or frees it."""
        held = self.buffers.get(handle)
        if held is not None:
            self.buffers[handle] = (held[0], -1)


@dataclass(frozen=True)
class RoundPlan:
    """One round's work for one context (``plan_round``)."""

    free: tuple[int, ...] = ()  # buffers gone (or resized) since: MEM_FREE on the target
    module_free: tuple[int, ...] = ()  # modules gone (or replaced) since
    module_load: tuple[ModuleInfo, ...] = ()  # modules new since: MODULE_LOAD_AT
    alloc: tuple[tuple[int, int], ...] = ()  # (handle, size) new since: ALLOC_AT
    copy: tuple[tuple[int, int], ...] = ()  # (handle, size) whose contents move

    @property
    def copy_bytes(self) -> int:
        return sum(size for _h, size in self.copy)


def _gens(state: SessionState) -> tuple[int, ...]:
    # A summary without gens (never from a v2 agent) reads as "all changed".
    return state.gens if len(state.gens) == len(state.buffers) else (-1,) * len(state.buffers)


def plan_round(state: SessionState, copied: Copied) -> RoundPlan:
    """What brings a target holding ``copied`` to ``state``.

    A buffer is copied unless the target holds it with the same size and the
    gen it has now: the runner adds to a buffer's gen before every command
    that may write it runs, so an unchanged gen since the export a copy
    followed means no write began after that export. Gens -1 (unknown)
    never match."""
    now = dict(zip(state.buffers, _gens(state), strict=True))
    free: list[int] = []
    alloc: list[tuple[int, int]] = []
    copy: list[tuple[int, int]] = []
    sizes = dict(state.buffers)
    for h, (size, _g) in copied.buffers.items():
        if sizes.get(h) != size:
            free.append(h)  # freed, or freed and made again with another size
    for (h, size), g in now.items():
        held = copied.buffers.get(h)
        if held is None or held[0] != size:
            alloc.append((h, size))
            copy.append((h, size))
        elif g < 0 or held[1] != g:
            copy.append((h, size))
    module_free: list[int] = []
    module_load: list[ModuleInfo] = []
    mods = {m.handle: m for m in state.modules}
    for h, m in copied.modules.items():
        if mods.get(h) != m:
            module_free.append(h)
    for h, m in mods.items():
        if copied.modules.get(h) != m:
            module_load.append(m)
    return RoundPlan(
        tuple(sorted(free)), tuple(sorted(module_free)), tuple(module_load),
        tuple(alloc), tuple(copy),
    )  # fmt: skip


def target_batches(plan: RoundPlan, codes: dict[int, bytes]) -> list[list[Record]]:
    """The target's records for ``plan``, in batches: frees first (they give
    back quota and handles), each module alone (its code may be near a
    batch's size), allocations in groups. ``codes``: MODULE_EXPORT's code of
    each module to load."""
    batches: list[list[Record]] = []
    frees = [rec(Opcode.MODULE_FREE, h) for h in plan.module_free]
    frees += [rec(Opcode.MEM_FREE, h) for h in plan.free]
    for i in range(0, len(frees), ALLOCS_PER_BATCH):
        batches.append(frees[i : i + ALLOCS_PER_BATCH])
    for m in plan.module_load:
        batches.append([rec(Opcode.MODULE_LOAD_AT, m.handle, m.kind, m.name, codes[m.handle])])
    allocs = [rec(Opcode.ALLOC_AT, h, size, 0) for h, size in plan.alloc]
    for i in range(0, len(allocs), ALLOCS_PER_BATCH):
        batches.append(allocs[i : i + ALLOCS_PER_BATCH])
    return batches


def restore_record(state: SessionState) -> Record:
    """The last record of a migration: the counter past every handle made
    here, and the recorded events."""
    return rec(Opcode.SESSION_RESTORE, state.next_index, state.events_set)


def restore_batches(state: SessionState, codes: dict[int, bytes]) -> list[list[Record]]:
    """Every record an empty target needs for ``state`` (one round from
    nothing), SESSION_RESTORE last."""
    return [*target_batches(plan_round(state, Copied()), codes), [restore_record(state)]]


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
    precopy_bytes: int = 0  # contents copied while the guest ran (before the hold)
    stun_bytes: int = 0  # contents copied during the hold (written since their copy, or new)
    rounds: int = 0  # pre-copy rounds (0: none, the whole state moved in the stun)
    precopy_ms: float = 0.0  # the pre-copy's time (the guest ran meanwhile)

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
            "precopy_bytes": self.precopy_bytes,
            "stun_bytes": self.stun_bytes,
            "rounds": self.rounds,
            "precopy_ms": round(self.precopy_ms, 3),
        }
