"""Starting a worker: ``os.fork()`` of the agent's main process, after the
device grant.

Why fork and not exec: the worker inherits the live connection (TLS state
included: the SSL object is plain memory) and the agent's already-imported
modules, so a session opens without a Python start (docs/ARCHITECTURE.md
"Agent process model"). What makes fork safe here:

* the parent is single-threaded when it forks (checked: ``fork_worker``
  refuses otherwise) and has not initialised CUDA (NVML is shut down after
  the inventory; NumPy/CuPy are imported only in the worker);
* the child dies with its parent (PR_SET_PDEATHSIG, then a getppid re-check
  for a parent that died before the prctl), so a killed agent leaves no
  orphan serving sessions that a restarted agent does not know;
* the child closes every fd but the ones it is given (listening socket, other
  connections, the event loop's epoll and self-pipe), resets the signal
  handlers and the wakeup fd asyncio installed, freezes the inherited heap
  (no finaliser of a parent object ever runs in the child) and never returns
  into asyncio: it ends with ``os._exit``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)  # loaded once, in the parent
_EXIT_CRASH = 70  # EX_SOFTWARE: the worker body raised


class ForkRefused(RuntimeError):
    """The main process is in no state to fork (threads)."""


def native_threads() -> int:
    """Threads of this process, those no Python code started included
    (OpenBLAS starts some when NumPy is imported; the main process must not)."""
    return len(os.listdir("/proc/self/task"))


def _close_all_but(keep: set[int]) -> None:
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


def _become_worker(parent: int, keep: set[int]) -> None:
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(_EXIT_CRASH)
    if os.getppid() != parent:  # the parent died before the prctl took
        os._exit(1)
    gc.freeze()  # the parent's objects: the cycle collector never frees (closes) them here
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _close_all_but(keep)


def fork_worker(keep: set[int], body: Callable[[], int]) -> int:
    """Fork; the child keeps only the fds in ``keep`` (and 0-2), runs
    ``body`` and exits with its return value. Returns the child's pid."""
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        raise ForkRefused(f"agent main process has threads ({names}); cannot fork safely")
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = _EXIT_CRASH
    try:
        _become_worker(parent, keep)
        code = body()
    except BaseException:  # nothing may return into the parent's loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)
    raise AssertionError("unreachable")
