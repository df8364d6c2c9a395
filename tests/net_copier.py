"""One copier for the network lab's load test, as its own process (a
backend of its own): ``python -m tests.net_copier HOST PORT PKI_DIR SECONDS MIB``.

Connects with mutual TLS, copies MIB MiB up and back down with checksums
compared for SECONDS, and prints one JSON line: rounds done, whether the
session was lost and why, checksum mismatches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time

from vpcie.control.target import client_tls_context
from vpcie.errors import VgpuError
from vpcie.tunnel import TunnelClient


async def main(host: str, port: int, pki: str, seconds: float, mib: int) -> dict[str, object]:
    size = mib << 20
    c = await TunnelClient.connect(
        host, port, ssl=client_tls_context(pki, "backend"), name=f"copier{os.getpid()}", timeout=30
    )
    out: dict[str, object] = {"rounds": 0, "lost": "", "bad": 0}
    try:
        handle = await c.alloc(size)
        data = os.urandom(size)
        want = hashlib.sha256(data).digest()
        back = bytearray(size)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await c.copy_h2d(handle, 0, data)
            await c.copy_d2h(handle, 0, back)
            if hashlib.sha256(back).digest() != want:
                out["bad"] = int(str(out["bad"])) + 1
            out["rounds"] = int(str(out["rounds"])) + 1
    except VgpuError as exc:
        out["lost"] = str(exc)
    finally:
        await c.close()
    return out


if __name__ == "__main__":
    h, p, k, s, m = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(h, int(p), k, float(s), int(m)))), flush=True)
