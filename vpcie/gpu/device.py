"""The vGPU: a virtio-gpu device model whose 3D side is a remote GPU.

``GpuDevice`` is the facade the backend and the tests use: the vhost-user
``Device`` interface (queues, features, config, reset) over the parts that
do the work, each in its own module:

- commands.py    the virtio-gpu command table: decode, check, answer
- context.py     a 3D context and its agent session's explicit states
- forwarding.py  SUBMIT_3D batches to the agent and their outcomes back
- holding.py     UNREF answers held while batches still use the backing
- lanes.py       the C lane that serves lent sessions without Python

What the Linux 6.12 guest driver sends and in which order is recorded in
DESIGN.md ("What the guest kernel sends, per ioctl"); this model serves exactly
that: RESOURCE_CREATE_3D and ATTACH_BACKING with ctx_id 0, UNREF before or
after CTX_DESTROY, no DETACH_BACKING before UNREF, every command in an
indirect table (the virtqueue layer handles that).

2D resources and the scanout are served cheaply with a null scanout (the
guest console flushes every ~200 ms). SUBMIT_3D carries vGPU batches
(vpcie/protocol/batch.py) that go to this context's agent session; a virtio
fence means "accepted", completion is published on the fence page.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

from vpcie._native.batchcheck import batch_checker
from vpcie.backend.device import (
    BASE_FEATURES,
    GPU_FEATURES,
    MAX_CHAINS_PER_KICK,
    VIRTIO_GPU_CONFIG,
    Device,
)
from vpcie.errors import ErrorCode, VgpuError
from vpcie.gpu.binding import AgentTarget, Binding
from vpcie.gpu.capset import make_edid, unbound_info
from vpcie.gpu.commands import (
    MAX_CONTEXTS,
    MAX_REQUEST_BYTES,
    SCANOUT_H,
    SCANOUT_W,
    CommandHandlers,
)
from vpcie.gpu.context import Context, ContextError, ContextState
from vpcie.gpu.forwarding import (
    MAX_CTX_INFLIGHT,
    MAX_DEFERRED,
    MAX_INFLIGHT_BATCH_BYTES,
    Forwarding,
)
from vpcie.gpu.holding import UnrefHolds
from vpcie.gpu.lanes import Lanes
from vpcie.gpu.migration import DRAIN_TIMEOUT_S, migrate
from vpcie.gpu.migration_plan import MigrationReport
from vpcie.gpu.native_lane import BatchParts
from vpcie.gpu.resources import ParameterError, ResourceTable
from vpcie.memory import GuestMemory
from vpcie.protocol import virtio_gpu as wire
from vpcie.virtqueue import VirtQueue

__all__ = [
    "CONTROL_QUEUE", "CURSOR_QUEUE", "MAX_CONTEXTS", "MAX_CTX_INFLIGHT", "MAX_DEFERRED",
    "MAX_INFLIGHT_BATCH_BYTES", "MAX_REQUEST_BYTES", "SCANOUT_H", "SCANOUT_W", "Context",
    "ContextError", "ContextState", "GpuDevice",
]  # fmt: skip

CONTROL_QUEUE, CURSOR_QUEUE = 0, 1


class GpuDevice(CommandHandlers, Device):
    """virtio-gpu + vGPU. ``handle(request) -> response`` is the sans-IO core
    (commands.py); ``on_kick`` feeds it from the control queue."""

    name = "vpcie-gpu"

    def __init__(
        self,
        binding: Binding | None = None,
        *,
        memory: Callable[[], GuestMemory] | None = None,
        lane: bool = True,
    ) -> None:
        super().__init__()
        self.binding = binding or Binding()
        self.binding.listeners.append(self._binding_changed)
        self._memory = memory
        self.resources = ResourceTable()
        self.contexts: dict[int, Context] = {}
        self.scanout_resource = 0
        self.stats = {
            "commands": 0, "errors": 0, "submits": 0, "submits_native": 0, "rejected": 0,
            "flushes": 0,
        }  # fmt: skip
        self.edid = make_edid(SCANOUT_W, SCANOUT_H)
        self.bound_info: bytes = unbound_info()
        self._tasks: set[asyncio.Task[None]] = set()
        self.gpu_socket: int | None = None
        self._servers: dict[int, Callable[[bytes, int], bytes]] = {}
        self._checker = batch_checker()
        # Copy-free batches of lent sessions are served by a C thread (lanes.py).
        self.lanes = Lanes(self, MAX_REQUEST_BYTES, enabled=lane)
        self.forwarding = Forwarding(self)
        self.holds = UnrefHolds(self, CONTROL_QUEUE)
        self._withhold = self.holds.pending_rids  # one lookup less per command
        self.migrating = False
        self.migrate_drain_timeout = DRAIN_TIMEOUT_S  # vpcie-backend --migrate-drain-timeout

    @property
    def inflight_bytes(self) -> int:
        """Guest batch bytes held for uncompleted work."""
        return self.forwarding.inflight_bytes

    # -- Device interface ---------------------------------------------------------
    def features(self) -> int:
        return BASE_FEATURES | GPU_FEATURES

    def num_queues(self) -> int:
        return 2

    def config(self) -> bytes:
        return bytes(
            VIRTIO_GPU_CONFIG.build(
                {"events_read": 0, "events_clear": 0, "num_scanouts": 1, "num_capsets": 1}
            )
        )

    def on_kick(self, queue_index: int, vq: VirtQueue) -> None:
        if queue_index == CONTROL_QUEUE and self.lanes.owns_ring():
            self.lanes.poke()  # the lane serves it; Python gets its turns from there
            return
        serve = self._servers.get(queue_index)
        if serve is None:
            serve = self._servers[queue_index] = (
                self.serve_control if queue_index == CONTROL_QUEUE else self._serve_cursor
            )
        vq.serve(serve, MAX_CHAINS_PER_KICK, MAX_REQUEST_BYTES)

    def serve_control(self, request: bytes, read_len: int) -> bytes:
        """A control-queue request (a chain's readable bytes) -> its response."""
        if read_len > MAX_REQUEST_BYTES or read_len < wire.HDR_SIZE:
            # Too long: ``request`` is its leading bytes; too short: nothing to echo.
            head = request[: wire.HDR_SIZE] if read_len >= wire.HDR_SIZE else b""
            return self._error_reply(head, wire.Resp.ERR_INVALID_PARAMETER)
        return self.handle(request)

    def _serve_cursor(self, request: bytes, read_len: int) -> bytes:
        # The cursor queue has no response buffers (virtio 1.2 §5.7.6.10).
        self.serve_control(request, read_len)
        return b""

    def on_set_socket(self, fd: int) -> None:
        # QEMU's end of the vhost-user-gpu socket (display updates). The null
        # scanout sends nothing on it, but it stays open for the connection's
        # life: QEMU treats a closed display socket as a broken backend.
        if self.gpu_socket is not None:
            os.close(self.gpu_socket)
        self.gpu_socket = fd

    def on_queue_started(self, queue_index: int) -> None:
        self.lanes.queue_started(queue_index)
        if queue_index == CONTROL_QUEUE and self.holds.held:
            self.holds.answer_ready()

    def on_queue_stopped(self, queue_index: int) -> None:
        self.lanes.queue_stopped(queue_index)

    def on_call_fd(self, queue_index: int, fd: int | None) -> None:
        self.lanes.call_fd(queue_index, fd)

    def reset(self) -> None:
        super().reset()
        self.holds.drop_all()
        for ctx in list(self.contexts.values()):
            self._destroy_context(ctx)
        self.resources.clear()
        self.scanout_resource = 0

    def close(self) -> None:
        self.reset()
        self.lanes.close()
        if self.gpu_socket is not None:
            os.close(self.gpu_socket)
            self.gpu_socket = None

    # -- what the parts ask of the device ---------------------------------------------
    def mem(self) -> GuestMemory:
        if self._memory is not None:
            return self._memory()
        if self.host is None:
            raise ParameterError("no guest memory yet")
        return self.host.memory.mem

    def batch_finished(self) -> None:
        """A batch's outcome is published: held UNREFs may be answerable now."""
        if self.holds.held:
            self.holds.answer_ready()

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (device torn down synchronously)
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def lane_adopt(
        self, ctx: Context, batches: list[BatchParts]
    ) -> list[tuple[int, Callable[[Any], None]]]:
        """The lane's batches in flight of ``ctx`` come back to Python (lanes.py)."""
        return self.forwarding.lane_adopt(ctx, batches)

    def _destroy_context(self, ctx: Context) -> None:
        self.forwarding.destroy(ctx)
        for rid in ctx.resources:
            if rid in self.resources:
                self.resources.get(rid).contexts.discard(ctx.ctx_id)
        self.contexts.pop(ctx.ctx_id, None)

    # -- binding changes ------------------------------------------------------------
    async def migrate(self, target: AgentTarget) -> MigrationReport:
        """Move the bound GPU's state to ``target`` while the guest runs
        (migration.py); one at a time, refused while unbound. VgpuError (one
        line) when it cannot: the vGPU then keeps its binding."""
        if self.migrating:
            raise VgpuError(ErrorCode.INVALID_ARGUMENT, "a migration of this vGPU is running")
        self.migrating = True
        try:
            return await migrate(self, target, self.migrate_drain_timeout)
        finally:
            self.migrating = False

    def _binding_changed(self) -> None:
        """Unbind / rebind: every in-flight command ends with DEVICE_LOST now
        (the next session of each context gets a new handle epoch)."""
        if self.binding.target is None:
            self.bound_info = unbound_info()
            why = "the GPU was unbound from this vGPU"
        else:
            why = "this vGPU was bound to another GPU (its device memory is gone)"
        for ctx in self.contexts.values():
            self.forwarding.drop_session(ctx, why)

    def status(self) -> dict[str, Any]:
        target = self.binding.target
        for c in list(self.contexts.values()):
            self.forwarding.notice_lost(c)
        return {
            "binding": self.binding.state.value,
            "migrating": self.migrating,
            "target": target.describe() if target else None,
            "contexts": [c.describe() for c in self.contexts.values()],
            "resources": len(self.resources),
            "inflight_bytes": self.inflight_bytes,
            "unrefs_held": len(self.holds.held),
            **self.stats,
            **self.lanes.stats(),
        }
