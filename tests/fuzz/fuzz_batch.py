"""atheris fuzz target: the vGPU batch parser (decode_batch), the bytes a
guest writes into SUBMIT_3D and a backend sends in a COMMAND frame.

The only allowed exception is ProtocolError. Beyond that, per input:

* decode_batch and construct (BATCH.parse) agree: both accept with equal
  records, or both reject (differential, STYLE.md habit 7);
* an accepted batch re-encodes (encode_batch) to a batch that decodes to the
  same records, with the same length.

Bounded run (what CI does via tests/fuzz/test_fuzz_protocol.py)::

    .venv/bin/python tests/fuzz/fuzz_batch.py --seeds /tmp/batch_corpus
    .venv/bin/python tests/fuzz/fuzz_batch.py -runs=10000 -max_total_time=20 /tmp/batch_corpus

Longer by hand (an hour, 2 workers, keep the corpus between runs)::

    .venv/bin/python tests/fuzz/fuzz_batch.py -max_total_time=3600 -jobs=2 /tmp/batch_corpus

A crash leaves ``crash-*`` in the working directory; replay it with
``.venv/bin/python tests/fuzz/fuzz_batch.py crash-<hash>``.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import atheris
import construct  # noqa: F401  (imported first: instrument vpcie, not construct)

with atheris.instrument_imports():
    from vpcie.errors import ProtocolError
    from vpcie.protocol import batch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from tests.unit._protocol_samples import canon, construct_batch

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "protocol"


def test_one_input(data: bytes) -> None:
    try:
        records = batch.decode_batch(data)
    except ProtocolError:
        records = None
    try:
        ref: Any = construct_batch(data)[1]
    except ProtocolError:
        ref = None
    if records is None or ref is None:
        assert records is None and ref is None, "decode_batch and construct disagree on validity"
        return
    assert canon(records) == canon(ref), "decode_batch and construct disagree on values"
    (flags, length) = struct.unpack_from("<HI", data, 6)
    again = batch.encode_batch(records, flags=flags)
    assert len(again) == length
    assert canon(batch.decode_batch(again)) == canon(records)


def write_seeds(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for path in sorted(GOLDEN.glob("batch_*.bin")):
        shutil.copyfile(path, corpus / f"seed-{path.stem}")
    command = (GOLDEN / "frame_command.bin").read_bytes()[24:]
    (corpus / "seed-command-payload").write_bytes(command)


def main(argv: list[str]) -> Any:
    if len(argv) == 3 and argv[1] == "--seeds":
        write_seeds(Path(argv[2]))
        return 0
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
