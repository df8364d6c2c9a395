"""Small fleets for the pool tests (and the race workers they spawn)."""

from __future__ import annotations

from vpcie.pool.model import Agent, Gpu

GiB = 1 << 30


def h100(agent: str, n: int, model: str = "NVIDIA H100 80GB HBM3") -> Gpu:
    return Gpu(f"GPU-{agent}-{n}", agent, "gpu", model=model, memory_total=80 * GiB,
               cc_major=9)  # fmt: skip


def mig_gpu(agent: str, n: int, slices: int = 7) -> list[Gpu]:
    """A GPU in MIG mode (listed, not servable) and its 1g.10gb slices."""
    parent = f"GPU-{agent}-{n}"
    out = [Gpu(parent, agent, "gpu", model="NVIDIA H100 80GB HBM3", memory_total=80 * GiB,
               servable=False)]  # fmt: skip
    out += [
        Gpu(f"MIG-{agent}-{n}-{s}", agent, "mig", parent, "NVIDIA H100 80GB HBM3", 10 * GiB,
            "1g.10gb", 9)
        for s in range(slices)
    ]  # fmt: skip
    return out


def agent(name: str, **kw: object) -> Agent:
    kw.setdefault("ttl", 0.0)  # operator-vouched: always up unless a test says otherwise
    return Agent(name, f"127.0.0.1:{7000 + len(name)}", {"psk_file": "/etc/vpcie/psk"}, **kw)  # type: ignore[arg-type]
