"""
Run untrusted Python (model completions for HumanEval) in a separate, limited process.

    result = execute_code(prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n", timeout=5.0)
    result.success, result.timeout, result.error, result.stdout

Layers of containment, outermost first:
- a fresh interpreter (`python -I`, no user site, no PYTHON* env) in its own session/process group, killed
  as a group once the wall-clock deadline passes, and also after it ends (no stray grandchildren);
- a temporary working directory that is removed afterwards; stdout/stderr go to files, read back capped;
- resource limits: address space (memory), CPU seconds, file size, number of processes, no core dumps;
- when the kernel allows it (Linux user namespaces), a private network namespace with no interfaces up,
  so even loopback is unreachable; when running as root, the privileges are dropped to `nobody` first,
  so the kernel itself refuses to touch files the user does not own, and the process limit applies;
- inside the interpreter: socket creation disabled, destructive functions disabled (os.remove/unlink/
  rmdir/rename/system/kill/fork/exec*, shutil.rmtree/move, subprocess, ctypes), and opening a file for
  writing is refused outside the working directory.

This contains what a confused model writes (deleting files, fork bombs, infinite loops, huge allocations,
network calls). It is not a security boundary against code written to escape a Python sandbox: the
in-interpreter guards can be bypassed by introspection; only the kernel-level layers hold then.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 1024 * 1024           # stdout/stderr kept per run (the rest is dropped)
MAX_FILE_BYTES = 16 * 1024 * 1024        # RLIMIT_FSIZE: largest file the program may write
MAX_PROCESSES_IN_NAMESPACE = 8           # RLIMIT_NPROC inside a private user namespace (threads count)
KILL_GRACE_SECONDS = 2.0                 # wall-clock slack for interpreter start-up before the hard kill
NOBODY_UID = NOBODY_GID = 65534

_CHILD_FLAG = "--sandbox-child"
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


@dataclass
class ExecutionResult:
    """What happened to one program: passed (ran to the end), or why not."""

    success: bool
    stdout: str
    stderr: str
    timeout: bool = False
    error: str | None = None
    memory_exceeded: bool = False


# -----------------------------------------------------------------------------
# Parent side

def _read_capped(path: Path, limit: int = MAX_OUTPUT_BYTES) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _read_report(fd: int, token: str) -> dict | None:
    """The child's JSON report from the result pipe, or None if it never wrote one."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) <= MAX_OUTPUT_BYTES and (chunk := os.read(fd, 65536)):
            data += chunk
    except BlockingIOError:
        pass
    # the program can write to the pipe too: only a report carrying the parent's token counts
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and report.get("token") == token and "success" in report:
            return report
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(returncode: int) -> tuple[str, bool]:
    """(error message, is_timeout) for a child that ended without reporting."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}", False
        if sig == signal.SIGXCPU:
            return "CPU time limit exceeded (SIGXCPU)", True
        if sig == signal.SIGXFSZ:
            return "file size limit exceeded (SIGXFSZ)", False
        return f"killed by {sig.name}", False
    return f"exited with status {returncode} before reporting a result", False


def execute_code(program: str, timeout: float = 5.0,
                 max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES) -> ExecutionResult:
    """Run `program` in a sandboxed child interpreter; success means it ran to the end without raising."""
    assert timeout > 0, f"timeout must be positive, got {timeout}"
    assert max_memory_bytes is None or max_memory_bytes >= 32 * 1024 * 1024, (
        f"max_memory_bytes={max_memory_bytes} is below what an interpreter needs to start (32 MiB)")
    drop_privileges = os.geteuid() == 0
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="nanopipe-sandbox-", ignore_cleanup_errors=True) as root:
        root = Path(root)
        work_dir = root / "work"
        work_dir.mkdir()
        if drop_privileges:  # the child runs as nobody: it must reach and write its working directory
            os.chmod(root, 0o711)
            os.chown(work_dir, NOBODY_UID, NOBODY_GID)
        stdout_path, stderr_path = root / "stdout", root / "stderr"
        report_r, report_w = os.pipe()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work_dir),
               "TMPDIR": str(work_dir), "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", os.path.abspath(__file__), _CHILD_FLAG, str(report_w), repr(float(timeout)),
                str(max_memory_bytes or 0), "1" if drop_privileges else "0"]
        try:
            with open(stdout_path, "wb") as out_f, open(stderr_path, "wb") as err_f:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f, cwd=work_dir,
                                        env=env, pass_fds=(report_w,), start_new_session=True)
            os.close(report_w)
            report_w = -1
            killed_at_deadline = False
            try:
                proc.communicate((token + "\n" + program).encode("utf-8", errors="surrogatepass"),
                                 timeout=timeout + KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                killed_at_deadline = True
                _kill_group(proc.pid)
                proc.wait()
            _kill_group(proc.pid)  # whatever it left behind in its group goes too
            report = _read_report(report_r, token)
        finally:
            if report_w >= 0:
                os.close(report_w)
            os.close(report_r)
        stdout, stderr = _read_capped(stdout_path), _read_capped(stderr_path)
    if report is not None and not killed_at_deadline:
        return ExecutionResult(success=bool(report["success"]), stdout=stdout, stderr=stderr,
                               timeout=bool(report.get("timeout")), error=report.get("error"),
                               memory_exceeded=bool(report.get("memory_exceeded")))
    if killed_at_deadline:
        return ExecutionResult(False, stdout, stderr, timeout=True,
                               error=f"timed out after {timeout:g} s (process group killed)")
    error, is_timeout = _describe_exit(proc.returncode)
    return ExecutionResult(False, stdout, stderr, timeout=is_timeout, error=error)


# -----------------------------------------------------------------------------
# Child side: runs as `python -I execution.py --sandbox-child ...`, imports nothing but the standard library

# Modules a HumanEval-style solution may import, loaded before privileges are dropped (afterwards the
# interpreter's own files may be unreadable, e.g. a Python installed under a root-only home directory).
_PRELOAD_MODULES = (
    "abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
    "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "numbers",
    "operator", "random", "re", "statistics", "string", "struct", "textwrap", "time", "traceback", "typing",
    "unicodedata",
)
_SANDBOX_MODULES = ("builtins", "io", "_io", "posix", "resource", "shutil", "socket", "subprocess", "_posixsubprocess")

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


class SandboxTimeout(BaseException):
    """Raised inside the program when its wall-clock time is up (BaseException: `except Exception` misses it)."""


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    refuse.__name__ = name.rsplit(".", 1)[-1]
    return refuse


def _isolate_kernel_level(drop_privileges: bool) -> bool:
    """Drop root to nobody, enter private user+network namespaces. True if the namespaces were made."""
    for name in _SANDBOX_MODULES + _PRELOAD_MODULES:
        try:
            __import__(name)
        except ImportError:
            pass
    import ctypes
    if drop_privileges:
        try:
            os.setgroups([])
            os.setgid(NOBODY_GID)
            os.setuid(NOBODY_UID)
        except PermissionError:  # root without CAP_SETUID (some containers): the other layers still hold
            pass
    unshare = getattr(ctypes.CDLL(None, use_errno=True), "unshare", None)  # Linux only
    return unshare is not None and unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0


def _set_limits(timeout: float, max_memory_bytes: int, in_namespace: bool) -> None:
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


def _guard_writes(work_dir: str) -> None:
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


def _disable_dangerous() -> None:
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


def _child_main(argv: list[str]) -> None:
    report_fd, timeout, max_memory_bytes, drop_privileges = (
        int(argv[0]), float(argv[1]), int(argv[2]), argv[3] == "1")
    token, _, program = sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass").partition("\n")
    sys.stdin = open(os.devnull)  # the program gets an empty stdin
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=False)
    import linecache
    from traceback import format_exception as format_exc
    write, exit_now = os.write, os._exit
    work_dir = os.path.realpath(os.getcwd())

    in_namespace = _isolate_kernel_level(drop_privileges)
    _set_limits(timeout, max_memory_bytes, in_namespace)
    _guard_writes(work_dir)
    _disable_dangerous()

    def on_alarm(signum, frame):
        raise SandboxTimeout(f"timed out after {timeout:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    report = {"token": token, "success": False, "timeout": False, "memory_exceeded": False, "error": None}
    # tracebacks show the program's lines
    linecache.cache["<program>"] = (len(program), None, program.splitlines(True), "<program>")
    try:
        code = compile(program, "<program>", "exec")
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        report["success"] = True
    except SandboxTimeout as e:
        report.update(timeout=True, error=str(e))
    except MemoryError:
        report.update(memory_exceeded=True, error=f"MemoryError: over the memory limit of {max_memory_bytes} bytes")
    except BaseException as e:  # the program's failure is the result we report, whatever it was
        report["error"] = (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:2000]
        try:
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # skip the sandbox's frame
            sys.stderr.write("".join(format_exc(type(e), e, tb)))
        except (OSError, ValueError):
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    write(report_fd, (json.dumps(report) + "\n").encode())
    exit_now(0)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == _CHILD_FLAG:
    _child_main(sys.argv[2:])
