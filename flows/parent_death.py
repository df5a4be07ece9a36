"""
A child process that dies with the thread that spawned it, even when that parent is SIGKILLed.

Standard library only and nothing else imported: the temporary Prefect server is spawned with it before any
other module of a command loads (flows/local_server.py), and every stage launch uses it (flows/launcher.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable

PR_SET_PDEATHSIG = 1   # linux/prctl.h


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: ask the kernel to SIGTERM the child when the launching thread dies.

    SIGTERM rather than SIGKILL so the child can stop its own children (torchrun its workers). `parent_pid`
    is os.getpid() of the spawning process: a parent already gone before prctl took effect ends the child."""
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)
    return preexec
