"""One-line argparse errors, the non-negative integer type, and the TLS sniff verdict."""

from __future__ import annotations

import argparse
import ssl

import pytest

from vpcie.oneline_args import OneLineParser, non_negative_int
from vpcie.tunnel.tls_sniff import is_tls_answer


def test_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    p = OneLineParser(prog="tool")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--quota", type=non_negative_int, default=0)
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["serve", "--quota", "-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tool serve: error: argument --quota:")
    assert p.parse_args(["serve", "--quota", "0x10"]).quota == 16


def test_non_negative_int() -> None:
    assert non_negative_int("0") == 0
    for bad in ("-1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative_int(bad)


def test_is_tls_answer() -> None:
    assert is_tls_answer(None)
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert is_tls_answer(alert)
    wrong = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong.reason = "WRONG_VERSION_NUMBER"
    assert not is_tls_answer(wrong)
    assert not is_tls_answer(ConnectionResetError())
    assert not is_tls_answer(TimeoutError())
