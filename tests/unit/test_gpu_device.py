"""The virtio-gpu model's sans-IO core: every command the Linux driver sends,
and the error response the spec names for each bad request."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import pytest

from vpcie.errors import ErrorCode
from vpcie.gpu.capset import CAPSET_SIZE, VGPU_CAPSET_ID, decode_capset
from vpcie.gpu.device import GpuDevice
from vpcie.memory import GuestMemory
from vpcie.protocol import virtio_gpu as wire
from vpcie.protocol.batch import encode_batch, rec
from vpcie.protocol.codes import NO_INDEX, ExecutorKind, Opcode
from vpcie.protocol.frames import decode_payload
from vpcie.testing.guest_driver import CommandFailed, DirectTransport, GuestContext, GuestGpu, hdr
from vpcie.virtqueue.driver import GuestAllocator

MEM = 16 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, MEM)])
    yield m
    m.close()


@pytest.fixture
def dev(mem: GuestMemory) -> GpuDevice:
    return GpuDevice(memory=lambda: mem)


@pytest.fixture
def gpu(dev: GpuDevice, mem: GuestMemory) -> GuestGpu:
    heap = GuestAllocator(mem, 0x1000, MEM - 0x1000)
    return GuestGpu(DirectTransport(dev), mem, heap.alloc)


def rtype(resp: bytes) -> int:
    return int(struct.unpack_from("<I", resp)[0])


async def test_driver_load_sequence(gpu: GuestGpu) -> None:
    caps = await gpu.load()
    assert len(caps) == CAPSET_SIZE
    info = decode_capset(caps)
    assert info[1] == ExecutorKind.NONE  # nothing bound yet, and the capset says so


def test_capset_info_names_our_capset(dev: GpuDevice) -> None:
    resp = dev.handle(hdr(wire.Cmd.GET_CAPSET_INFO) + struct.pack("<II", 0, 0))
    assert rtype(resp) == wire.Resp.OK_CAPSET_INFO
    assert struct.unpack_from("<III", resp, 24) == (VGPU_CAPSET_ID, 1, CAPSET_SIZE)
    bad = dev.handle(hdr(wire.Cmd.GET_CAPSET_INFO) + struct.pack("<II", 1, 0))
    assert rtype(bad) == wire.Resp.ERR_INVALID_PARAMETER


def test_fence_is_echoed_on_success_and_error(dev: GpuDevice) -> None:
    ok = dev.handle(hdr(wire.Cmd.GET_DISPLAY_INFO, fence_id=77, ctx_id=0))
    assert rtype(ok) == wire.Resp.OK_DISPLAY_INFO
    assert struct.unpack_from("<IIQ", ok) == (wire.Resp.OK_DISPLAY_INFO, wire.FLAG_FENCE, 77)
    err = dev.handle(hdr(wire.Cmd.RESOURCE_UNREF, fence_id=78) + struct.pack("<II", 999, 0))
    assert struct.unpack_from("<IIQ", err) == (wire.Resp.ERR_INVALID_RESOURCE_ID, 1, 78)


def test_2d_console_path_is_cheap_and_checked(dev: GpuDevice, mem: GuestMemory) -> None:
    create = hdr(wire.Cmd.RESOURCE_CREATE_2D) + struct.pack("<IIII", 5, 1, 640, 480)
    assert rtype(dev.handle(create)) == wire.Resp.OK_NODATA
    assert rtype(dev.handle(create)) == wire.Resp.ERR_INVALID_RESOURCE_ID  # duplicate id
    attach = hdr(wire.Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<II", 5, 1)
    attach += struct.pack("<QII", 0x100000, 640 * 480 * 4, 0)
    assert rtype(dev.handle(attach)) == wire.Resp.OK_NODATA
    scanout = hdr(wire.Cmd.SET_SCANOUT) + struct.pack("<6I", 0, 0, 640, 480, 0, 5)
    assert rtype(dev.handle(scanout)) == wire.Resp.OK_NODATA
    xfer = hdr(wire.Cmd.TRANSFER_TO_HOST_2D) + struct.pack("<4IQII", 0, 0, 640, 480, 0, 5, 0)
    assert rtype(dev.handle(xfer)) == wire.Resp.OK_NODATA
    too_big = hdr(wire.Cmd.TRANSFER_TO_HOST_2D) + struct.pack("<4IQII", 0, 0, 641, 480, 0, 5, 0)
    assert rtype(dev.handle(too_big)) == wire.Resp.ERR_INVALID_PARAMETER
    flush = hdr(wire.Cmd.RESOURCE_FLUSH) + struct.pack("<6I", 0, 0, 640, 480, 5, 0)
    assert rtype(dev.handle(flush)) == wire.Resp.OK_NODATA
    bad_scanout = hdr(wire.Cmd.SET_SCANOUT) + struct.pack("<6I", 0, 0, 1, 1, 3, 5)
    assert rtype(dev.handle(bad_scanout)) == wire.Resp.ERR_INVALID_PARAMETER


@pytest.mark.parametrize(
    "entries, why",
    [
        ([(MEM - 4096, 8192)], "runs past the end of guest RAM"),
        ([(0x200000, 8192), (0x201000, 4096)], "overlapping entries"),
        ([(0x200000, 0)], "zero-length entry"),
        ([(1 << 60, 4096)], "address far outside guest RAM"),
    ],
)
def test_bad_backing_is_refused(dev: GpuDevice, entries: list[tuple[int, int]], why: str) -> None:
    dev.handle(
        hdr(wire.Cmd.RESOURCE_CREATE_3D)
        + struct.pack("<12I", 9, 0, 64, 0, 1 << 16, 1, 1, 1, 0, 0, 0, 0)
    )
    req = hdr(wire.Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<II", 9, len(entries))
    req += b"".join(struct.pack("<QII", a, n, 0) for a, n in entries)
    assert rtype(dev.handle(req)) == wire.Resp.ERR_INVALID_PARAMETER, why
    assert dev.resources.get(9).backing is None


def test_huge_entry_count_is_refused_without_reading(dev: GpuDevice) -> None:
    dev.handle(
        hdr(wire.Cmd.RESOURCE_CREATE_3D)
        + struct.pack("<12I", 9, 0, 64, 0, 4096, 1, 1, 1, 0, 0, 0, 0)
    )
    req = hdr(wire.Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<II", 9, 0xFFFFFFFF)
    assert rtype(dev.handle(req)) == wire.Resp.ERR_INVALID_PARAMETER
    short = hdr(wire.Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<II", 9, 4)  # names 4, has 0
    assert rtype(dev.handle(short)) == wire.Resp.ERR_INVALID_PARAMETER


def test_truncated_and_unknown_commands(dev: GpuDevice) -> None:
    assert rtype(dev.handle(b"\x01\x01")) == wire.Resp.ERR_UNSPEC
    assert rtype(dev.handle(hdr(wire.Cmd.RESOURCE_CREATE_2D))) == wire.Resp.ERR_INVALID_PARAMETER
    assert rtype(dev.handle(hdr(0x0999))) == wire.Resp.ERR_UNSPEC
    assert rtype(dev.handle(hdr(wire.Cmd.RESOURCE_CREATE_BLOB) + bytes(32))) == wire.Resp.ERR_UNSPEC


async def test_unbound_vgpu_answers_query_and_fails_the_rest(gpu: GuestGpu) -> None:
    ctx = await gpu.open()
    reply = await ctx.run([rec(Opcode.QUERY)])
    assert reply.status == ErrorCode.OK
    info = decode_payload("QUERY_INFO", reply.blob)
    assert info[1] == ExecutorKind.NONE and info[13] == "no GPU bound"
    reply = await ctx.run([rec(Opcode.NOP), rec(Opcode.MEM_ALLOC, 4096, 0)])
    assert reply.status == ErrorCode.NO_DEVICE and reply.failed_index == 1


async def test_submit_validation_errors_reach_the_fence_page(gpu: GuestGpu, dev: GpuDevice) -> None:
    a = await gpu.open("a")
    b = await gpu.open("b")
    await a.setup_fences()
    await b.setup_fences()
    foreign = await a.create_bo(4096)
    # b names a's buffer: refused, the SIGNAL still ends (no hang) with the error.
    with pytest.raises(CommandFailed) as err:
        await b.start([rec(Opcode.COPY_H2D, 1, foreign.resource_id, 0, 0, 16)])
    assert err.value.resp == wire.Resp.ERR_INVALID_PARAMETER
    done, err_seq, code, failed = b.fence_slot(0)
    assert (done, err_seq, code, failed) == (1, 1, ErrorCode.INVALID_HANDLE, 0)
    assert b.fence_header()[3] == 1  # rejected count
    # A range past the buffer's backing.
    own = await b.create_bo(4096)
    with pytest.raises(CommandFailed):
        await b.start([rec(Opcode.COPY_D2H, 1, own.resource_id, 0, 4000, 200)])
    assert b.fence_slot(0)[2] == ErrorCode.OUT_OF_RANGE
    # Truncated batch and a size field that lies.
    for payload in (encode_batch([rec(Opcode.NOP)])[:-1], b"junk"):
        with pytest.raises(CommandFailed):
            await b.submit(payload)
    lying = hdr(wire.Cmd.SUBMIT_3D, ctx_id=b.ctx_id) + struct.pack("<II", 4096, 0) + bytes(16)
    assert rtype(dev.handle(lying)) == wire.Resp.ERR_INVALID_PARAMETER
    # The device and the other context keep working.
    reply = await a.run([rec(Opcode.QUERY)])
    assert reply.status == ErrorCode.OK


async def test_commands_after_ctx_destroy(gpu: GuestGpu, dev: GpuDevice) -> None:
    ctx = await gpu.open()
    bo = await ctx.create_bo(8192, scatter=True)
    await ctx.destroy()
    with pytest.raises(CommandFailed) as err:
        await ctx.submit(encode_batch([rec(Opcode.NOP)]))
    assert err.value.resp == wire.Resp.ERR_INVALID_CONTEXT_ID
    with pytest.raises(CommandFailed):
        await ctx.destroy()
    # UNREF after CTX_DESTROY (the kernel does this order too) still works.
    assert (
        rtype(dev.handle(hdr(wire.Cmd.RESOURCE_UNREF) + struct.pack("<II", bo.resource_id, 0)))
        == wire.Resp.OK_NODATA
    )
    assert len(dev.resources) == 0


async def test_unref_before_ctx_destroy(gpu: GuestGpu, dev: GpuDevice) -> None:
    ctx = await gpu.open()
    bo = await ctx.create_bo(4096)
    await ctx.close_bo(bo)
    assert bo.resource_id not in dev.contexts[ctx.ctx_id].resources
    await ctx.destroy()
    assert not dev.contexts


async def test_fence_page_must_be_word_aligned(
    gpu: GuestGpu, dev: GpuDevice, mem: GuestMemory
) -> None:
    """Fence words are single aligned stores: a fence page at an odd resource
    offset or on backing at an odd guest address is refused, nothing written."""
    ctx = await gpu.open()
    bo = await ctx.create_bo(8192)
    with pytest.raises(CommandFailed) as err:
        await ctx.submit(encode_batch([rec(Opcode.FENCE_PAGE_SET, bo.resource_id, 4)]))
    assert err.value.resp == wire.Resp.ERR_INVALID_PARAMETER
    # Re-back the buffer at a guest address 4 bytes past a page.
    rid = bo.resource_id
    odd = bo.segments[0][0] + 4
    assert rtype(
        dev.handle(hdr(wire.Cmd.RESOURCE_DETACH_BACKING) + struct.pack("<II", rid, 0))
    ) == (wire.Resp.OK_NODATA)
    attach = hdr(wire.Cmd.RESOURCE_ATTACH_BACKING) + struct.pack("<IIQII", rid, 1, odd, 4096, 0)
    assert rtype(dev.handle(attach)) == wire.Resp.OK_NODATA
    mem.write(odd, b"\xaa" * 64)
    with pytest.raises(CommandFailed) as err:
        await ctx.submit(encode_batch([rec(Opcode.FENCE_PAGE_SET, rid, 0)]))
    assert err.value.resp == wire.Resp.ERR_INVALID_PARAMETER
    assert mem.read(odd, 64) == b"\xaa" * 64  # nothing was written there
    assert dev.contexts[ctx.ctx_id].fence is None
    # An aligned fence page still works afterwards.
    await ctx.setup_fences()
    assert (await ctx.run([rec(Opcode.QUERY)])).status == ErrorCode.OK


def test_forwarded_records_keep_the_guest_bytes(mem: GuestMemory) -> None:
    """prepare() + Prepared.encoded(): records forwarded unchanged are the
    guest's own bytes (no second encoding), rewritten copies are encoded
    again, backend-local records are gone, and the result decodes to
    ``forward``."""
    from vpcie.gpu.resources import Resource, ResourceTable
    from vpcie.gpu.submit import prepare
    from vpcie.protocol.batch import decode_batch, encode_record

    table = ResourceTable()
    res = Resource(9, 8192, True, 8192, 1, 0)
    res.backing, res.backing_bytes = [(0x10000, 8192)], 8192
    table.create(res)
    raw = encode_batch(
        [
            rec(Opcode.NOP, stream=2),
            rec(Opcode.COPY_H2D, 77, 9, 16, 128, 256, stream=2),
            rec(Opcode.MEM_ALLOC, 4096, 0),
            rec(Opcode.SIGNAL, 1, 9, 0, 64, stream=2),
        ]
    )
    spans: list[tuple[int, int]] = []
    records = decode_batch(raw, spans)
    p = prepare(records, table, {9}, mem, raw, spans)
    data = p.encoded()
    assert decode_batch(data) == p.forward and len(p.forward) == 3
    assert raw[spans[0][0] : spans[0][1]] in data and raw[spans[2][0] : spans[2][1]] in data
    rewritten = p.forward[1]
    assert rewritten.body == (77, 0, 16, 0, 256)  # the guest resource became the copy stream
    assert encode_record(rewritten.opcode, rewritten.body, stream=2) in data
    assert p.copy_totals() == (256, 0)


class _HeldSession:
    """An agent session whose batches never complete (the GPU is busy)."""

    def __init__(self) -> None:
        from vpcie.tunnel.results import QueryInfo

        self.info = QueryInfo(
            1, ExecutorKind.CPU, 0, 1 << 30, 1 << 30, 0, 0, 4096, 1 << 20, 64, 0, 0, 0,
            "held", "uuid", "test",
        )  # fmt: skip
        self.sent: list[tuple[bytes, object]] = []

    @property
    def inflight(self) -> int:
        return len(self.sent)

    def send_encoded(self, data: bytes, h2d_total: int, d2h_total: int, **kw: object) -> object:
        self.sent.append((data, kw["on_done"]))
        return None

    async def close(self) -> None:
        pass

    def complete_all(self) -> None:
        """The agent finishes everything it holds, in order, with OK."""
        from types import SimpleNamespace

        sent, self.sent = self.sent, []
        for _data, on_done in sent:
            assert callable(on_done)
            on_done(
                SimpleNamespace(status=0, failed_index=NO_INDEX, message="", results={}, blob=b"")
            )


async def held_device(
    mem: GuestMemory, *, native: bool = True
) -> tuple[GpuDevice, _HeldSession, GuestGpu, GuestContext]:
    """A bound GpuDevice whose agent session (a _HeldSession) holds every
    batch until the test completes it, and a guest context with its fence page."""
    from vpcie.gpu.binding import AgentTarget, Binding

    held = _HeldSession()

    async def factory(target: AgentTarget, name: str, handle_epoch: int) -> _HeldSession:
        return held

    binding = Binding(factory)  # type: ignore[arg-type]
    dev = GpuDevice(binding, memory=lambda: mem)
    if not native:
        dev._checker = None
    heap = GuestAllocator(mem, 0x1000, MEM - 0x1000)
    gpu = GuestGpu(DirectTransport(dev), mem, heap.alloc)
    binding.bind(AgentTarget("127.0.0.1", 9, psk=b"k" * 16))
    ctx = await gpu.open()
    await ctx.setup_fences()
    return dev, held, gpu, ctx


async def test_batches_in_flight_are_bounded(mem: GuestMemory) -> None:
    """A guest cannot make the backend hold unbounded work: past the byte
    budget of batches in flight on the vGPU, a submission is refused with
    QUOTA_EXCEEDED on its fence slot (published once the work before it has
    finished: a SIGNAL never overtakes earlier work); completions free the
    budget again."""
    from vpcie.gpu.forwarding import MAX_CTX_INFLIGHT, MAX_INFLIGHT_BATCH_BYTES

    dev, held, _gpu, ctx = await held_device(mem)
    code = bytes(200_000)  # a 200 KB MODULE_LOAD: real payload the backend must keep
    big = [rec(Opcode.MODULE_LOAD, 1, "m", code, stream=1)]
    seqs = []
    for _ in range(MAX_INFLIGHT_BATCH_BYTES // 200_000 + 2):
        seqs.append(await ctx.start(big, stream=1))
        await asyncio.sleep(0)  # the forwarder task opens the session, then sends
    assert dev.inflight_bytes <= MAX_INFLIGHT_BATCH_BYTES
    assert ctx.fence_slot(1)[0] < seqs[0]  # the refusal waits for the work before it
    # The agent finishes everything it holds: the budget is free again, and
    # the refused batch's SIGNAL says why.
    held.complete_all()
    assert dev.inflight_bytes == 0
    done, err_seq, err, _ = ctx.fence_slot(1)
    assert err == ErrorCode.QUOTA_EXCEEDED and err_seq == seqs[-1] and done == seqs[-1]
    assert "MiB of batches in flight" in (await ctx.wait(1, seqs[-1], timeout=1)).message
    ok = await ctx.start(big, stream=1)
    await asyncio.sleep(0)
    assert ctx.fence_slot(1)[0] < ok  # held again, not refused
    # The count of batches in flight per context is bounded too.
    for _ in range(MAX_CTX_INFLIGHT):
        last = await ctx.start([rec(Opcode.NOP, stream=2)], stream=2)
    held.complete_all()
    reply = await ctx.wait(2, last, timeout=1)
    assert reply.status == ErrorCode.QUOTA_EXCEEDED and "1024 batches" in reply.message


@pytest.mark.parametrize("native", [True, False])
async def test_native_check_and_python_path_agree(mem: GuestMemory, native: bool) -> None:
    """The same batches through the native stage-1 check and through the
    Python decode: the same bytes reach the agent, the same replies and fence
    slots come back, and refusals are the Python path's."""
    from vpcie._native.batchcheck import batch_checker

    if native and batch_checker() is None:
        pytest.skip("native module not built: python -m vpcie._native._build")
    dev, session, gpu, ctx = await held_device(mem, native=native)
    buf = await ctx.create_bo(8192)
    other = await gpu.open("other")
    foreign = await other.create_bo(4096)
    launch = rec(Opcode.LAUNCH, 3, 1, 1, 1, 32, 1, 1, 0, "saxpy", 2, [(1, 5, 0), (2, 0, 7)])
    batches = [
        [rec(Opcode.NOP, stream=1)],
        [rec(Opcode.MEM_ALLOC, 4096, 0), launch, rec(Opcode.SYNC, stream=0xFFFFFFFF)],
        [rec(Opcode.COPY_H2D, 5, buf.resource_id, 0, 0, 4096)],  # copies: Python's
    ]
    seqs = [await ctx.start(b, stream=2) for b in batches]
    await asyncio.sleep(0)  # the first batch opens the session through the forwarder
    await asyncio.sleep(0)
    # Another context's buffer as a SIGNAL reply: refused by the Python path.
    with pytest.raises(CommandFailed):
        await ctx.start([rec(Opcode.SIGNAL, 99, foreign.resource_id, 0, 64, stream=3)], stream=3)
    assert ctx.fence_slot(3)[0] == 0  # published after the batches before it
    more = await ctx.start([rec(Opcode.NOP, stream=2)], stream=2)
    sent = [data for data, _ in session.sent]
    session.complete_all()
    _done, err_seq, code, failed = ctx.fence_slot(3)
    assert (err_seq, code, failed) == (1, ErrorCode.INVALID_HANDLE, 0)
    replies = [await ctx.wait(2, s, timeout=1) for s in (*seqs, more)]
    assert [r.status for r in replies] == [ErrorCode.OK] * 4
    assert len(sent) == 4
    # the native path took every copy-free batch (3 of the 5 submits)
    assert dev.stats["submits_native"] == (3 if native else 0)
    expected = [encode_batch([r for r in b if r.opcode != Opcode.SIGNAL]) for b in batches[:2]]
    assert sent[:2] == expected


async def test_refusals_waiting_for_earlier_work_are_bounded(mem: GuestMemory) -> None:
    """Refused batches wait for the work before them to publish their
    SIGNALs, but a guest that keeps one batch held and floods refusals
    cannot grow that list: past MAX_DEFERRED they publish at once."""
    from vpcie.gpu.forwarding import MAX_DEFERRED

    dev, held, _gpu, ctx = await held_device(mem)
    await ctx.start([rec(Opcode.NOP, stream=1)], stream=1)
    await asyncio.sleep(0)  # the forwarder opens the session and sends it: held
    await asyncio.sleep(0)
    for seq in range(1, MAX_DEFERRED + 4):  # SIGNAL replies into an unknown resource
        bad = encode_batch([rec(Opcode.SIGNAL, seq, 424242, 0, 64, stream=2)])
        with pytest.raises(CommandFailed):
            await ctx.submit(bad)
    state = dev.contexts[ctx.ctx_id]
    assert len(state.deferred) == MAX_DEFERRED
    assert ctx.fence_slot(2)[0] == MAX_DEFERRED + 3  # the overflow published at once
    assert ctx.fence_header()[3] == MAX_DEFERRED + 3  # every refusal counted at once
    held.complete_all()
    assert not state.deferred
