"""What the guest can learn before it submits anything: our capset and EDID.

The capset's layout (id 17, a QUERY_INFO padded to CAPSET_SIZE) is the guest
ABI, shared with guest_tools: vpcie/protocol/guest_abi.py. Here is what the
backend puts in it when no GPU is bound, and the EDID.
"""

from __future__ import annotations

from vpcie.protocol.codes import (
    MAX_BATCH_BYTES,
    MAX_STREAMS,
    PROTOCOL_VERSION,
    ExecutorKind,
)
from vpcie.protocol.frames import encode_payload
from vpcie.protocol.guest_abi import CAPSET_ID as VGPU_CAPSET_ID
from vpcie.protocol.guest_abi import CAPSET_SIZE, capset_payload, decode_capset
from vpcie.protocol.guest_abi import CAPSET_VERSION as VGPU_CAPSET_VERSION

__all__ = [
    "CAPSET_SIZE",
    "VGPU_CAPSET_ID",
    "VGPU_CAPSET_VERSION",
    "capset_payload",
    "decode_capset",
    "make_edid",
    "unbound_info",
]


def unbound_info(agent: str = "") -> bytes:
    """QUERY_INFO for a vGPU with no GPU bound (executor NONE)."""
    return encode_payload(
        "QUERY_INFO",
        PROTOCOL_VERSION, int(ExecutorKind.NONE), 0,
        0, 0, 0, 0,
        0, MAX_BATCH_BYTES, MAX_STREAMS, 0, 0, 0,
        "no GPU bound", "", agent,
    )  # fmt: skip


def make_edid(width: int = 1024, height: int = 768) -> bytes:
    """A minimal EDID 1.4 base block (128 bytes) for one preferred mode."""
    edid = bytearray(128)
    edid[0:8] = b"\x00\xff\xff\xff\xff\xff\xff\x00"
    edid[8:10] = (((ord("V") - 64) << 10) | ((ord("P") - 64) << 5) | (ord("C") - 64)).to_bytes(
        2, "big"
    )
    edid[10:12] = (1).to_bytes(2, "little")  # product code
    edid[16] = 1  # week
    edid[17] = 2026 - 1990
    edid[18], edid[19] = 1, 4  # EDID 1.4
    edid[20] = 0xA5  # digital, 8 bpc, DisplayPort
    edid[21], edid[22] = width // 40, height // 40  # rough cm
    edid[23] = 120
    edid[24] = 0x06
    # Detailed timing descriptor for width x height @ 60 Hz (approximate blanking).
    hblank, vblank = 160, 23
    clock = (width + hblank) * (height + vblank) * 60 // 10000
    d = bytearray(18)
    d[0:2] = clock.to_bytes(2, "little")
    d[2], d[3] = width & 0xFF, hblank & 0xFF
    d[4] = ((width >> 8) << 4) | (hblank >> 8)
    d[5], d[6] = height & 0xFF, vblank & 0xFF
    d[7] = ((height >> 8) << 4) | (vblank >> 8)
    d[8], d[9], d[10], d[11] = 48, 32, 0x36, 0
    d[17] = 0x18
    edid[54:72] = d
    edid[72:90] = b"\x00\x00\x00\xfc\x00" + b"vpcie vGPU\n  "[:13]
    edid[126] = 0
    edid[127] = (-sum(edid[:127])) & 0xFF
    return bytes(edid)
