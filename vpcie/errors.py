"""One root exception, split by whose fault it is.

* ``GuestError``: the guest sent something invalid. It is answered (a virtio-gpu
  error response or a vGPU error code) and the device keeps serving.
* ``ProtocolError``: a peer (QEMU, an agent, a backend) broke a wire protocol.
  The connection is closed; the process keeps serving others.
* ``VgpuError``: a vGPU command failed with an error code the guest can see.
* Anything else is our bug and must crash loudly in tests.
"""

from __future__ import annotations

from enum import IntEnum


class VpcieError(Exception):
    """Root of every error vpcie raises on purpose."""


class ProtocolError(VpcieError):
    """A peer sent bytes that break the protocol; close that connection."""


class GuestError(VpcieError):
    """The guest asked for something invalid; answer with an error, keep serving."""


class ConfigError(VpcieError):
    """Bad configuration or command-line input from an operator."""


class AuthError(ProtocolError):
    """A peer failed authentication."""


class ErrorCode(IntEnum):
    """vGPU error codes: on the wire (u32), on the fence page, in the CLI."""

    OK = 0
    INVALID_ARGUMENT = 1
    INVALID_HANDLE = 2
    OUT_OF_MEMORY = 3
    QUOTA_EXCEEDED = 4
    NOT_SUPPORTED = 5
    DEVICE_LOST = 6
    NO_DEVICE = 7
    PROTOCOL = 8
    COMPILE_FAILED = 9
    LAUNCH_FAILED = 10
    TIMEOUT = 11
    INTERNAL = 12
    OUT_OF_RANGE = 13
    PERMISSION_DENIED = 14
    STALE_HANDLE = 15  # a device handle issued under an earlier binding of the vGPU
    STALE_LEASE = 16  # a lease token older than the newest this agent has seen for the device


class VgpuError(VpcieError):
    """A vGPU command failed with ``code``; ``index`` is the failing record."""

    def __init__(self, code: ErrorCode, message: str = "", index: int = -1) -> None:
        self.code = ErrorCode(code)
        self.message = message
        self.index = index
        where = f" (record {index})" if index >= 0 else ""
        super().__init__(f"{self.code.name}{where}: {message}" if message else self.code.name)
