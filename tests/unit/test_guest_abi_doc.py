"""docs/GUEST_ABI.md's tables against vpcie/protocol/guest_abi.py, the one
definition of the guest ABI: a row that drifts from the module (or a field the
module has and the page lacks) fails naming that row."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import construct as c
import pytest

from vpcie.errors import ErrorCode
from vpcie.protocol import guest_abi
from vpcie.protocol.frames import QUERY_INFO

DOC = Path(__file__).resolve().parents[2] / "docs" / "GUEST_ABI.md"
Row = tuple[str, ...]


def tables(text: str) -> dict[Row, list[Row]]:
    """Every markdown table of ``text``: its header -> its rows (cells stripped,
    backticks dropped)."""
    found: dict[Row, list[Row]] = {}
    block: list[Row] = []
    for line in [*text.splitlines(), ""]:
        line = line.strip()
        if line.startswith("|"):
            block.append(tuple(cell.strip().strip("`") for cell in line.strip("|").split("|")))
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            found[block[0]] = block[2:]
        block = []
    return found


def table(header: Row) -> list[Row]:
    found = tables(DOC.read_text())
    assert header in found, f"docs/GUEST_ABI.md has no table headed {' | '.join(header)}"
    return found[header]


def layout(struct: c.Struct) -> list[tuple[int, str, str]]:
    """(offset, name, type) of each field: u8..u64, or str for a length-prefixed string."""
    out, offset = [], 0
    for sc in struct.subcons:
        try:
            size = sc.sizeof()
            kind = f"u{8 * size}"
        except c.SizeofError:
            size, kind = 0, "str"  # variable length: last in QUERY_INFO, offsets unused
        out.append((offset, sc.name, kind))
        offset += size
    return out


def check_rows(rows: list[Row], want: Mapping[str, tuple[str, ...]], what: str) -> None:
    """Each row's cells (after the name) against ``want[name]``; then both ways
    that no name is missing."""
    for row in rows:
        name = row[0]
        assert name in want, f"docs/GUEST_ABI.md {what} row {row}: no such field in guest_abi"
        assert row[1 : 1 + len(want[name])] == want[name], (
            f"docs/GUEST_ABI.md {what} row {row}: guest_abi says {want[name]}"
        )
    missing = set(want) - {row[0] for row in rows}
    assert not missing, f"docs/GUEST_ABI.md {what} table lacks rows for {sorted(missing)}"


def test_constants_table() -> None:
    names = [
        "CAPSET_ID", "CAPSET_VERSION", "CAPSET_SIZE", "FENCE_MAGIC", "FENCE_VERSION",
        "FENCE_PAGE_SIZE", "REPLY_SLOT", "REPLY_SLOTS",
    ]  # fmt: skip
    want = {n: (str(getattr(guest_abi, n)),) for n in names}
    rows = [(n, str(int(v, 0)), *rest) for n, v, *rest in table(("constant", "value", "meaning"))]
    check_rows(rows, want, "constants")


def test_capset_payload_table() -> None:
    fields = layout(QUERY_INFO)
    rows = table(("field", "type", "meaning"))
    check_rows(rows, {name: (kind,) for _off, name, kind in fields}, "capset payload")
    order = [name for _off, name, _kind in fields]
    assert [r[0] for r in rows] == order, f"docs/GUEST_ABI.md capset rows not in wire order {order}"


@pytest.mark.parametrize(
    ("header", "struct"),
    [
        (("offset", "field", "type", "meaning"), guest_abi.FENCE_HEADER),
        (("slot offset", "field", "type", "meaning"), guest_abi.FENCE_SLOT),
    ],
)
def test_fence_page_tables(header: Row, struct: c.Struct) -> None:
    want = {name: (str(off), kind) for off, name, kind in layout(struct)}
    rows = [(name, off, kind, *rest) for off, name, kind, *rest in table(header)]
    check_rows(rows, want, header[0])


def test_fence_page_size_is_header_plus_slots() -> None:
    sizes = (guest_abi.FENCE_HEADER_SIZE, guest_abi.FENCE_SLOT_SIZE, guest_abi.FENCE_SLOTS)
    assert guest_abi.FENCE_PAGE_SIZE == sizes[0] + sizes[1] * sizes[2]
    text = DOC.read_text()
    phrase = f"slot s at\n  byte {sizes[0]} + {sizes[1]}·s"
    assert phrase in text, f"docs/GUEST_ABI.md should say where slot s is: {phrase!r}"


def test_error_table_names_real_codes() -> None:
    for row in table(("code", "when")):
        assert row[0] in ErrorCode.__members__, f"docs/GUEST_ABI.md errors row {row}: no such code"


def test_a_drifted_row_is_named() -> None:
    """The checks above can fail: a page with one wrong value fails naming it."""
    text = DOC.read_text().replace("| CAPSET_SIZE | 256 |", "| CAPSET_SIZE | 128 |")
    rows = tables(text)[("constant", "value", "meaning")]
    want = {"CAPSET_SIZE": (str(guest_abi.CAPSET_SIZE),)}
    with pytest.raises(AssertionError, match=r"constants row \('CAPSET_SIZE', '128'\)"):
        check_rows([r[:2] for r in rows if r[0] == "CAPSET_SIZE"], want, "constants")
