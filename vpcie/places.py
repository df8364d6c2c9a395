"""Where vpcie puts things on a host (documented in docs/INSTALL.md).

Kept apart from the modules that use them so ``vpcie-backend
--print-capabilities`` (libvirt runs it for every domain start) imports nothing
heavy to print its help defaults.
"""

import os
import re

DEFAULT_RUN_DIR = "/run/vpcie"  # managed backends' control sockets: NAME.ctl
DEFAULT_LOG_DIR = "/var/log/vpcie"  # managed backends' logs: NAME.log

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_NAME = 100


def safe_name(name: str) -> str:
    """A file-name-safe form (``NAME.ctl``, ``NAME.log``): no '/', no leading '.'."""
    out = _UNSAFE.sub("_", name)[:MAX_NAME].lstrip(".")
    return out or "_"


def control_socket(vgpu: str, run_dir: str = DEFAULT_RUN_DIR) -> str:
    """The control socket of the managed backend serving ``vgpu`` (the one
    rule: the backend makes it there, the CLI and the pool look for it there)."""
    return os.path.join(run_dir, f"{safe_name(vgpu)}.ctl")
