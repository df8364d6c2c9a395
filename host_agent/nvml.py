"""The agent's window on NVML (the hardware boundary; STYLE.md habit 13).

``Nvml`` is the small interface the inventory uses. ``RealNvml`` calls pynvml
(imported lazily: an agent without the NVIDIA driver still runs, on its CPU);
``FakeNvml`` plays a host with GPUs and MIG slices from a JSON description, so
tests can check MIG enumeration, device pinning and selection without one.
The fake is chosen only by the ``VPCIE_AGENT_FAKE_NVML`` variable (a path).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

FAKE_NVML_ENV = "VPCIE_AGENT_FAKE_NVML"


class Nvml(Protocol):
    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def uuid(self, h: Any) -> str: ...
    def name(self, h: Any) -> str: ...
    def memory(self, h: Any) -> tuple[int, int]: ...
    def mig_enabled(self, h: Any) -> bool: ...
    def mig_handles(self, h: Any) -> list[Any]: ...
    def compute_capability(self, h: Any) -> tuple[int, int]: ...
    def health(self, h: Any) -> dict[str, int | None]: ...
    def shutdown(self) -> None: ...


class RealNvml:
    """pynvml, with every optional query guarded (not all GPUs answer all)."""

    def __init__(self) -> None:
        import pynvml  # lazy: absent driver must not break the agent

        self.n = pynvml
        pynvml.nvmlInit()

    def device_count(self) -> int:
        return int(self.n.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return self.n.nvmlDeviceGetHandleByIndex(index)

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def uuid(self, h: Any) -> str:
        return self._text(self.n.nvmlDeviceGetUUID(h))

    def name(self, h: Any) -> str:
        return self._text(self.n.nvmlDeviceGetName(h))

    def memory(self, h: Any) -> tuple[int, int]:
        info = self.n.nvmlDeviceGetMemoryInfo(h)
        return int(info.total), int(info.free)

    def mig_enabled(self, h: Any) -> bool:
        try:
            current, _pending = self.n.nvmlDeviceGetMigMode(h)
        except self.n.NVMLError:
            return False  # not MIG capable
        return bool(current == self.n.NVML_DEVICE_MIG_ENABLE)

    def mig_handles(self, h: Any) -> list[Any]:
        out = []
        for i in range(int(self.n.nvmlDeviceGetMaxMigDeviceCount(h))):
            try:
                out.append(self.n.nvmlDeviceGetMigDeviceHandleByIndex(h, i))
            except self.n.NVMLError:
                continue  # slot without a MIG device
        return out

    def compute_capability(self, h: Any) -> tuple[int, int]:
        try:
            major, minor = self.n.nvmlDeviceGetCudaComputeCapability(h)
            return int(major), int(minor)
        except self.n.NVMLError:
            return 0, 0

    def health(self, h: Any) -> dict[str, int | None]:
        n = self.n
        out: dict[str, int | None] = {
            "ecc_uncorrected": None,
            "retired_pages": None,
            "remapped_rows_uncorrectable": None,
            "remap_failure": None,
        }
        try:
            out["ecc_uncorrected"] = int(
                n.nvmlDeviceGetTotalEccErrors(
                    h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC
                )
            )
        except n.NVMLError:
            pass
        try:
            pages = n.nvmlDeviceGetRetiredPages(
                h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
            )
            out["retired_pages"] = len(pages)
        except n.NVMLError:
            pass
        try:  # Ampere and later remap rows instead of retiring pages
            _corr, unc, _pending, failure = n.nvmlDeviceGetRemappedRows(h)
            out["remapped_rows_uncorrectable"] = int(unc)
            out["remap_failure"] = int(failure)
        except n.NVMLError:
            pass
        return out

    def shutdown(self) -> None:
        try:
            self.n.nvmlShutdown()
        except self.n.NVMLError:
            pass


@dataclass
class _FakeDev:
    uuid: str
    name: str
    memory: int
    cc: tuple[int, int] = (9, 0)
    mig: list[_FakeDev] = field(default_factory=list)
    mig_enabled: bool = False
    health: dict[str, int | None] = field(default_factory=dict)


class FakeNvml:
    """A host described as JSON: ``{"gpus": [{"uuid", "name", "memory",
    "mig": [{"uuid", "name", "memory"}...], "health": {...}}]}``; a GPU with a
    "mig" list is in MIG mode."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.gpus = [self._dev(g) for g in spec.get("gpus", [])]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> FakeNvml:
        return cls(json.loads(Path(path).read_text()))

    def _dev(self, g: dict[str, Any]) -> _FakeDev:
        migs = [self._dev(m) for m in g.get("mig", [])]
        return _FakeDev(
            uuid=str(g["uuid"]),
            name=str(g.get("name", "Fake GPU")),
            memory=int(g.get("memory", 1 << 30)),
            cc=(int(g.get("cc_major", 9)), int(g.get("cc_minor", 0))),
            mig=migs,
            mig_enabled="mig" in g,
            health=dict(g.get("health", {})),
        )

    def device_count(self) -> int:
        return len(self.gpus)

    def handle(self, index: int) -> Any:
        return self.gpus[index]

    def uuid(self, h: Any) -> str:
        return str(h.uuid)

    def name(self, h: Any) -> str:
        return str(h.name)

    def memory(self, h: Any) -> tuple[int, int]:
        return int(h.memory), int(h.memory)

    def mig_enabled(self, h: Any) -> bool:
        return bool(h.mig_enabled)

    def mig_handles(self, h: Any) -> list[Any]:
        return list(h.mig)

    def compute_capability(self, h: Any) -> tuple[int, int]:
        cc: tuple[int, int] = h.cc
        return cc

    def health(self, h: Any) -> dict[str, int | None]:
        return dict(h.health)

    def shutdown(self) -> None:
        pass


def load_nvml() -> tuple[Nvml | None, str]:
    """(nvml, status): the fake if configured, else pynvml, else None + why."""
    fake = os.environ.get(FAKE_NVML_ENV)
    if fake:
        return FakeNvml.from_file(fake), f"fake NVML from {fake}"
    try:
        return RealNvml(), "nvml"
    except ImportError as exc:
        return None, f"pynvml not installed ({exc})"
    except Exception as exc:  # pynvml.NVMLError: no driver / library
        return None, f"NVML unavailable ({exc})"
