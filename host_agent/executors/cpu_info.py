"""What the inventory needs to know about the CPU executor, without NumPy.

The agent's main process lists ``cpu0`` from these; it must not import NumPy
(OpenBLAS starts threads at import, and the main process forks its workers:
host_agent/spawn.py), so they live apart from host_agent/executors/cpu.py.
"""

from __future__ import annotations

import os

CPU_NAME = "cpu-numpy (not a GPU)"


def host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 1 << 32
