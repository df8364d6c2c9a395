"""Where vpcie puts things on a host (documented in docs/INSTALL.md).

Kept apart from the modules that use them so ``vpcie-backend
--print-capabilities`` (libvirt runs it for every domain start) imports nothing
heavy to print its help defaults.
"""

DEFAULT_RUN_DIR = "/run/vpcie"  # managed backends' control sockets: NAME.ctl
DEFAULT_LOG_DIR = "/var/log/vpcie"  # managed backends' logs: NAME.log
