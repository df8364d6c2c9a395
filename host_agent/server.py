"""The agent's main process: accept, hand each connection to a new worker,
own the inventory and the per-device session counts.

The parent never parses a byte from a peer: each accepted socket goes to a
fresh ``python -m host_agent.worker`` (fd passed with pass_fds) together with
a socketpair for JSON-line control messages. A worker that crashes fails only
its own session; the parent logs it, frees its device slot and keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_agent.config import AgentConfig
from host_agent.inventory import Device, Inventory
from host_agent.logs import log
from vpcie.errors import ErrorCode

SESSION_ID_MAX = 0xFFFFFFFF


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


class Agent:
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.port = 0

    # -- device grants ------------------------------------------------------------
    def _pick(self, wanted: str) -> tuple[Device | None, int, str]:
        """(device, status, message) for an OPEN naming ``wanted`` ("" = any)."""
        limit = self.config.max_sessions
        if wanted:
            dev = self.inventory.find(wanted)
            if dev is None:
                return None, ErrorCode.NO_DEVICE, f"no device {wanted!r} on this agent"
            if self.sessions_per_device[dev.id] >= limit:
                return None, ErrorCode.QUOTA_EXCEEDED, f"{wanted} has {limit} sessions (the max)"
            return dev, ErrorCode.OK, ""
        healthy = [d for d in self.inventory.servable if d.healthy]
        if not healthy:
            return None, ErrorCode.NO_DEVICE, "no healthy device on this agent"
        free = [d for d in healthy if self.sessions_per_device[d.id] < limit]
        if not free:
            return None, ErrorCode.QUOTA_EXCEEDED, f"every device has {limit} sessions"
        return min(free, key=lambda d: self.sessions_per_device[d.id]), ErrorCode.OK, ""

    def grant(self, w: WorkerInfo, req: dict[str, Any]) -> dict[str, Any]:
        dev, status, message = self._pick(str(req.get("device", "")))
        if dev is None:
            log("warning", "open_refused", pid=w.pid, device=req.get("device"), reason=message)
            return {"ok": False, "status": int(status), "message": message}
        cap = min(self.config.mem_quota or dev.memory_total, dev.memory_total)
        asked = int(req.get("mem_quota") or 0)
        quota = min(asked, cap) if asked else cap
        inflight_cap = self.config.max_inflight
        asked_if = int(req.get("max_inflight") or 0)
        inflight = min(asked_if, inflight_cap) if asked_if else inflight_cap
        sid = self._next_session
        self._next_session = sid + 1 if sid < SESSION_ID_MAX else 1
        self.sessions_per_device[dev.id] += 1
        w.session, w.device, w.client = sid, dev.id, str(req.get("client", ""))
        return {
            "ok": True,
            "session": sid,
            "device": dev.to_json(),
            "mem_quota": quota,
            "max_inflight": inflight,
        }

    def release(self, w: WorkerInfo) -> None:
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
                }
                for w in self.workers.values()
            ],
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    # -- workers -------------------------------------------------------------------------
    async def _run_worker(self, conn: socket.socket, peer: str) -> None:
        parent_ctl, child_ctl = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "host_agent.worker",
                "--conn-fd",
                str(conn.fileno()),
                "--ctl-fd",
                str(child_ctl.fileno()),
                pass_fds=(conn.fileno(), child_ctl.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            log("error", "worker_spawn_failed", peer=peer, error=str(exc))
            conn.close()
            parent_ctl.close()
            child_ctl.close()
            return
        finally:
            conn.close()  # the worker has its own copy
            child_ctl.close()
        w = WorkerInfo(proc.pid, peer)
        self.workers[proc.pid] = w
        log("info", "worker_started", pid=proc.pid, peer=peer)
        reader, writer = await asyncio.open_connection(sock=parent_ctl)
        try:
            writer.write(json.dumps({"config": json.loads(self.config.to_json())}).encode() + b"\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                op = msg.get("op")
                if op == "open":
                    w.peer = str(msg.get("peer") or peer)
                    writer.write(json.dumps(self.grant(w, msg)).encode() + b"\n")
                    await writer.drain()
                    self.write_state()
                elif op == "bound":
                    w.env = dict(msg.get("env", {}))
                    w.executor = str(msg.get("executor", ""))
                    log(
                        "info",
                        "session_bound",
                        pid=w.pid,
                        session=w.session,
                        device=w.device,
                        cuda_visible_devices=w.env.get("CUDA_VISIBLE_DEVICES", ""),
                        executor=w.executor,
                    )
                    self.write_state()
                elif op == "end":
                    log(
                        "info",
                        "session_closed",
                        pid=w.pid,
                        session=w.session,
                        reason=msg.get("reason"),
                    )
        except (ConnectionError, ValueError) as exc:
            log("warning", "worker_control_error", pid=w.pid, error=str(exc))
        finally:
            writer.close()
            rc = await proc.wait()
            self.release(w)
            del self.workers[proc.pid]
            level = "info" if rc == 0 else "error"
            log(level, "worker_exited", pid=proc.pid, session=w.session, returncode=rc)
            self.write_state()

    async def serve(self) -> None:
        lsock = socket.socket(socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(self.listen)
        lsock.listen(128)
        lsock.setblocking(False)
        self.port = lsock.getsockname()[1]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.write_state()
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
        log("info", "stopping", workers=len(self.workers))
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                log("error", "accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(True)
            task = asyncio.create_task(self._run_worker(conn, f"{addr[0]}:{addr[1]}"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
