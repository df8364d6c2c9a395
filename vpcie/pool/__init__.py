"""The GPU pool: agents, devices, vGPUs, leases, the scheduler, two stores.

The pool imports nothing of the data plane (lint-imports checks it): it is
state and decisions; ``vpcie.fleet`` connects it to agents and backends.
"""

from vpcie.pool.errors import Conflict, NoCapacity, NotFound, PoolError, StoreUnavailable
from vpcie.pool.kv import KV, Compare, Item, LeaseId, TxnResult, open_kv
from vpcie.pool.model import Agent, Gpu, Lease, Request, Usage, Vgpu
from vpcie.pool.pool import Pool
from vpcie.pool.scheduler import place

__all__ = [
    "KV", "Agent", "Compare", "Conflict", "Gpu", "Item", "Lease", "LeaseId", "NoCapacity",
    "NotFound", "Pool", "PoolError", "Request", "StoreUnavailable", "TxnResult", "Usage",
    "Vgpu", "open_kv", "place",
]  # fmt: skip
