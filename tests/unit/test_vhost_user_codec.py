"""vhost-user codec: golden bytes, round trips, every truncation rejected."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vpcie.errors import ProtocolError
from vpcie.vhost_user.codec import MessageDecoder, decode_one, encode_message
from vpcie.vhost_user.constants import MAX_CONFIG_SIZE, MAX_MEM_REGIONS, Request
from vpcie.vhost_user.messages import (
    ConfigSpace,
    LogDescription,
    MemRegion,
    MemTable,
    Message,
    PayloadKind,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
    parse_payload,
    payload_kind,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "vhost_user"
R, A, NR = 0x1, 0x5, 0x9
FEATS = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | 3

# name -> (is a reply, fds it travels with, the message it must decode to)
EXPECTED: dict[str, tuple[bool, int, Message]] = {
    "get_features": (False, 0, Message(1, R)),
    "get_features_reply": (True, 0, Message(1, A, FEATS)),
    "set_features": (False, 0, Message(2, R, FEATS | (1 << 40))),
    "set_owner": (False, 0, Message(3, R)),
    "reset_owner": (False, 0, Message(4, R)),
    "set_mem_table": (
        False,
        1,
        Message(5, NR, MemTable((MemRegion(0, 256 << 20, 0x7F0000000000, 0),))),
    ),
    "set_mem_table_2": (
        False,
        2,
        Message(
            5,
            NR,
            MemTable(
                (
                    MemRegion(0, 0x80000000, 0x7F1000000000, 0),
                    MemRegion(0x100000000, 0x40000000, 0x7F2000000000, 0x80000000),
                )
            ),
        ),
    ),
    "set_log_base": (False, 1, Message(6, R, LogDescription(4096, 0))),
    "set_vring_num": (False, 0, Message(8, R, VringState(0, 256))),
    "set_vring_addr": (
        False,
        0,
        Message(9, R, VringAddr(1, 0, 0x7F0000010000, 0x7F0000012000, 0x7F0000011000, 0)),
    ),
    "set_vring_base": (False, 0, Message(10, R, VringState(0, 17))),
    "get_vring_base": (False, 0, Message(11, R, VringState(1, 0))),
    "get_vring_base_reply": (True, 0, Message(11, A, VringState(1, 42))),
    "set_vring_kick": (False, 1, Message(12, R, VringFile(1, False))),
    "set_vring_call": (False, 1, Message(13, R, VringFile(0, False))),
    "set_vring_call_nofd": (False, 0, Message(13, R, VringFile(1, True))),
    "set_vring_err": (False, 1, Message(14, R, VringFile(1, False))),
    "get_protocol_features": (False, 0, Message(15, R)),
    "get_protocol_features_reply": (True, 0, Message(15, A, 0x2209)),
    "set_protocol_features": (False, 0, Message(16, R, 0x2209)),
    "get_queue_num": (False, 0, Message(17, R)),
    "get_queue_num_reply": (True, 0, Message(17, A, 2)),
    "set_vring_enable": (False, 0, Message(18, NR, VringState(0, 1))),
    "reply_ack": (True, 0, Message(18, A, 0)),
    "get_config": (False, 0, Message(24, R, ConfigSpace(0, 16, 0, bytes(16)))),
    "get_config_reply": (
        True,
        0,
        Message(24, A, ConfigSpace(0, 16, 0, struct.pack("<IIII", 0, 0, 1, 1))),
    ),
    "set_config": (False, 0, Message(25, R, ConfigSpace(4, 4, 0, struct.pack("<I", 1)))),
    "gpu_set_socket": (False, 1, Message(33, R)),
    "reset_device": (False, 0, Message(34, R)),
    "get_max_mem_slots": (False, 0, Message(36, R)),
    "add_mem_reg": (
        False,
        1,
        Message(37, NR, SingleMemRegion(MemRegion(0x200000000, 1 << 20, 0x7F3000000000, 0))),
    ),
    "set_status": (False, 0, Message(39, NR, 0xF)),
}


def test_every_golden_file_is_checked() -> None:
    assert {p.stem for p in GOLDEN.glob("*.bin")} == set(EXPECTED)


def test_every_request_qemu_sends_a_gpu_backend_has_a_golden() -> None:
    requests = {m.request for reply, _, m in EXPECTED.values() if not reply}
    for req in (1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 33, 34):
        assert req in requests, Request(req).name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_parse_and_round_trip(name: str) -> None:
    is_reply, _, expected = EXPECTED[name]
    data = (GOLDEN / f"{name}.bin").read_bytes()
    msg = decode_one(data, replies=is_reply)
    assert msg == expected
    assert encode_message(msg) == data
    assert encode_message(expected) == data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_truncation_is_rejected(name: str) -> None:
    is_reply, _, _ = EXPECTED[name]
    data = (GOLDEN / f"{name}.bin").read_bytes()
    for n in range(len(data)):
        # A stream cut short: never a whole message.
        with pytest.raises(ProtocolError):
            decode_one(data[:n], replies=is_reply)
    # A header whose size field agrees with a shortened payload: the payload
    # format itself must reject it.
    payload = data[12:]
    kind = payload_kind(struct.unpack_from("<I", data)[0], is_reply)
    assert kind is not PayloadKind.RAW
    for n in range(len(payload)):
        short = data[:8] + struct.pack("<I", n) + payload[:n]
        with pytest.raises(ProtocolError):
            decode_one(short, replies=is_reply)


def test_fds_travel_with_their_message() -> None:
    data = (GOLDEN / "set_vring_kick.bin").read_bytes()
    r, w = os.pipe()
    try:
        dec = MessageDecoder()
        assert dec.feed(data[:5], [r]) == []
        (msg,) = dec.feed(data[5:])
        assert msg.fds == (r,)
    finally:
        os.close(r)
        os.close(w)


def test_stream_of_messages_in_odd_chunks() -> None:
    stream = b"".join(
        (GOLDEN / f"{n}.bin").read_bytes()
        for n in ("get_features", "set_vring_num", "set_vring_addr", "get_config")
    )
    dec = MessageDecoder()
    got: list[Message] = []
    for i in range(0, len(stream), 7):
        got += dec.feed(stream[i : i + 7])
    assert [m.request for m in got] == [1, 8, 9, 24]
    assert dec.pending == 0


@pytest.mark.parametrize(
    "bad, why",
    [
        (struct.pack("<III", 1, 0x2, 0), "version"),
        (struct.pack("<III", 1, 0x5, 0), "REPLY"),
        (struct.pack("<III", 1, 0x11, 0), "flags"),
        (struct.pack("<III", 1, 0x1, 1 << 20), "size"),
        (struct.pack("<III", 3, 0x1, 8) + bytes(8), "payload"),
        (struct.pack("<III", 12, 0x1, 8) + struct.pack("<Q", 0x200), "reserved"),
    ],
)
def test_malformed_headers(bad: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_one(bad)


def test_caps_on_regions_and_config() -> None:
    too_many = struct.pack("<II", MAX_MEM_REGIONS + 1, 0) + bytes(32 * (MAX_MEM_REGIONS + 1))
    with pytest.raises(ProtocolError):
        parse_payload(PayloadKind.MEM_TABLE, too_many)
    big = struct.pack("<III", 0, MAX_CONFIG_SIZE + 1, 0) + bytes(MAX_CONFIG_SIZE + 1)
    with pytest.raises(ProtocolError):
        parse_payload(PayloadKind.CONFIG, big)


def test_decoder_poisoned_after_error_and_closes_fds() -> None:
    r, w = os.pipe()
    os.close(w)
    dec = MessageDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(struct.pack("<III", 1, 0x2, 0), [r])
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the decoder
    with pytest.raises(ProtocolError):
        dec.feed(b"")
