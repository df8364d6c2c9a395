"""Differential tests: the derived fast codecs (FastStruct, decode_batch,
encode_batch) against construct, on random valid values and on random and
hostile bytes (STYLE.md habit 7). Both accept with equal values or both
reject: the fast side with ProtocolError, construct with a ConstructError
(wrapped into ProtocolError by fastcodec.construct_decode / the helpers)."""

from __future__ import annotations

from typing import Any

import construct as c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit._protocol_samples import (
    build_batch_construct,
    build_construct,
    canon,
    construct_batch,
    construct_exact,
    hostile_bytes,
    mutations,
    record_strategy,
    values_strategy,
)
from vpcie.errors import ProtocolError
from vpcie.protocol import batch, frames
from vpcie.protocol.codes import BATCH_MAGIC, BATCH_VERSION, Opcode
from vpcie.protocol.fastcodec import FastStruct, construct_decode

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Per-definition tests run ~40 times (every payload, body and header): fewer each.
PER_DEF = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEFINITIONS: dict[str, c.Struct] = {
    **{f"payload:{n}": d for n, d in frames.PAYLOADS.items()},
    **{f"body:{op.name}": d for op, d in batch.BODIES.items()},
    "frame:HEADER": frames.HEADER,
    "batch:HEADER": batch.BATCH_HEADER,
    "batch:RECORD_HEADER": batch.RECORD_HEADER,
}
FAST: dict[str, FastStruct] = {
    **{f"payload:{n}": frames.FAST[n] for n in frames.PAYLOADS},
    **{f"body:{op.name}": batch.FAST_BODIES[op] for op in batch.BODIES},
    "frame:HEADER": FastStruct(frames.HEADER),
    "batch:HEADER": FastStruct(batch.BATCH_HEADER),
    "batch:RECORD_HEADER": FastStruct(batch.RECORD_HEADER),
}
NAMES = sorted(DEFINITIONS)


