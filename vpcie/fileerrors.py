"""One-line messages for files a program cannot use: which file, what for,
and as which user (a backend started by libvirt runs as libvirt-qemu, not as
the operator who made the files)."""

from __future__ import annotations

import os
import pwd


def current_user() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def os_error_line(action: str, path: object, exc: OSError) -> str:
    """``cannot read /pki/ca.crt (fleet CA) as user libvirt-qemu: Permission denied``."""
    why = exc.strerror or type(exc).__name__
    return f"cannot {action} {path} as user {current_user()}: {why}"
