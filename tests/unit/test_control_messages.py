"""The control protocol's messages (vpcie.control.messages), sans-IO: each
request parsed from its JSON line, one precise error for each bad one, and the
JSON each message and reply writes (the bytes the CLI has always sent)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vpcie.control.messages import (
    BindReply,
    BindRequest,
    MigrateReply,
    MigrateRequest,
    Refusal,
    StatusReply,
    StatusRequest,
    UnbindReply,
    UnbindRequest,
    parse_hostport,
    parse_request,
)

PSK_BIND: dict[str, Any] = {"op": "bind", "agent": "127.0.0.1:7000", "psk_file": "/k"}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_status_and_unbind_parse_and_write_themselves() -> None:
    assert parse_request(b'{"op": "status"}\n') == StatusRequest()
    assert parse_request(line({"op": "unbind"})) == UnbindRequest()
    assert StatusRequest().to_wire() == {"op": "status"}
    assert UnbindRequest().to_wire() == {"op": "unbind"}


def test_bind_parses_every_field_and_defaults_the_rest() -> None:
    full = {
        **PSK_BIND,
        "agent": "[::1]:7001",
        "tls_name": "b1",
        "device": "GPU-1",
        "mem_quota": 4096,
        "max_inflight": 3,
        "replace": True,
    }
    got = parse_request(line(full))
    assert got == BindRequest(
        agent="[::1]:7001",
        psk_file="/k",
        tls_name="b1",
        device="GPU-1",
        mem_quota=4096,
        max_inflight=3,
        replace=True,
    )
    assert isinstance(got, BindRequest) and got.address() == ("::1", 7001)
    assert parse_request(line(PSK_BIND)) == BindRequest(agent="127.0.0.1:7000", psk_file="/k")
    # A PSK file wins over a TLS folder; an empty one counts as absent.
    both = parse_request(line({**PSK_BIND, "tls_dir": "/pki"}))
    assert isinstance(both, BindRequest) and both.tls_dir is None
    tls = parse_request(line({**PSK_BIND, "psk_file": "", "tls_dir": "/pki"}))
    assert isinstance(tls, BindRequest) and (tls.psk_file, tls.tls_dir) == (None, "/pki")


def test_the_cli_bind_writes_the_json_it_always_sent() -> None:
    """vpcie vgpu bind sent exactly these keys in this order (no max_inflight):
    the bytes on the socket stay as they were."""
    req = BindRequest(
        agent="h:1", psk_file=None, tls_dir="/pki", tls_name="backend", device="", mem_quota=0
    )
    before = {
        "op": "bind",
        "agent": "h:1",
        "psk_file": None,
        "tls_dir": "/pki",
        "tls_name": "backend",
        "device": "",
        "mem_quota": 0,
        "replace": False,
    }
    assert json.dumps(req.to_wire()) == json.dumps(before)
    assert parse_request(line(req.to_wire())) == req
    many = BindRequest(agent="h:1", psk_file="/k", max_inflight=8)
    assert many.to_wire()["max_inflight"] == 8 and parse_request(line(many.to_wire())) == many


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ([1, 2], "request must be a JSON object"),
        ({"op": "frobnicate"}, "unknown op 'frobnicate' (status, bind, unbind, migrate)"),
        ({}, "unknown op None"),
        ({**PSK_BIND, "replace": "yes"}, "replace must be true or false, not 'yes'"),
        ({"op": "bind", "psk_file": "/k"}, "bind needs agent (HOST:PORT)"),
        ({**PSK_BIND, "agent": "nohost"}, "agent address 'nohost' is not HOST:PORT"),
        ({**PSK_BIND, "agent": "h:0"}, "agent address 'h:0': port 0 is not in 1..65535"),
        ({"op": "bind", "agent": "h:1"}, "bind needs psk_file or tls_dir"),
        ({**PSK_BIND, "mem_quota": "lots"}, "mem_quota must be a whole number, not 'lots'"),
        ({**PSK_BIND, "max_inflight": None}, "max_inflight must be a whole number, not None"),
        ({**PSK_BIND, "lease_token": "x"}, "lease_token must be a whole number, not 'x'"),
        ({**PSK_BIND, "lease_token": -1}, "lease_token must be in 0..2**64-1, not -1"),
        ({**PSK_BIND, "lease_token": 7}, "lease_live (the device's live lease tokens) must"),
        ({**PSK_BIND, "lease_token": 7, "lease_live": [5]}, "lease_live (the device's live"),
        ({**PSK_BIND, "lease_live": [5]}, "lease_live (the device's live lease tokens) must"),
        ({**PSK_BIND, "lease_token": 7, "lease_live": [7, 7]}, "lease_live repeats a token"),
        ({**PSK_BIND, "lease_token": 7, "lease_live": "7"}, "lease_live must be a list"),
        ({**PSK_BIND, "lease_token": 7, "lease_live": [0, 7]}, "lease_live must be a list"),
        ({"op": "migrate", "psk_file": "/k"}, "migrate needs agent (HOST:PORT)"),
        ({"op": "migrate", "agent": "h:1"}, "migrate needs psk_file or tls_dir"),
    ],
)
def test_a_bad_request_is_one_precise_error(req: object, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_request(line(req))
    assert str(info.value).startswith(error)
    assert "\n" not in str(info.value)


def test_bad_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_request(b"{not json")


def test_parse_hostport() -> None:
    assert parse_hostport("10.0.0.1:65535") == ("10.0.0.1", 65535)
    with pytest.raises(ValueError, match=r"not in 1\.\.65535"):
        parse_hostport("h:65536")


def test_replies_write_the_objects_clients_read() -> None:
    assert StatusReply({"binding": "unbound", "commands": 0}).to_wire() == {
        "ok": True,
        "binding": "unbound",
        "commands": 0,
    }
    assert UnbindReply(None).to_wire() == {"ok": True, "was": None}
    assert BindReply("h:1").to_wire() == {"ok": True, "bound": "h:1"}
    assert BindReply("h:2", replaced="h:1").to_wire() == {
        "ok": True,
        "bound": "h:2",
        "replaced": "h:1",
    }
    assert Refusal("ValueError: no").to_wire() == {"ok": False, "error": "ValueError: no"}


def test_migrate_has_binds_fields_and_a_lease_token() -> None:
    got = parse_request(
        line({**PSK_BIND, "op": "migrate", "device": "GPU-2", "lease_token": 41,
              "lease_live": [41, 9]})
    )  # fmt: skip
    assert got == MigrateRequest(
        agent="127.0.0.1:7000", psk_file="/k", device="GPU-2", lease_token=41,
        lease_live=(9, 41),
    )  # fmt: skip
    assert isinstance(got, MigrateRequest) and got.op == "migrate"
    wire = got.to_wire()
    assert wire["op"] == "migrate" and wire["lease_token"] == 41 and "replace" not in wire
    assert parse_request(line(wire)) == got
    # bind carries it too; absent when 0, so a bind's bytes stay as they were.
    bind = parse_request(line({**PSK_BIND, "lease_token": 7, "lease_live": [7]}))
    assert isinstance(bind, BindRequest) and bind.lease_token == 7 and bind.lease_live == (7,)
    assert "lease_token" not in BindRequest(agent="h:1", psk_file="/k").to_wire()


def test_migrate_reply_is_the_report() -> None:
    report = {"migrated": "b:2 device=any auth=psk", "from": "a:1", "contexts": 1}
    assert MigrateReply(report).to_wire() == {"ok": True, **report}