def _outcome(fn: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", canon(fn(data))
    except ProtocolError:
        return "reject", None


@pytest.mark.parametrize("name", NAMES)
@PER_DEF
@given(data=st.data())
def test_encode_agrees_on_valid_values(name: str, data: st.DataObject) -> None:
    definition, fast = DEFINITIONS[name], FAST[name]
    values = data.draw(values_strategy(definition))
    raw = build_construct(definition, values)
    assert fast.encode(values) == raw
    back, end = fast.decode(raw, 0)
    assert end == len(raw)
    assert canon(back) == canon(values)
    assert canon(construct_decode(definition)(raw)) == canon(values)
    # build(parse(x)) == x both ways
    assert definition.build(definition.parse(raw)) == raw
    assert fast.encode(back) == raw


def _valid_bytes(name: str) -> st.SearchStrategy[bytes]:
    definition = DEFINITIONS[name]
    valid: st.SearchStrategy[bytes] = values_strategy(definition).map(
        lambda v: build_construct(definition, v)
    )
    return valid


@pytest.mark.parametrize("name", NAMES)
@PER_DEF
@given(data=st.data())
def test_decode_agrees_on_hostile_bytes(name: str, data: st.DataObject) -> None:
    definition, fast = DEFINITIONS[name], FAST[name]
    raw = data.draw(hostile_bytes(_valid_bytes(name)))

    def fast_prefix(b: bytes) -> tuple[Any, ...]:
        return fast.decode(b, 0)[0]

    def fast_exact(b: bytes) -> tuple[Any, ...]:
        values, end = fast.decode(b, 0)
        if end != len(b):
            raise ProtocolError("trailing")
        return values

    assert _outcome(fast_prefix, raw) == _outcome(construct_decode(definition), raw)
    assert _outcome(fast_exact, raw) == _outcome(construct_exact(definition), raw)
    # decoding at an offset inside a larger buffer gives the same answer
    pre = b"\xaa" * 5
    assert _outcome(lambda b: fast.decode(memoryview(b), 5)[0], pre + raw) == _outcome(
        fast_prefix, raw
    )


@pytest.mark.parametrize("name", sorted(frames.PAYLOADS))
@PER_DEF
@given(data=st.data())
def test_decode_payload_agrees(name: str, data: st.DataObject) -> None:
    raw = data.draw(hostile_bytes(_valid_bytes(f"payload:{name}")))
    ref = construct_exact(frames.PAYLOADS[name])
    assert _outcome(lambda b: frames.decode_payload(name, b), raw) == _outcome(ref, raw)


# -- whole batches --------------------------------------------------------------
records_st = st.lists(record_strategy(), max_size=5)


@SETTINGS
@given(records=records_st, flags=st.integers(0, 0xFFFF))
def test_encode_batch_agrees_with_construct(records: list[batch.Record], flags: int) -> None:
    raw = batch.encode_batch(records, flags=flags)
    assert raw == build_batch_construct(flags, records)
    assert canon(batch.decode_batch(raw)) == canon(records)
    got_flags, got = construct_batch(raw)
    assert got_flags == flags and canon(got) == canon(records)
    assert batch.BATCH.build(batch.BATCH.parse(raw)) == raw
    assert batch.encode_batch(batch.decode_batch(raw), flags=flags) == raw


def _batch_mutations(records: list[batch.Record], flags: int) -> st.SearchStrategy[bytes]:
    raw = batch.encode_batch(records, flags=flags)

    def patch(args: tuple[int, int, int]) -> bytes:
        """Overwrite a header/record word with a hostile value."""
        where, size, value = args
        where = min(where, max(len(raw) - size, 0))
        word = value.to_bytes(8, "little")[:size]
        return raw[:where] + word + raw[where + size :]

    return st.one_of(
        st.just(raw),
        mutations(raw),
        st.tuples(
            st.integers(0, len(raw)),
            st.sampled_from([1, 2, 4]),
            st.sampled_from(
                [
                    0,
                    1,
                    11,
                    12,
                    13,
                    16,
                    17,
                    4096,
                    4097,
                    1 << 20,
                    (1 << 20) + 1,
                    0xFFFF,
                    0xFFFFFFFF,
                    len(raw),
                    len(raw) - 1,
                    len(raw) + 1,
                ]
            ),
        ).map(patch),
    )


def _hostile_batch() -> st.SearchStrategy[bytes]:
    header_only = st.tuples(
        st.sampled_from([BATCH_MAGIC, BATCH_MAGIC ^ 1]),
        st.sampled_from([BATCH_VERSION, 0, 2]),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=64),
    ).map(lambda t: batch.BATCH_HEADER.build(dict(zip(
        ("magic", "version", "flags", "length", "count"), t[:5], strict=True))) + t[5])  # fmt: skip
    structured = st.tuples(records_st, st.integers(0, 0xFFFF)).flatmap(
        lambda t: _batch_mutations(*t)
    )
    return st.one_of(st.binary(max_size=80), header_only, structured)


@SETTINGS
@given(raw=_hostile_batch())
def test_decode_batch_agrees_with_construct(raw: bytes) -> None:
    fast = _outcome(batch.decode_batch, raw)
    ref = _outcome(lambda b: construct_batch(b)[1], raw)
    assert fast == ref


@pytest.mark.parametrize("op", list(batch.BODIES), ids=lambda o: o.name)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_each_opcode_batch_agrees(op: Opcode, data: st.DataObject) -> None:
    """A single-record batch per opcode with a hostile body, so every body
    decoder is exercised inside decode_batch, not only alone."""
    body = data.draw(hostile_bytes(_valid_bytes(f"body:{op.name}")))
    rec = (
        batch.RECORD_HEADER.build(
            dict(opcode=int(op), flags=0, length=batch.RECORD_HEADER_SIZE + len(body), stream=0)
        )
        + body
    )
    raw = batch.encode_batch([rec])
    assert _outcome(batch.decode_batch, raw) == _outcome(lambda b: construct_batch(b)[1], raw)
