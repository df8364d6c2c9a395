"""What an agent serves: GPUs, MIG slices, or one CPU executor device.

A GPU in MIG mode is listed but not served itself (CUDA cannot use it
directly); its MIG devices are. Without NVML (no driver) the agent serves one
CPU executor device, ``cpu0``, and says so.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from host_agent.executors.cpu_info import CPU_NAME, host_memory_bytes
from host_agent.nvml import Nvml

CPU_DEVICE = "cpu0"
_MIG_PROFILE = re.compile(r"(\d+g\.\d+gb(?:\+\w+)?)")


@dataclass
class Device:
    id: str  # GPU or MIG UUID, or "cpu0"
    kind: str  # "gpu" | "mig" | "cpu"
    name: str
    memory_total: int
    memory_free: int
    index: int = 0
    parent: str = ""  # a MIG device's GPU UUID
    profile: str = ""  # a MIG device's profile, e.g. "1g.18gb"
    cc_major: int = 0
    cc_minor: int = 0
    servable: bool = True
    health: dict[str, int | None] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        bad = ("ecc_uncorrected", "remap_failure")
        return not any((self.health.get(k) or 0) > 0 for k in bad)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["healthy"] = self.healthy
        return out


@dataclass
class Inventory:
    devices: list[Device]
    source: str  # "nvml", "fake NVML from ...", or why NVML is missing

    @property
    def servable(self) -> list[Device]:
        return [d for d in self.devices if d.servable]

    @property
    def has_gpu(self) -> bool:
        return any(d.kind != "cpu" for d in self.servable)

    def find(self, device_id: str) -> Device | None:
        for d in self.servable:
            if d.id == device_id:
                return d
        return None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "devices": [d.to_json() for d in self.devices]}


def cpu_device() -> Device:
    mem = host_memory_bytes()
    return Device(CPU_DEVICE, "cpu", CPU_NAME, mem, mem)


def discover(nvml: Nvml | None, source: str) -> Inventory:
    devices: list[Device] = []
    if nvml is not None:
        for i in range(nvml.device_count()):
            h = nvml.handle(i)
            total, free = nvml.memory(h)
            major, minor = nvml.compute_capability(h)
            gpu = Device(
                nvml.uuid(h),
                "gpu",
                nvml.name(h),
                total,
                free,
                index=i,
                cc_major=major,
                cc_minor=minor,
                health=nvml.health(h),
            )
            devices.append(gpu)
            if not nvml.mig_enabled(h):
                continue
            gpu.servable = False
            for j, mh in enumerate(nvml.mig_handles(h)):
                mtotal, mfree = nvml.memory(mh)
                name = nvml.name(mh)
                prof = _MIG_PROFILE.search(name)
                devices.append(
                    Device(
                        nvml.uuid(mh),
                        "mig",
                        name,
                        mtotal,
                        mfree,
                        index=j,
                        parent=gpu.id,
                        profile=prof.group(1) if prof else "",
                        cc_major=major,
                        cc_minor=minor,
                        health=gpu.health,
                    )
                )
    if not any(d.servable for d in devices):
        devices.append(cpu_device())
    return Inventory(devices, source)
