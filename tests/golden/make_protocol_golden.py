"""(Re)write tests/golden/protocol/*.bin from the samples, with construct.

    .venv/bin/python tests/golden/make_protocol_golden.py [--check]

Deterministic: the same definitions and samples always give the same bytes.
The tests compare against the *committed* files; rerun this only when a wire
format changes on purpose, and review the diff. ``--check`` writes nothing and
exits 1 if any file would change.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.unit._protocol_samples import GOLDEN_DIR, golden_files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, data in sorted(golden_files().items()):
        path = GOLDEN_DIR / f"{name}.bin"
        if path.exists() and path.read_bytes() == data:
            continue
        stale.append(path.name)
        if not check:
            path.write_bytes(data)
    verb = "would change" if check else "written"
    print(f"{len(stale)} golden file(s) {verb}: {' '.join(stale) or '-'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
