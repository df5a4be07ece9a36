"""
What the program runs under, in its own process: resource limits (set_limits), and convenience guards in
the interpreter (guard_writes, disable_dangerous) that stop what a confused model writes with a clear
error. Introspection gets around the guards; the kernel layers (kernel.py) are what hold then.
"""

from __future__ import annotations

import math
import os
import signal
import sys

MAX_FILE_BYTES = 16 * 1024 * 1024        # RLIMIT_FSIZE: largest file the program may write
MAX_PROCESSES_IN_NAMESPACE = 8           # RLIMIT_NPROC inside a private user namespace (threads count)

# Modules a HumanEval-style solution may import, loaded before privileges are dropped (afterwards the
# interpreter's own files may be unreadable, e.g. a Python installed under a root-only home directory).
PRELOAD_MODULES = (
    "abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
    "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "numbers",
    "operator", "random", "re", "statistics", "string", "struct", "textwrap", "time", "traceback", "typing",
    "unicodedata",
)
SANDBOX_MODULES = ("builtins", "ctypes", "io", "_io", "linecache", "posix", "resource", "select", "shutil",
                   "socket", "subprocess", "_posixsubprocess")

_DISABLED_OS = (
    "system", "popen", "kill", "killpg", "fork", "forkpty", "setsid", "setpgid", "setpgrp", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "remove", "unlink", "rmdir", "removedirs", "rename",
    "renames", "replace", "truncate", "ftruncate", "link", "symlink", "chmod", "fchmod", "lchmod", "chown",
    "fchown", "lchown", "chroot", "chdir", "fchdir", "chflags", "lchflags", "mkfifo", "mknod",
    "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv", "execve",
    "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
    "spawnvpe", "plock", "_exit", "abort",
)
_DISABLED_SHUTIL = ("rmtree", "move", "chown", "copytree", "make_archive", "unpack_archive")
_DISABLED_SUBPROCESS = ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")
_BLOCKED_MODULES = ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "pty", "resource", "psutil",
                    "_socket", "ssl", "_ssl", "select", "selectors", "asyncio", "urllib.request",
                    "http.client", "ftplib", "smtplib", "telnetlib", "tkinter", "ipdb", "joblib")


def preload() -> None:
    """Import the modules above (those this interpreter has), while their files can still be read."""
    for name in SANDBOX_MODULES + PRELOAD_MODULES:
        try:
            __import__(name)
        except ImportError:
            pass


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    refuse.__name__ = name.rsplit(".", 1)[-1]
    return refuse


def set_limits(timeout: float, max_memory_bytes: int, in_namespace: bool) -> None:
    import resource
    cpu_seconds = math.ceil(timeout) + 1
    limits = [(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1)),
              (resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES)),
              (resource.RLIMIT_CORE, (0, 0)),
              # outside a private namespace the count is over all of the user's processes: allow none
              (resource.RLIMIT_NPROC, (MAX_PROCESSES_IN_NAMESPACE,) * 2 if in_namespace else (0, 0))]
    if max_memory_bytes:
        limits += [(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes)),
                   (resource.RLIMIT_DATA, (max_memory_bytes, max_memory_bytes))]
    for which, value in limits:
        try:
            resource.setrlimit(which, value)
        except (ValueError, OSError):
            if sys.platform.startswith("linux"):
                raise
            # some limits (RLIMIT_AS on macOS) cannot be set elsewhere: the remaining layers still apply
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing


def guard_writes(work_dir: str) -> None:
    """Refuse to open files for writing (or make directories) outside the working directory."""
    import builtins
    import io
    import posix
    import _io

    def check(path, what: str) -> None:
        if isinstance(path, int):
            return  # an already-open descriptor
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        if real != os.devnull and real != work_dir and not real.startswith(work_dir + os.sep):
            raise PermissionError(f"{what} outside the sandbox's working directory is disabled: {path!r}")

    real_open, real_os_open, real_mkdir, real_file_io = _io.open, os.open, os.mkdir, _io.FileIO
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            check(path, "writing")
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        check(path, "making directories")
        return real_mkdir(path, *args, **kwargs)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = posix.open = guarded_os_open
    os.mkdir = posix.mkdir = guarded_mkdir


def disable_dangerous() -> None:
    import shutil
    import socket
    import subprocess as sp
    import _posixsubprocess
    import posix
    for name in _DISABLED_OS:
        for module in (os, posix):  # os re-exports posix's functions: close both doors
            if hasattr(module, name):
                setattr(module, name, _disabled(f"{module.__name__}.{name}"))
    for name in _DISABLED_SHUTIL:
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    for name in _DISABLED_SUBPROCESS:
        setattr(sp, name, _disabled(f"subprocess.{name}"))
    _posixsubprocess.fork_exec = _disabled("_posixsubprocess.fork_exec")
    no_network = _disabled("network access (socket)")
    for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
                 "getaddrinfo", "gethostbyname"):
        setattr(socket, name, no_network)
    for name in list(sys.modules):
        if name in _BLOCKED_MODULES or name.split(".")[0] in ("ctypes", "multiprocessing", "asyncio"):
            sys.modules[name] = None  # a later `import` of it raises ImportError
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None
