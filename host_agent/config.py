"""Agent settings shared by the main process and its workers (a forked
worker inherits them; they are never on a command line)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

AUTH_TIMEOUT_S = 5.0  # docs/PROTOCOL.md "Connection = one session" step 3
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_MAX_SESSIONS = 8
DEFAULT_EVENT_WAIT_TIMEOUT_S = 30.0
DEFAULT_IDLE_TIMEOUT_S = 10.0
DEFAULT_MAX_HANDSHAKES = 256  # unauthenticated connections pending, in all
DEFAULT_MAX_HANDSHAKES_PER_SOURCE = 64  # ... and from one address


@dataclass
class AgentConfig:
    auth: str  # "tls" | "psk"
    agent_name: str
    executor: str = "auto"  # "auto" | "cpu" | "cuda"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    psk_hex: str = ""
    mem_quota: int = 0  # 0: the device's memory
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_sessions: int = DEFAULT_MAX_SESSIONS
    event_wait_timeout: float = DEFAULT_EVENT_WAIT_TIMEOUT_S
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    auth_timeout: float = AUTH_TIMEOUT_S
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_handshakes_per_source: int = DEFAULT_MAX_HANDSHAKES_PER_SOURCE

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> AgentConfig:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)
