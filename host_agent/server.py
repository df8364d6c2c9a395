"""The agent's main process: accept, admit, grant a device, fork a worker.

Before a connection has authenticated it costs a socket and a few KB here:
TLS, HELLO, AUTH and OPEN run on this process's asyncio loop with
non-blocking sockets (host_agent/admission.py: one deadline each, caps on
how many are pending in all and per source address). Only an authenticated
OPEN that gets a device slot gets a process: ``os.fork()`` of this one
(host_agent/spawn.py), which inherits the live connection and serves the
session (host_agent/worker.py). A worker that crashes fails only its own
session; this process learns of its exit from a pidfd, frees its device slot
and keeps serving. The main process never starts a thread (fork needs that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from host_agent.admission import (
    Admitted,
    PendingTable,
    admit,
    auth_mode,
    close_refused,
    linger_close,
    send_all,
)
from host_agent.config import AgentConfig
from host_agent.fencing import Fences, Verdict, malformed
from host_agent.fencing import save as save_fences
from host_agent.handshake import (
    OpenRequest,
    ServerHandshake,
    error_frame,
    inventory_reply_frame,
    open_reply_frame,
)
from host_agent.inventory import Device, Inventory
from host_agent.logs import log
from host_agent.spawn import ForkRefused, fork_worker, native_threads
from host_agent.worker import Grant
from host_agent.worker import run as run_worker
from vpcie.errors import AuthError, ErrorCode, ProtocolError
from vpcie.protocol.codes import PROTOCOL_VERSION

SESSION_ID_MAX = 0xFFFFFFFF
LISTEN_BACKLOG = 1024  # a burst of connects waits in the kernel, not refused
MIN_USER_TIMEOUT_S = 5.0  # TCP_USER_TIMEOUT floor: a lossy link retransmits for a while
REFUSE_SEND_S = 1.0  # how long a refusal (ERROR / OPEN_REPLY) may take to leave
INVENTORY_SEND_S = 5.0  # how long an INVENTORY reply may take to leave
FENCE_KILL_S = 1.0  # a fenced-out worker gets SIGTERM, then SIGKILL after this


@dataclass
class _Pending:
    """A connection in admission: its task, its socket (raw, then TLS)."""

    task: asyncio.Task[None]
    sock: list[socket.socket]
    peer: str


@dataclass
class WorkerInfo:
    pid: int
    peer: str
    started: float = field(default_factory=time.time)
    session: int = 0
    device: str = ""
    client: str = ""
    env: dict[str, str] = field(default_factory=dict)
    executor: str = ""
    lease_token: int = 0  # OPEN's: the pool lease this session was opened under
    lease_live: tuple[int, ...] = ()  # OPEN's: the leases live at its creation (fencing.py)
    fenced: bool = False  # a newer lease on its device, not live with it, ended it


class Agent:
    # Called with the port once listening (vpcie-agent serve --pool starts its registrar).
    on_listening: Callable[[int], None] | None = None

    def __init__(
        self,
        config: AgentConfig,
        inventory: Inventory,
        listen: tuple[str, int],
        state_file: Path | None = None,
    ) -> None:
        self.config = config
        self.inventory = inventory
        self.listen = listen
        self.state_file = state_file
        self.workers: dict[int, WorkerInfo] = {}
        self.sessions_per_device: dict[str, int] = {d.id: 0 for d in inventory.servable}
        self._next_session = 1
        self.fences = Fences()  # main.py loads --fence-file into it
        self.fence_file: Path | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.port = 0
        # Admission: pending (unauthenticated) connections by key, oldest first.
        self.pending = PendingTable(config.max_handshakes, config.max_handshakes_per_source)
        self._admitting: dict[int, _Pending] = {}
        self._next_key = 0
        self._lingering = 0  # refused connections being closed slowly (linger_close)
        self._mode = auth_mode(config.auth)
        self._psk = bytes.fromhex(config.psk_hex) if config.auth == "psk" else b""
        self._ssl: ssl.SSLContext | None = None
        if config.auth == "tls":
            from host_agent.tls import server_context

            self._ssl = server_context(config.ca_file, config.cert_file, config.key_file)

    # -- device grants ------------------------------------------------------------
    def _pick(self, wanted: str) -> tuple[Device | None, int, str]:
        """(device, status, message) for an OPEN naming ``wanted`` ("" = any).
        A named device's session limit is checked by ``grant``, after fencing
        (a newer lease frees the slots of the sessions it fences out)."""
        limit = self.config.max_sessions
        if wanted:
            dev = self.inventory.find(wanted)
            if dev is None:
                return None, ErrorCode.NO_DEVICE, f"no device {wanted!r} on this agent"
            return dev, ErrorCode.OK, ""
        healthy = [d for d in self.inventory.servable if d.healthy]
        if not healthy:
            return None, ErrorCode.NO_DEVICE, "no healthy device on this agent"
        free = [d for d in healthy if self.sessions_per_device[d.id] < limit]
        if not free:
            return None, ErrorCode.QUOTA_EXCEEDED, f"every device has {limit} sessions"
        return min(free, key=lambda d: self.sessions_per_device[d.id]), ErrorCode.OK, ""

    def grant(self, req: OpenRequest) -> Grant | tuple[int, str]:
        """A session for ``req``, counted against its device; or (status, why)."""
        bad = malformed(req.lease_token, req.lease_live)
        if bad:  # before picking a device: the set is wrong whatever the device
            return int(ErrorCode.INVALID_ARGUMENT), bad
        dev, status, message = self._pick(req.device)
        if dev is None:
            return int(status), message
        decision = self.fences.admit(dev.id, req.lease_token, req.lease_live)
        if decision.verdict is Verdict.STALE:
            return int(ErrorCode.STALE_LEASE), decision.message
        if decision.verdict is Verdict.MALFORMED:  # checked above; kept for the type's sake
            return int(ErrorCode.INVALID_ARGUMENT), decision.message
        if decision.verdict is Verdict.RAISED:
            self._fence_out(dev.id, req.lease_token, self.fences.live(dev.id))
        limit = self.config.max_sessions
        if self.sessions_per_device[dev.id] >= limit:
            return int(ErrorCode.QUOTA_EXCEEDED), f"{dev.id} has {limit} sessions (the max)"
        cap = min(self.config.mem_quota or dev.memory_total, dev.memory_total)
        quota = min(req.mem_quota, cap) if req.mem_quota else cap
        inflight_cap = self.config.max_inflight
        inflight = min(req.max_inflight, inflight_cap) if req.max_inflight else inflight_cap
        sid = self._next_session
        self._next_session = sid + 1 if sid < SESSION_ID_MAX else 1
        self.sessions_per_device[dev.id] += 1
        return Grant(sid, dev.to_json(), quota, inflight, req.client, req.handle_epoch)

    def _fence_out(self, device: str, newest: int, live: frozenset[int]) -> None:
        """Lease ``newest`` is now the newest for ``device``: persist that, and
        end every session there opened under a token not in ``live`` (its lease
        was released before lease ``newest`` was created; SIGTERM, SIGKILL
        after FENCE_KILL_S). Their device slots are free at once."""
        if self.fence_file is not None:
            try:
                save_fences(self.fences, self.fence_file)
            except OSError as exc:  # the fence holds in memory; say that it may not survive
                log("error", "fence_file_write_failed", path=str(self.fence_file), error=str(exc))
        for w in list(self.workers.values()):
            if w.device != device or w.lease_token in live or w.fenced:
                continue
            w.fenced = True
            log("warning", "fenced_out", pid=w.pid, session=w.session, device=device,
                lease_token=w.lease_token, newer=newest)  # fmt: skip
            self.release(w)
            self._kill(w.pid, signal.SIGTERM)
            loop = asyncio.get_running_loop()
            loop.call_later(FENCE_KILL_S, self._kill_if_alive, w)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _kill_if_alive(self, w: WorkerInfo) -> None:
        if self.workers.get(w.pid) is w:  # not yet reaped (a reaped pid may be reused)
            self._kill(w.pid, signal.SIGKILL)

    def release(self, w: WorkerInfo) -> None:
        """Free ``w``'s device slot (once)."""
        if w.device:
            self.sessions_per_device[w.device] -= 1
            w.device = ""

    # -- state file ------------------------------------------------------------------
    def write_state(self) -> None:
        if self.state_file is None:
            return
        state = {
            "agent": self.config.agent_name,
            "listen": f"{self.listen[0]}:{self.port}",
            "pid": os.getpid(),
            "inventory": self.inventory.to_json(),
            "fences": self.fences.to_json(),
            "sessions": [
                {
                    "session": w.session,
                    "pid": w.pid,
                    "device": w.device,
                    "client": w.client,
                    "peer": w.peer,
                    "env": w.env,
                    "executor": w.executor,
                    "started": w.started,
                    "lease_token": w.lease_token,
                    "lease_live": list(w.lease_live),
                    "fenced": w.fenced,
                }
                for w in self.workers.values()
            ],
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    # -- admission (before authentication) ----------------------------------------
    def _tune(self, conn: socket.socket) -> None:
        """Per-connection TCP settings: no Nagle (small frames), and a peer
        that vanished (partition, powered off) is found by the kernel too:
        data unacknowledged for TCP_USER_TIMEOUT ends the connection, and
        keepalive probes an idle one (the user timeout bounds them as well)."""
        idle = self.config.idle_timeout
        user_timeout_ms = int(max(idle, MIN_USER_TIMEOUT_S) * 1000)
        opts = [
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle / 2))),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5),
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms),
        ]
        for level, opt, value in opts:
            with contextlib.suppress(OSError):  # AF_UNIX in tests, old kernels
                conn.setsockopt(level, opt, value)

    def _admit_new(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        key, self._next_key = self._next_key, self._next_key + 1
        for old in self.pending.add(key, addr[0]):
            evicted = self._admitting.get(old)
            if evicted is not None:  # the oldest pending one over a cap
                log("warning", "handshake_evicted", peer=evicted.peer, pending=len(self.pending))
                evicted.task.cancel()
        peer = f"{addr[0]}:{addr[1]}"
        holder = [conn]  # becomes the SSLSocket once TLS starts
        task = asyncio.create_task(self._admission(key, holder, peer))
        self._admitting[key] = _Pending(task, holder, peer)

        def done(_t: asyncio.Task[None]) -> None:
            # Whatever ended it (even a cancel before its first step), after
            # its own cleanup (readers removed): the socket is closed here.
            del self._admitting[key]
            self.pending.remove(key)
            holder[0].close()

        task.add_done_callback(done)

    async def _refuse(self, sock: socket.socket, frame: bytes) -> None:
        """Tell a refused peer why, if it takes the bytes within a second."""
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(REFUSE_SEND_S):
                await send_all(sock, frame)

    async def _admission(self, key: int, current: list[socket.socket], peer: str) -> None:
        cfg, conn = self.config, current[0]
        hs = ServerHandshake(self._mode, cfg.agent_name, self._psk)
        admitted: Admitted | None = None
        refused = False  # told why (ERROR frame or TLS alert): linger so it arrives
        try:
            async with asyncio.timeout(cfg.auth_timeout):
                admitted = await admit(conn, self._ssl, hs, lambda t: current.__setitem__(0, t))
        except TimeoutError:
            log("warning", "auth_timeout", peer=peer, state=hs.state.value,
                error=f"not authenticated within {cfg.auth_timeout:g} s")  # fmt: skip
        except AuthError as exc:
            log("warning", "auth_refused", error=str(exc), peer=hs.client_name or peer)
            refused = True
            self.pending.remove(key)
            await self._refuse(current[0], error_frame(ErrorCode.PERMISSION_DENIED, str(exc)))
        except ProtocolError as exc:
            log("warning", "handshake_protocol_error", error=str(exc), peer=peer)
            refused = True
            self.pending.remove(key)
            await self._refuse(current[0], error_frame(ErrorCode.PROTOCOL, str(exc)))
        except ssl.SSLError as exc:
            log("warning", "tls_refused", error=str(exc), peer=peer)
            refused = True
        except OSError as exc:
            log("info", "handshake_lost", error=str(exc), peer=peer)
        except Exception as exc:  # our bug: loud in the log, and the peer is dropped
            log("error", "admission_crashed", error=repr(exc), peer=peer)
        finally:
            self.pending.remove(key)
        if admitted is not None and admitted.open is None:  # INVENTORY: answer, close
            try:
                await self._inventory(admitted, peer)
            finally:
                admitted.sock.close()
            return
        if admitted is None:
            if refused and self._lingering < cfg.max_handshakes:
                self._lingering += 1
                try:
                    await linger_close(current[0], REFUSE_SEND_S)
                finally:
                    self._lingering -= 1
            else:
                close_refused(current[0])
            return
        try:
            await self._open(admitted, peer)
        finally:
            # The worker has its own copy; close ours WITHOUT close_notify (an
            # SSLSocket's close() sends nothing), so its TLS stream goes on.
            admitted.sock.close()

    # -- inventory ---------------------------------------------------------------------
    def inventory_document(self) -> dict[str, object]:
        """INVENTORY's JSON (docs/PROTOCOL.md "Inventory")."""
        return {
            "agent": self.config.agent_name,
            "version": PROTOCOL_VERSION,
            "inventory": self.inventory.to_json(),
            "sessions": dict(self.sessions_per_device),
            "fences": self.fences.newest(),
            "max_sessions": self.config.max_sessions,
        }

    async def _inventory(self, adm: Admitted, peer: str) -> None:
        """Answered here, in the main process: no worker, no device slot."""
        doc = json.dumps(self.inventory_document()).encode()
        try:
            frame = inventory_reply_frame(doc)
        except ProtocolError:  # over MAX_INVENTORY_PAYLOAD: say so rather than cut it
            frame = error_frame(ErrorCode.INTERNAL, f"inventory of {len(doc)} bytes is too big")
        log("info", "inventory_sent", peer=adm.peer_cn or adm.client_name or peer, bytes=len(doc))
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(INVENTORY_SEND_S):
                await send_all(adm.sock, frame)
        # A FIN after the reply (unread bytes from the client would make it a RST).
        close_refused(adm.sock)

    # -- workers ---------------------------------------------------------------------
    async def _open(self, adm: Admitted, peer: str) -> None:
        assert adm.open is not None
        grant = self.grant(adm.open)
        if not isinstance(grant, Grant):
            status, message = grant
            log("warning", "open_refused", peer=peer, device=adm.open.device, reason=message)
            await self._refuse(adm.sock, open_reply_frame(status, 0, message, b""))
            return
        parent_ctl, child_ctl = socket.socketpair()
        conn, cfg = adm.sock, self.config
        keep = {conn.fileno(), child_ctl.fileno()}
        try:
            pid = fork_worker(keep, lambda: run_worker(conn, child_ctl, grant, cfg))
        except (OSError, ForkRefused) as exc:
            log("error", "worker_spawn_failed", peer=peer, error=str(exc))
            self.sessions_per_device[grant.device["id"]] -= 1
            parent_ctl.close()
            await self._refuse(conn, open_reply_frame(ErrorCode.INTERNAL, 0, str(exc), b""))
            return
        finally:
            child_ctl.close()
        w = WorkerInfo(pid, adm.peer_cn or adm.client_name or peer)
        w.session, w.device, w.client = grant.session, grant.device["id"], grant.client
        w.lease_token, w.lease_live = adm.open.lease_token, adm.open.lease_live
        self.workers[pid] = w
        log("info", "worker_started", pid=pid, peer=peer, session=w.session, device=w.device)
        self.write_state()
        task = asyncio.create_task(self._watch_worker(w, parent_ctl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_worker(self, w: WorkerInfo, ctl: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(w.pid)
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await self._read_control(w, ctl)
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(w.pid, 0)
            rc = os.waitstatus_to_exitcode(status)
            self.release(w)
            del self.workers[w.pid]
            level = "info" if rc == 0 or w.fenced else "error"  # fenced: ended on purpose
            log(level, "worker_exited", pid=w.pid, session=w.session, returncode=rc)
            self.write_state()

    async def _read_control(self, w: WorkerInfo, ctl: socket.socket) -> None:
        """The worker's JSON lines until it closes its end (it exited)."""
        reader, writer = await asyncio.open_connection(sock=ctl)
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                op = msg.get("op")
                if op == "bound":
                    w.env = {str(k): str(v) for k, v in dict(msg.get("env", {})).items()}
                    w.executor = str(msg.get("executor", ""))
                    log("info", "session_bound", pid=w.pid, session=w.session, device=w.device,
                        cuda_visible_devices=w.env.get("CUDA_VISIBLE_DEVICES", ""),
                        executor=w.executor)  # fmt: skip
                    self.write_state()
                elif op == "end":
                    log("info", "session_closed", pid=w.pid, session=w.session,
                        reason=msg.get("reason"))  # fmt: skip
        except (ConnectionError, ValueError) as exc:
            log("warning", "worker_control_error", pid=w.pid, error=str(exc))
        finally:
            writer.close()

    async def serve(self) -> None:
        lsock = socket.socket(socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(self.listen)
        lsock.listen(LISTEN_BACKLOG)
        lsock.setblocking(False)
        self.port = lsock.getsockname()[1]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.write_state()
        if self.on_listening is not None:
            self.on_listening(self.port)
        if (threads := native_threads()) != 1:  # fork_worker refuses Python threads itself
            log("warning", "main_process_threads", threads=threads, hint="forks may be unsafe")
        log(
            "info",
            "listening",
            address=f"{self.listen[0]}:{self.port}",
            auth=self.config.auth,
            executor=self.config.executor,
            devices=",".join(d.id for d in self.inventory.servable),
            inventory=self.inventory.source,
        )
        accept_task = asyncio.create_task(self._accept_loop(lsock))
        await self._stop.wait()
        accept_task.cancel()
        lsock.close()
        log("info", "stopping", workers=len(self.workers), pending=len(self.pending))
        for p in list(self._admitting.values()):
            p.task.cancel()
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE: the caps above keep this rare
                log("error", "accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self._tune(conn)
            self._admit_new(conn, addr)
