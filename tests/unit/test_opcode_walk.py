"""Every opcode walked through every place that must know it: its construct
body, the C body table (the generated header, read through cffi), the agent's
runner table, and a method on both executors. Adding an opcode on one side
only fails here."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from host_agent import runner
from host_agent.executors.base import Executor
from host_agent.executors.cpu import CpuExecutor
from vpcie import _native
from vpcie.protocol import batch
from vpcie.protocol.codes import BACKEND_LOCAL_OPCODES, Opcode

CUDA_SRC = Path(runner.__file__).resolve().parent / "executors" / "cuda.py"
AGENT_OPCODES = [op for op in Opcode if op not in BACKEND_LOCAL_OPCODES]


def _cuda_own_methods() -> set[str]:
    """The methods CudaExecutor defines itself, read from its source (no CuPy,
    no GPU here)."""
    tree = ast.parse(CUDA_SRC.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CudaExecutor"]
    assert [b.id for b in cls.bases if isinstance(b, ast.Name)] == ["Executor"]
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _placeholders() -> set[str]:
    """Executor methods with no behaviour of their own: abstract, or a default
    that only raises NOT_SUPPORTED. The CUDA executor runs every opcode, so it
    must define each of these that an opcode uses."""
    tree = ast.parse(Path(inspect.getfile(Executor)).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Executor"]
    out = set(Executor.__abstractmethods__)
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and len(fn.body) == 1:
            stmt = fn.body[0]
            if isinstance(stmt, ast.Raise) and "NOT_SUPPORTED" in ast.unparse(stmt):
                out.add(fn.name)
    return out


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
def test_opcode_has_a_body_and_a_c_table_entry(op: Opcode) -> None:
    body = batch.BODIES[op]
    _, lib = _native.native()
    got = lib.vpcie_body_size(int(op))
    assert got != lib.VPCIE_BODY_UNKNOWN, f"{op.name} missing from vpcie_wire.h"
    try:
        size = body.sizeof()
    except Exception:
        assert got == lib.VPCIE_BODY_VARIABLE, op.name
    else:
        assert got == size, op.name


def test_c_table_knows_no_other_opcode() -> None:
    _, lib = _native.native()
    known = {int(op) for op in Opcode}
    assert lib.VPCIE_OPCODES == max(known) + 1
    for n in range(lib.VPCIE_OPCODES + 8):
        if n not in known:
            assert lib.vpcie_body_size(n) == lib.VPCIE_BODY_UNKNOWN, n


@pytest.mark.parametrize("op", AGENT_OPCODES, ids=lambda op: op.name)
def test_opcode_runs_on_both_executors(op: Opcode) -> None:
    entry = runner.OPCODES.get(op)
    assert entry is not None, f"{op.name}: no entry in host_agent/runner.py OPCODES"
    assert runner._DISPATCH[int(op)] is entry.run
    if entry.executor is None:  # the runner answers it alone (NOP)
        return
    assert callable(getattr(Executor, entry.executor, None)), f"Executor.{entry.executor}"
    # CPU: its own method, or the interface's NOT_SUPPORTED default (no kernels)
    assert callable(getattr(CpuExecutor, entry.executor, None)), f"CpuExecutor.{entry.executor}"
    if entry.executor in _placeholders():
        assert entry.executor in _cuda_own_methods(), f"CudaExecutor.{entry.executor} missing"


def test_runner_knows_no_other_opcode() -> None:
    """Backend-local records (FENCE_PAGE_SET, SIGNAL) never reach an agent:
    the runner has no entry for them and answers NOT_SUPPORTED."""
    assert set(runner.OPCODES) == set(AGENT_OPCODES)
    assert set(runner._DISPATCH) == {int(op) for op in AGENT_OPCODES}
