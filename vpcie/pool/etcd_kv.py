"""The KV interface on etcd: the store for a fleet (several hosts).

Through aetcd's gRPC stubs directly (its high-level calls hide the response
header, and the header's revision is our fencing token). A transaction is an
etcd Txn with version compares; TTL keys are etcd leases. Every key lives
under the URL's prefix (``etcd://host:port/prefix``; default none), so one
cluster can hold several pools, or a test its own.

aetcd pulls in grpc: import this module only where a process talks to etcd
(never in the agent's main process, which forks workers).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from aetcd import rpc

from vpcie.pool.errors import PoolError, StoreUnavailable
from vpcie.pool.kv_types import Compare, Item, LeaseId, TxnResult, prefix_end

RANGE_PAGE = 2000  # keys per Range reply: well under gRPC's 4 MiB message cap
DEFAULT_TIMEOUT = 10.0  # seconds per call: a cluster without a leader must not hang a CLI


class EtcdKV:
    def __init__(
        self, endpoints: list[tuple[str, int]], prefix: str = "", timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.timeout = timeout
        self._channel: Any = None
        self._kv: Any = None
        self._lease: Any = None

    @classmethod
    def from_url(cls, url: str) -> EtcdKV:
        parts = urlsplit(url)
        endpoints = []
        for hp in (parts.netloc or "").split(","):
            host, sep, port = hp.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise PoolError(f"pool URL {url!r}: want etcd://HOST:PORT[,HOST:PORT][/prefix]")
            endpoints.append((host.strip("[]"), int(port)))
        return cls(endpoints, parts.path.rstrip("/"))

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return f"EtcdKV(etcd://{hosts}{self.prefix})"

    def _target(self) -> str:
        try:  # gRPC balances over a static list of IP literals; a name: the first one
            ips = [ipaddress.ip_address(h) for h, _ in self.endpoints]
        except ValueError:
            return f"{self.endpoints[0][0]}:{self.endpoints[0][1]}"
        if all(ip.version == 4 for ip in ips):
            return "ipv4:" + ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in self.endpoints)

    def _stubs(self) -> tuple[Any, Any]:
        if self._channel is None:
            self._channel = rpc.insecure_channel(self._target())
            self._kv = rpc.KVStub(self._channel)
            self._lease = rpc.LeaseStub(self._channel)
        return self._kv, self._lease

    async def _call(self, stub_method: Any, request: Any) -> Any:
        try:
            return await stub_method(request, timeout=self.timeout)
        except rpc.AioRpcError as e:
            where = ",".join(f"{h}:{p}" for h, p in self.endpoints)
            detail = (e.details() or str(e.code())).splitlines()[0]
            if e.code() in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailable(f"etcd at {where}: {detail}") from None
            raise PoolError(f"etcd at {where} refused: {detail}") from None

    def _k(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _item(self, kv: Any) -> Item:
        key = kv.key.decode()[len(self.prefix) :]
        return Item(key, bytes(kv.value), kv.version, kv.mod_revision, kv.create_revision)

    # reads -------------------------------------------------------------

    async def get(self, key: str) -> Item | None:
        kvs, _ = self._stubs()
        resp = await self._call(kvs.Range, rpc.RangeRequest(key=self._k(key)))
        return self._item(resp.kvs[0]) if resp.kvs else None

    async def range(self, prefix: str, min_mod_revision: int = 0) -> list[Item]:
        """In pages of RANGE_PAGE keys, every page read at the first page's
        revision: one snapshot, however large (a 1,000-agent fleet is ~12 MB)."""
        kvs, _ = self._stubs()
        start, end = self._k(prefix), self._k(prefix_end(prefix))
        out: list[Item] = []
        revision = 0
        while True:
            req = rpc.RangeRequest(
                key=start,
                range_end=end,
                limit=RANGE_PAGE,
                revision=revision,
                min_mod_revision=min_mod_revision,
            )
            resp = await self._call(kvs.Range, req)
            out += [self._item(kv) for kv in resp.kvs]
            revision = revision or int(resp.header.revision)
            if not resp.more or not resp.kvs:
                return out
            start = bytes(resp.kvs[-1].key) + b"\0"

    # writes ------------------------------------------------------------

    async def txn(
        self,
        compares: list[Compare],
        puts: list[tuple[str, bytes]],
        deletes: list[str],
        ttl_puts: list[tuple[str, bytes, LeaseId]] = [],  # noqa: B006
    ) -> TxnResult:
        kvs, _ = self._stubs()
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=self._k(k), value=v)) for k, v in puts]
        ops += [
            rpc.RequestOp(request_put=rpc.PutRequest(key=self._k(k), value=v, lease=lid))
            for k, v, lid in ttl_puts
        ]
        ops += [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._k(k)))
            for k in deletes
        ]
        req = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=self._k(c.key),
                    target=rpc.Compare.VERSION,
                    result=rpc.Compare.EQUAL,
                    version=c.version,
                )
                for c in compares
            ],
            success=ops,
        )
        resp = await self._call(kvs.Txn, req)
        return TxnResult(bool(resp.succeeded), int(resp.header.revision))

    async def grant_ttl(self, seconds: float) -> LeaseId:
        if seconds <= 0:
            raise PoolError(f"a TTL must be positive, not {seconds}")
        _, leases = self._stubs()
        # etcd counts whole seconds (and raises anything under its minimum, 2 s
        # with the default election timeout, to that minimum).
        resp = await self._call(
            leases.LeaseGrant, rpc.LeaseGrantRequest(TTL=max(1, round(seconds)))
        )
        if resp.error:
            raise PoolError(f"etcd refused a TTL lease: {resp.error}")
        return LeaseId(int(resp.ID))

    async def keepalive(self, lease: LeaseId) -> bool:
        _, leases = self._stubs()
        call = leases.LeaseKeepAlive(timeout=self.timeout)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            await call.done_writing()
            reply = await call.read()
        except rpc.AioRpcError as e:
            raise StoreUnavailable(f"etcd keepalive: {e.details() or e.code()}") from None
        finally:
            call.cancel()
        return isinstance(reply, rpc.LeaseKeepAliveResponse) and reply.TTL > 0

    async def revoke(self, lease: LeaseId) -> None:
        _, leases = self._stubs()
        try:
            await self._call(leases.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease))
        except PoolError as e:
            if "not found" not in str(e):
                raise

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await asyncio.shield(channel.close())
