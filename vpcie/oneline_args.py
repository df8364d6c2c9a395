"""argparse that keeps "errors for people" to one line (STYLE.md habit 15).

Stock argparse prints the whole usage block before its message; a script or
a libvirt log then shows three lines where one says what went wrong. Exit
status stays argparse's 2 (bad input).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """``prog: error: message (see --help)`` on stderr, exit 2. Subparsers
    made by ``add_subparsers`` inherit the class."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0 (quotas, byte counts)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 (no limit) or more")
    return value
