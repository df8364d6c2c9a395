"""The device's named request fields are the construct definitions' fields.

``wire.DECODERS`` unpacks each virtio-gpu request with the one struct derived
from its construct definition into a named tuple named after that
definition's fields; the handlers read ``f.resource_id``, never ``f[6]``.
This checks, on random and on hostile bytes, that every field reads what
construct reads under the same name.
"""

from __future__ import annotations

import random

import pytest

from vpcie.protocol import virtio_gpu as wire

CMDS = sorted(wire.REQUESTS, key=int)


def _construct_fields(cmd: wire.Cmd, raw: bytes) -> dict[str, object]:
    parsed = wire.REQUESTS[cmd].parse(raw)
    return {k: v for k, v in parsed.items() if not k.startswith("_")}


@pytest.mark.parametrize("cmd", CMDS, ids=lambda c: c.name)
def test_named_fields_are_constructs(cmd: wire.Cmd) -> None:
    dec = wire.DECODERS[int(cmd)]
    assert dec.size == wire.REQUESTS[cmd].sizeof()
    rng = random.Random(int(cmd))
    samples = [bytes(dec.size), b"\xff" * dec.size]
    samples += [rng.randbytes(dec.size) for _ in range(50)]
    for raw in samples:
        f = dec.decode(raw)
        expected = _construct_fields(cmd, raw)
        assert f._asdict() == expected


def test_every_handled_command_has_a_decoder() -> None:
    from vpcie.gpu.commands import CommandHandlers

    assert set(CommandHandlers._handlers) <= set(wire.DECODERS)
