"""The generated C wire header (vpcie/_native/vpcie_wire.h) against its source,
the construct definitions in vpcie/protocol/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import construct as c
import pytest

from vpcie.protocol import batch, cheader, codes, frames
from vpcie.protocol.codes import Opcode

ROOT = Path(__file__).resolve().parents[2]


def test_committed_header_is_current() -> None:
    committed = cheader.HEADER_PATH.read_text()
    assert committed == cheader.render(), (
        f"{cheader.HEADER_PATH.name} is stale: run `{cheader.COMMAND}`, rebuild "
        "(python -m vpcie._native._build) and commit the header"
    )


def test_stale_header_is_caught_when_a_layout_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field added on the Python side only: the header no longer matches."""
    grown = c.Struct(*batch.MEM_FREE.subcons, "extra" / c.Int32ul)
    monkeypatch.setitem(cheader.BATCH_LAYOUTS, "MEM_FREE", grown)
    monkeypatch.setitem(batch.BODIES, Opcode.MEM_FREE, grown)
    text = cheader.render()
    assert text != cheader.HEADER_PATH.read_text()
    assert "#define VPCIE_MEM_FREE_SIZE 8u" in text
    assert "case VPCIE_OP_MEM_FREE: return 8;" in text


def test_offsets_and_sizes_come_from_construct() -> None:
    """Every fixed field's offset is where construct puts it in a built message."""
    for st in (batch.SIGNAL, batch.COPY_D2D, batch.RECORD_HEADER, frames.HEADER):
        fields, size, fixed = cheader.layout(st)
        assert fixed and size == st.sizeof()
        for name, off in fields:
            values = {n: 0 for n, _ in fields}
            values[name] = 1  # little-endian: the field's first byte is its offset
            raw = st.build(values)
            assert raw.index(b"\x01") == off, name
    fields, size, fixed = cheader.layout(frames.COMPLETION)
    assert not fixed and size == 8 and [n for n, _ in fields][-1] == "message"


def test_header_compiles_alone_with_stdint_only(tmp_path: Path) -> None:
    """Self-contained: the guest's CUDA shim includes it with nothing before it."""
    src = tmp_path / "t.c"
    src.write_text(
        '#include "vpcie_wire.h"\n'
        "int main(void) { return vpcie_body_size(VPCIE_OP_NOP) + (int)VPCIE_OPCODES - 34; }\n"
    )
    subprocess.run(
        ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror",
         f"-I{cheader.HEADER_PATH.parent}", "-o", str(tmp_path / "t"), str(src)],
        check=True,
    )  # fmt: skip
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


def test_every_opcode_and_cap_is_in_the_header() -> None:
    text = cheader.HEADER_PATH.read_text()
    for op in Opcode:
        assert f"#define VPCIE_OP_{op.name} {int(op)}u\n" in text
    assert f"#define VPCIE_BATCH_MAGIC {codes.BATCH_MAGIC:#x}u\n" in text
    assert f"#define VPCIE_FRAME_HEADER_SIZE {frames.HEADER_SIZE}u\n" in text


def test_cli_rejects_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vpcie.protocol.cheader", "--bogus"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "usage:" in out.stderr
