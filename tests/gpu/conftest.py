"""GPU tests: run with ``python -m pytest tests/gpu -m gpu`` on a host with an
NVIDIA GPU and CuPy; anywhere else every test here is skipped with the reason."""

from __future__ import annotations

import pytest


def _gpu_reason() -> str | None:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return f"cupy is not importable ({exc.__class__.__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({exc})"
    return None if n > 0 else "no CUDA device (0 found)"


REASON = _gpu_reason()


def pytest_report_header(config: pytest.Config) -> str:
    return f"gpu tests: {'SKIPPED: ' + REASON if REASON else 'CUDA device present'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REASON is None:
        return
    skip = pytest.mark.skip(reason=f"gpu: {REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
