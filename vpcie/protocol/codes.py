"""Numbers shared by the tunnel and the vGPU batch format, with their caps.

Every limit a peer or the guest controls is a named constant here (STYLE.md
habit 6); the agent may grant less than these, never more.
"""

from __future__ import annotations

from enum import IntEnum

from vpcie.errors import ErrorCode

__all__ = [
    "ALL_STREAMS",
    "BACKEND_LOCAL_OPCODES",
    "BATCH_MAGIC",
    "BATCH_VERSION",
    "FRAME_MAGIC",
    "HANDLE_EPOCH_SHIFT",
    "HANDLE_INDEX_MASK",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_CHUNK",
    "MAX_HANDLE_EPOCH",
    "MAX_LAUNCH_ARGS",
    "MAX_MODULE_BYTES",
    "MAX_STREAMS",
    "MIGRATION_OPCODES",
    "NO_INDEX",
    "PROTOCOL_VERSION",
    "ArgKind",
    "AuthMode",
    "DType",
    "ErrorCode",
    "ExecutorKind",
    "FrameFlag",
    "FrameType",
    "ModuleKind",
    "Opcode",
]

FRAME_MAGIC = 0x49435056  # b"VPCI" little-endian
PROTOCOL_VERSION = 2  # 2: OPEN.lease_token/lease_live, INVENTORY, the state opcodes
BATCH_MAGIC = 0x31424756  # b"VGB1" little-endian
BATCH_VERSION = 1

MAX_CONTROL_PAYLOAD = 4096  # HELLO, AUTH, OPEN, CLOSE, ERROR, PING, PONG
MAX_INVENTORY_PAYLOAD = 1 << 20  # an INVENTORY reply: JSON of every device and fence
MAX_BATCH_BYTES = 1 << 20  # one COMMAND frame / one SUBMIT_3D payload
# A COMPLETION carries at most a batch's worth of blob (MODULE_EXPORT gives a
# module's code back, which came in one batch; STATE_EXPORT's summary of up
# to MAX_HANDLES allocations fits too) plus its fixed fields and results.
MAX_COMPLETION_PAYLOAD = MAX_BATCH_BYTES + 64 * 1024
MAX_BATCH_RECORDS = 4096
MAX_DATA_CHUNK = 4 << 20  # bytes of copy payload in one DATA frame
MAX_MODULE_BYTES = MAX_BATCH_BYTES - 64
MAX_LAUNCH_ARGS = 64
MAX_STREAMS = 64
MAX_EVENTS = 4096
ALL_STREAMS = 0xFFFFFFFF
NO_INDEX = 0xFFFFFFFF
# Device handles (u32) carry their session's epoch in the top bits: OPEN's
# handle_epoch counts the sessions the guest context had before (one per
# binding), so a handle never names a buffer of a later binding. An epoch
# has 2^24 - 1 handle numbers (reused, live ones skipped, once they run out);
# a context that would need epoch 256 gets no session (never wraps).
HANDLE_EPOCH_SHIFT = 24
MAX_HANDLE_EPOCH = 0xFF
HANDLE_INDEX_MASK = (1 << HANDLE_EPOCH_SHIFT) - 1
# OPEN's lease_live: the tokens of a device's leases live when a pool lease
# was created (host_agent/fencing.py); 256 u64 keep OPEN under its 4 KiB cap.
MAX_LIVE_LEASES = 256


class FrameType(IntEnum):
    HELLO = 1
    AUTH = 2
    OPEN = 3
    CLOSE = 4
    COMMAND = 5
    DATA = 6
    COMPLETION = 7
    ERROR = 8
    PING = 9
    PONG = 10
    # Instead of OPEN: the agent answers one INVENTORY|REPLY (JSON) and closes.
    INVENTORY = 11


class FrameFlag(IntEnum):
    REPLY = 0x1  # HELLO/AUTH/OPEN/CLOSE answered by the agent
    LAST = 0x2  # last DATA frame of a copy stream


MAX_PAYLOAD: dict[int, int] = {
    FrameType.HELLO: MAX_CONTROL_PAYLOAD,
    FrameType.AUTH: MAX_CONTROL_PAYLOAD,
    FrameType.OPEN: MAX_CONTROL_PAYLOAD,
    FrameType.CLOSE: MAX_CONTROL_PAYLOAD,
    FrameType.COMMAND: MAX_BATCH_BYTES,
    FrameType.DATA: MAX_DATA_CHUNK + 8,
    FrameType.COMPLETION: MAX_COMPLETION_PAYLOAD,
    FrameType.ERROR: MAX_CONTROL_PAYLOAD,
    FrameType.PING: MAX_CONTROL_PAYLOAD,
    FrameType.PONG: MAX_CONTROL_PAYLOAD,
    FrameType.INVENTORY: MAX_INVENTORY_PAYLOAD,
}


class AuthMode(IntEnum):
    TLS = 0  # mutual TLS: the TLS handshake authenticated both peers
    PSK = 1  # HMAC challenge-response with a pre-shared key (loopback labs)


class ExecutorKind(IntEnum):
    NONE = 0  # no device bound (the backend answers QUERY itself)
    CPU = 1  # NumPy on the agent's CPU: an honest executor, not a GPU
    CUDA = 2  # CuPy on an NVIDIA GPU or MIG slice


class Opcode(IntEnum):
    NOP = 0
    QUERY = 1
    MEM_ALLOC = 2
    MEM_FREE = 3
    COPY_H2D = 4
    COPY_D2H = 5
    COPY_D2D = 6
    MEMSET = 7
    MODULE_LOAD = 8
    MODULE_FREE = 9
    LAUNCH = 10
    GEMM = 11
    AXPY = 12
    REDUCE_SUM = 13
    EVENT_RECORD = 14
    EVENT_WAIT = 15
    SYNC = 16
    # Live migration (backend -> agent only; a guest batch naming one is
    # refused with INVALID_ARGUMENT): docs/PROTOCOL.md "Session state".
    STATE_EXPORT = 20  # completion blob: frames.STATE_SUMMARY of the session
    ALLOC_AT = 21  # MEM_ALLOC with exactly the given handle
    MODULE_LOAD_AT = 22  # MODULE_LOAD with exactly the given handle
    SESSION_RESTORE = 23  # the handle counter and the recorded events
    MODULE_EXPORT = 24  # completion blob: the module's code as loaded
    # Backend-local records: the vpcie-backend acts on them itself and never
    # forwards them to an agent (an agent answers them with NOT_SUPPORTED).
    FENCE_PAGE_SET = 32  # this context's fence page: resource + byte offset
    SIGNAL = 33  # when the batch's earlier records are done, publish seq on the fence page


BACKEND_LOCAL_OPCODES = frozenset({Opcode.FENCE_PAGE_SET, Opcode.SIGNAL})
MIGRATION_OPCODES = frozenset(
    {
        Opcode.STATE_EXPORT,
        Opcode.ALLOC_AT,
        Opcode.MODULE_LOAD_AT,
        Opcode.SESSION_RESTORE,
        Opcode.MODULE_EXPORT,
    }
)


class DType(IntEnum):
    F32 = 1
    F16 = 2
    F64 = 3


DTYPE_SIZE = {DType.F32: 4, DType.F16: 2, DType.F64: 8}


class ModuleKind(IntEnum):
    PTX = 1
    CUBIN = 2
    CUDA_C = 3  # compiled by NVRTC on the agent


class ArgKind(IntEnum):
    PTR = 1  # device pointer: handle + byte offset (value)
    I32 = 2
    U32 = 3
    I64 = 4
    U64 = 5
    F32 = 6
    F64 = 7
