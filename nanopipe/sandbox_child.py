"""
The processes nanopipe/execution.py starts (read that module's docstring for the boundary and the threat
model), each run as `python -I sandbox_child.py FLAG ...` and importing nothing but the standard library:
- the sandbox (`--sandbox-child`): as the launcher it drops privileges and enters the namespaces, then forks
  the init, which isolates the filesystem, drops every capability and runs the untrusted program under its
  limits, reporting on two pipes; given a pipe of calls, it then serves calls of one function the program
  defined, arguments and results crossing as literal values only;
- the judge (`--judge`, trusted, never runs untrusted code): runs a problem's tests, whose `candidate` is a
  proxy that sends each call to the sandbox and decodes the answer into fresh builtin values, and writes
  the verdict on a socket that only the caller holds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time

MAX_FILE_BYTES = 16 * 1024 * 1024        # RLIMIT_FSIZE: largest file the program may write
MAX_TMP_BYTES = 64 * 1024 * 1024         # size of the private tmpfs working directory
MAX_PROCESSES_IN_NAMESPACE = 8           # RLIMIT_NPROC inside a private user namespace (threads count)
KILL_GRACE_SECONDS = 2.0                 # wall-clock slack for interpreter start-up before the hard kill
NOBODY_UID = NOBODY_GID = 65534
HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # scratch space and daemons' sockets, emptied

# Protections, as named in sandbox_protections() and the log line; the required ones make the boundary.
REQUIRED_PROTECTIONS = ("user-namespace", "pid-namespace", "network-namespace", "read-only-filesystem",
                        "private-tmp", "no-capabilities")
OPTIONAL_PROTECTIONS = ("mount-namespace", "ipc-namespace", "private-proc", "nobody")

CHILD_FLAG = "--sandbox-child"
JUDGE_FLAG = "--judge"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024      # one call or answer between the judge and the sandbox, as JSON
MAX_LITERAL_DEPTH = 64                   # nesting of lists, tuples, dicts and sets in one value
MAX_ITERATOR_ITEMS = 1_000_000           # items a returned generator (or other iterator) may yield
MAX_ERROR_CHARS = 2000
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x1, 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SYS_MOUNT_SETATTR = 442                 # the same number on every architecture (added in Linux 5.12)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = -100, 0x8000, 0x1, 0x2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


# Modules a HumanEval-style solution may import, loaded before privileges are dropped (afterwards the
# interpreter's own files may be unreadable, e.g. a Python installed under a root-only home directory).
_PRELOAD_MODULES = (
    "abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
    "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "numbers",
    "operator", "random", "re", "statistics", "string", "struct", "textwrap", "time", "traceback", "typing",
    "unicodedata",
)
_SANDBOX_MODULES = ("builtins", "ctypes", "io", "_io", "linecache", "posix", "resource", "select", "shutil",
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


class SandboxTimeout(BaseException):
    """Raised inside the program when its wall-clock time is up (BaseException: `except Exception` misses it)."""


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    refuse.__name__ = name.rsplit(".", 1)[-1]
    return refuse


# --- literal values between the judge and the sandbox (never pickle: unpickling runs code)

class NotLiteral(ValueError):
    """A value that cannot cross between the judge and the sandbox as a literal."""


_PLAIN_TYPES = (int, float, str, bytes, complex, list, tuple, dict, set, frozenset)


def encode_literal(value, depth: int = 0):
    """`value` as JSON data: JSON's own None, bool, int, float, str and list; a one-key object for the rest
    ({"tuple"|"set"|"frozenset"|"iterator": [...], "dict": [[key, value], ...], "bytes": hex,
    "complex": [real, imag]}). A subclass of those types crosses as its plain value (a Counter as a dict, a
    namedtuple as a tuple), a finite iterator (generator, map, zip) as what it yields; else NotLiteral."""
    if depth > MAX_LITERAL_DEPTH:
        raise NotLiteral(f"a value nested deeper than {MAX_LITERAL_DEPTH} levels")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    items = lambda values: [encode_literal(item, depth + 1) for item in values]
    if kind is list:
        return items(value)
    if kind in (tuple, set, frozenset):
        return {kind.__name__: items(value)}
    if kind is dict:
        return {"dict": [[encode_literal(k, depth + 1), encode_literal(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    for plain in _PLAIN_TYPES:
        if isinstance(value, plain):
            return encode_literal(plain(value), depth + 1)
    from collections.abc import Iterator
    if isinstance(value, Iterator):
        yielded = []
        for item in value:
            if len(yielded) == MAX_ITERATOR_ITEMS:
                raise NotLiteral(f"an iterator of more than {MAX_ITERATOR_ITEMS} items")
            yielded.append(item)
        return {"iterator": items(yielded)}
    raise NotLiteral(f"a value of type {getattr(kind, '__qualname__', '?')[:100]}")


def decode_literal(data, depth: int = 0):
    """The value that encode_literal made `data` from, built of fresh builtin objects only (an iterator
    comes back as a list iterator); ValueError for anything else. On the judge's side this is the boundary:
    whatever the sandbox sends becomes plain data, or a failure."""
    if depth > MAX_LITERAL_DEPTH:
        raise ValueError(f"a value nested deeper than {MAX_LITERAL_DEPTH} levels")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode_literal(item, depth + 1) for item in data]
    if kind is dict and len(data) == 1:
        (tag, payload), = data.items()
        try:
            if tag in ("tuple", "set", "frozenset", "iterator") and type(payload) is list:
                values = [decode_literal(item, depth + 1) for item in payload]
                if tag == "iterator":
                    return iter(values)
                return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](values)
            if tag == "dict" and type(payload) is list and all(type(p) is list and len(p) == 2 for p in payload):
                return {decode_literal(k, depth + 1): decode_literal(v, depth + 1) for k, v in payload}
            if tag == "bytes" and type(payload) is str:
                return bytes.fromhex(payload)
            if (tag == "complex" and type(payload) is list and len(payload) == 2
                    and all(type(part) in (int, float) for part in payload)):
                return complex(*payload)
        except (TypeError, OverflowError) as e:  # an unhashable set member or dict key; a huge int
            raise ValueError(f"not a literal value: {e}") from None
    raise ValueError(f"not an encoded literal value: {str(data)[:100]}")


class _LineReader:
    """JSON lines from a pipe, each at most MAX_MESSAGE_BYTES."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, bytearray()

    def readline(self, deadline: float | None = None) -> bytes | None:
        """The next line (None at end of file); TimeoutError once time.monotonic() passes `deadline`,
        ValueError for a line over the size limit."""
        newline = self.buffer.find(b"\n")
        while newline < 0:
            if len(self.buffer) > MAX_MESSAGE_BYTES:
                raise ValueError(f"a message over {MAX_MESSAGE_BYTES} bytes")
            if deadline is not None:
                import select
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            newline = chunk.find(b"\n")
            if newline >= 0:
                newline += len(self.buffer)
            self.buffer += chunk
        line = bytes(self.buffer[:newline])
        del self.buffer[:newline + 1]
        return line


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- kernel isolation (launcher, then init)

def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _drop_privileges() -> bool:
    try:
        os.setgroups([])
        os.setgid(NOBODY_GID)
        os.setuid(NOBODY_UID)
    except PermissionError:  # root without CAP_SETUID (some containers): the other layers still hold
        return False
    return True


def _enter_namespaces() -> list[str]:
    """Unshare user+mount+PID+network+IPC namespaces (the next fork becomes the PID namespace's init), mapping
    only our own uid and gid into it; where that fails, user+network alone. The protections made."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC) != 0:
        return ["user-namespace", "network-namespace"] if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0 else []
    # after a setuid the process is not dumpable and its /proc files belong to root: dumpable while mapping
    libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:  # unmapped, the namespace cannot mount anything: isolation is incomplete
        return ["network-namespace", "ipc-namespace"]
    finally:
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    return ["user-namespace", "mount-namespace", "pid-namespace", "network-namespace", "ipc-namespace"]


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()
    _check(_libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _make_read_only_recursively(path: str) -> None:
    """mount_setattr(2) with AT_RECURSIVE: every mount under `path` read-only and nosuid, in this namespace."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(_libc().syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), path.encode(),
                           ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           f"mount_setattr {path} read-only")


def _isolate_filesystem(work_dir: str) -> list[str]:
    """In the init of the new namespaces: fresh /proc, scratch directories emptied, everything read-only,
    then a private tmpfs as the working directory. The protections made, in order, until one fails."""
    made = []
    nosuid_nodev_noexec = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing done here propagates back to the host
    try:
        _mount("proc", "/proc", "proc", nosuid_nodev_noexec)
        made.append("private-proc")
    except OSError:  # e.g. a container's /proc has masked paths: hide the host's processes instead
        _mount("tmpfs", "/proc", "tmpfs", nosuid_nodev_noexec | _MS_RDONLY, "size=4k")
    for path in HIDDEN_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", nosuid_nodev_noexec, "size=1m,mode=0755")
    os.makedirs(work_dir, exist_ok=True)  # inside an emptied /tmp the working directory is made again
    _make_read_only_recursively("/")
    made.append("read-only-filesystem")
    _mount("tmpfs", work_dir, "tmpfs", nosuid_nodev_noexec,
           f"size={MAX_TMP_BYTES},nr_inodes=4096,mode=0700,uid={os.getuid()},gid={os.getgid()}")
    os.chdir(work_dir)  # the old directory is underneath the tmpfs now
    made.append("private-tmp")
    return made


def _drop_capabilities() -> None:
    """Give up every capability in the namespace (permitted, effective, inheritable, ambient, bounding) and
    set no_new_privs, so no exec gets them back and the mounts above cannot be undone."""
    import ctypes
    libc = _libc()
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability this kernel knows
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _send(fd: int, **fields) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def _setup_init(work_dir: str) -> tuple[list[str], str | None]:
    """In the init, before the program: tie it to the launcher, isolate the filesystem, drop capabilities.
    (The protections made, what failed.)"""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the launcher, and its namespace too
    os.setsid()  # signals to "my process group" stay inside the namespace
    made, errors = [], []
    try:
        made += _isolate_filesystem(work_dir)
    except OSError as e:
        errors.append(str(e))
    try:  # whatever the mounts came to, the program gets no capability to change them
        _drop_capabilities()
        made.append("no-capabilities")
    except OSError as e:
        errors.append(str(e))
    return made, "; ".join(errors) or None


def _run_init(run, status_fd: int, program_fds: list[int], work_dir: str, protections: list[str],
              require_isolation: bool, deadline_s: float):
    """Fork the PID namespace's init, which sets itself up and calls `run`; tell the parent which protections
    hold (or refuse), kill the init at the deadline, report how it ended; never returns."""
    import select
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the init: process 1 of the new PID namespace
        os.close(status_fd)  # the launcher's channel to the parent never reaches the program
        os.close(setup_r)
        made, error = _setup_init(work_dir)
        _send(setup_w, made=made, error=error)
        os.close(setup_w)
        if require_isolation and any(name not in protections + made for name in REQUIRED_PROTECTIONS):
            os._exit(0)  # the launcher refuses on our behalf: the program is never run
        run(in_namespace=True)
    os.close(setup_w)
    for fd in program_fds:  # only the init holds the program's pipes: the judge sees EOF when it ends
        os.close(fd)
    setup = json.loads(_read_all(setup_r) or b'{"made": [], "error": "the init died during setup"}')
    os.close(setup_r)
    protections = protections + setup["made"]
    missing = [name for name in REQUIRED_PROTECTIONS if name not in protections]
    if missing and require_isolation:
        _send(status_fd, refused=f"could not set up {', '.join(missing)}: {setup['error']}")
    else:
        _send(status_fd, protections=protections, error=setup["error"])
    pidfd = os.pidfd_open(pid)
    killed = not select.select([pidfd], [], [], deadline_s)[0]
    if killed:  # the kernel then kills everything else in its namespace
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    _send(status_fd, killed_at_deadline=killed, returncode=os.waitstatus_to_exitcode(wait_status))
    os._exit(0)


# --- the program (in the init, or in the launcher itself where there are no namespaces)

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


def _run_program(header: dict, program: str, report_fd: int, calls_fd: int, work_dir: str, timeout: float,
                 max_memory_bytes: int, in_namespace: bool) -> None:
    """Limit this process, put up the Python guards, run the program and report how it went (to the parent,
    or to the judge whose calls it then serves); never returns."""
    import linecache
    from traceback import format_exception as format_exc
    write, exit_now = os.write, os._exit
    _set_limits(timeout, max_memory_bytes, in_namespace)
    _guard_writes(work_dir)
    _disable_dangerous()

    def on_alarm(signum, frame):
        raise SandboxTimeout(f"timed out after {timeout:g} s")

    def on_cpu_limit(signum, frame):
        raise SandboxTimeout(f"CPU time limit exceeded ({math.ceil(timeout) + 1} s)")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGXCPU, on_cpu_limit)  # as the init, an unhandled SIGXCPU would be ignored
    report = {"token": header["token"], "success": False, "timeout": False, "memory_exceeded": False, "error": None}
    # tracebacks show the program's lines
    linecache.cache["<program>"] = (len(program), None, program.splitlines(True), "<program>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    budget_s = timeout  # what is left of it goes to the calls the judge makes
    try:
        code = compile(program, "<program>", "exec")
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(code, namespace)
        finally:
            budget_s = signal.setitimer(signal.ITIMER_REAL, 0)[0]
        report["success"] = True
    except BaseException as e:  # the program's failure is the result we report, whatever it was
        report.update(_describe_failure(e, max_memory_bytes, format_exc))
    _flush_output()
    if calls_fd < 0:
        write(report_fd, (json.dumps(report) + "\n").encode())
        exit_now(0)
    function = namespace.get(header["entry_point"])
    if report["success"] and not callable(function):
        report.update(success=False, error=f"NameError: the program defines no function {header['entry_point']!r}")
    if not report["success"]:
        _write_all(report_fd, (json.dumps({"load_error": report}) + "\n").encode())
        exit_now(0)
    _write_all(report_fd, b'{"ready": true}\n')
    _serve(function, timeout, budget_s, calls_fd, report_fd, max_memory_bytes, format_exc)
    exit_now(0)


def _describe_failure(e: BaseException, max_memory_bytes: int, format_exc) -> dict:
    """The report's fields for an exception of the program (its traceback goes to stderr)."""
    if isinstance(e, SandboxTimeout):
        return {"timeout": True, "error": str(e)}
    if isinstance(e, MemoryError):
        return {"memory_exceeded": True, "error": f"MemoryError: over the memory limit of {max_memory_bytes} bytes"}
    try:
        message = str(e)
    except Exception:  # the program's own exception class may fail to describe itself
        message = ""
    try:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # skip the sandbox's frame
        sys.stderr.write("".join(format_exc(type(e), e, tb)))
    except (OSError, ValueError):
        pass
    return {"error": (f"{type(e).__name__}: {message}" if message else type(e).__name__)[:MAX_ERROR_CHARS]}


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _serve(function, timeout: float, budget_s: float, calls_fd: int, replies_fd: int, max_memory_bytes: int,
           format_exc) -> None:
    """Answer the judge's calls of `function`, one JSON line each, until it closes the calls pipe or something
    ends the session (time up, memory, an answer that is not a literal value). The program's time limit
    covers the calls together: the clock stops while waiting for the next one."""
    reader = _LineReader(calls_fd)
    while (line := reader.readline()) is not None:
        call = json.loads(line)
        args, kwargs = decode_literal(call["args"]), decode_literal(call["kwargs"])
        reply = None
        try:
            if budget_s <= 0:
                raise SandboxTimeout(f"timed out after {timeout:g} s")
            signal.setitimer(signal.ITIMER_REAL, budget_s)
            try:
                value = function(*args, **kwargs)
                try:  # a generator's code runs now, on the same clock
                    reply = {"value": encode_literal(value)}
                except (NotLiteral, RecursionError) as e:
                    reply = {"failure": f"the candidate returned {e}, which is not a literal value (numbers, strings, "
                                        f"bytes, None, and lists, tuples, dicts and sets of them)"}
            finally:
                budget_s = signal.setitimer(signal.ITIMER_REAL, 0)[0]
        except (SandboxTimeout, MemoryError) as e:
            reply = {"failure": _describe_failure(e, max_memory_bytes, format_exc)["error"],
                     "timeout": isinstance(e, SandboxTimeout), "memory_exceeded": isinstance(e, MemoryError)}
        except BaseException as e:  # raised by the candidate: the test decides what that means
            reply = {"raised": [type(e).__name__, _describe_failure(e, max_memory_bytes, format_exc)["error"]]}
        _flush_output()
        try:
            data = (json.dumps(reply) + "\n").encode()
        except ValueError as e:  # an int too long to print (sys.get_int_max_str_digits)
            failure = f"the candidate returned a value that cannot be written: {e}"
            data = (json.dumps({"failure": failure}) + "\n").encode()
        _write_all(replies_fd, data)
        if "failure" in reply:
            return


def _child_main(argv: list[str]) -> None:
    report_fd, status_fd, calls_fd = int(argv[0]), int(argv[1]), int(argv[2])
    timeout, deadline_s, max_memory_bytes = float(argv[3]), float(argv[4]), int(argv[5])
    drop_privileges, require_isolation = argv[6] == "1", argv[7] == "1"
    header, _, program = sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass").partition("\n")
    header = json.loads(header)
    sys.stdin = open(os.devnull)  # the program gets an empty stdin
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=False)
    work_dir = os.path.realpath(os.getcwd())
    for name in _SANDBOX_MODULES + _PRELOAD_MODULES:
        try:
            __import__(name)
        except ImportError:
            pass

    protections = ["nobody"] if drop_privileges and _drop_privileges() else []
    protections += _enter_namespaces()
    run = functools.partial(_run_program, header, program, report_fd, calls_fd, work_dir, timeout, max_memory_bytes)
    if "pid-namespace" in protections:
        _run_init(run, status_fd, [fd for fd in (report_fd, calls_fd) if fd >= 0], work_dir, protections,
                  require_isolation, deadline_s)
    missing = [name for name in REQUIRED_PROTECTIONS if name not in protections]
    if missing and require_isolation:
        _send(status_fd, refused=f"could not set up {', '.join(missing)}")
        os._exit(0)
    _send(status_fd, protections=protections, error=None)
    os.close(status_fd)  # the program runs in this process: it must not reach the launcher's channel
    run(in_namespace="user-namespace" in protections)


# --- the judge (trusted: runs the problem's tests; no code of the candidate ever runs here)

class CandidateFailure(BaseException):
    """The candidate failed in a way no test may catch (BaseException: `except Exception` misses it): it
    crashed, ran out of time or memory, or answered with something that is not a literal value."""


class CandidateError(Exception):
    """The candidate raised an exception that is not one of Python's builtin ones."""


class _Candidate:
    """The test's `candidate`: a call crosses to the sandbox as literal values, the answer comes back as one.
    The first failure sticks: every later call fails the same way, and the verdict is a failure whatever
    the test does with the exception."""

    def __init__(self, name: str, calls_fd: int, replies_fd: int, deadline: float):
        self.__name__ = self.__qualname__ = name
        self.calls_fd, self.replies, self.deadline = calls_fd, _LineReader(replies_fd), deadline
        self.calls = 0
        self.failure: dict | None = None

    def __repr__(self) -> str:
        return f"<candidate {self.__name__} in the sandbox>"

    def fail(self, error: str, timeout: bool = False, memory_exceeded: bool = False) -> CandidateFailure:
        if self.failure is None:
            self.failure = {"error": error[:MAX_ERROR_CHARS], "timeout": timeout, "memory_exceeded": memory_exceeded}
        return CandidateFailure(self.failure["error"])

    def wait_until_loaded(self) -> None:
        reply = self._receive()
        if reply.get("ready") is not True:
            load = reply.get("load_error")
            load = load if type(load) is dict else {}
            raise self.fail(f"the candidate's program failed: {load.get('error')}", timeout=load.get("timeout") is True,
                            memory_exceeded=load.get("memory_exceeded") is True)

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            raise CandidateFailure(self.failure["error"])
        try:
            call = json.dumps({"args": encode_literal(list(args)), "kwargs": encode_literal(kwargs)})
        except (NotLiteral, ValueError) as e:
            raise self.fail(f"the test passed the candidate {e}, which cannot cross to the sandbox") from None
        self.calls += 1
        try:
            _write_all(self.calls_fd, (call + "\n").encode())
        except OSError:
            raise self.fail("the candidate's process ended before the call (it exited or crashed)") from None
        reply = self._receive()
        if "value" in reply:
            try:
                return decode_literal(reply["value"])
            except ValueError as e:
                raise self.fail(f"the sandbox answered with {e}") from None
        if "raised" in reply:
            raise self._raised(reply["raised"])
        failure = reply.get("failure")
        raise self.fail(failure if type(failure) is str else "the sandbox sent an unknown message",
                        timeout=reply.get("timeout") is True, memory_exceeded=reply.get("memory_exceeded") is True)

    def _receive(self) -> dict:
        try:
            line = self.replies.readline(self.deadline)
        except TimeoutError:
            raise self.fail("timed out: the candidate did not answer in time", timeout=True) from None
        except ValueError as e:
            raise self.fail(f"the sandbox sent {e}") from None
        if line is None:
            raise self.fail("the candidate's process ended without answering (it exited or crashed)")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = None
        if type(reply) is not dict:
            raise self.fail("the sandbox sent something that is not a message")
        return reply

    def _raised(self, raised) -> BaseException:
        """The candidate's exception, as the same builtin exception type if it is one (a test may expect a
        ValueError), else as a CandidateError; an exit or interrupt is a failure."""
        import builtins
        if not (type(raised) is list and len(raised) == 2 and all(type(part) is str for part in raised)):
            return self.fail("the sandbox sent a malformed exception")
        name, error = raised
        message = error.partition(": ")[2] if error.startswith(name + ": ") else ""
        kind = getattr(builtins, name, None)
        if not isinstance(kind, type) or not issubclass(kind, BaseException):
            kind = None
        elif not issubclass(kind, Exception):  # SystemExit, KeyboardInterrupt, GeneratorExit
            return self.fail(f"the candidate raised {error}")
        exception = None
        if kind is not None:
            try:
                exception = kind(message)
            except Exception:  # a builtin that needs more arguments (UnicodeDecodeError)
                pass
        exception = exception if exception is not None else CandidateError(error)
        exception.candidate_error = error
        return exception


def _describe_test_failure(e: BaseException) -> str:
    """What failed, for the verdict: the candidate's own error, or the test's exception with its line."""
    if hasattr(e, "candidate_error"):
        return f"the candidate raised {e.candidate_error}"
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    tb, where = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            where = tb.tb_lineno
        tb = tb.tb_next
    if where is not None:
        import linecache
        text += f" (test line {where}: {linecache.getline('<test>', where).strip()})"
    return text[:MAX_ERROR_CHARS]


def _judge(spec: dict, calls_fd: int, replies_fd: int) -> dict:
    """Run the problem's trusted code and test, then check(candidate); the verdict."""
    import linecache
    candidate = _Candidate(spec["entry_point"], calls_fd, replies_fd, time.monotonic() + spec["deadline_s"])
    verdict = {"success": False, "error": None, "timeout": False, "memory_exceeded": False}
    namespace = {"__name__": "__main__"}
    linecache.cache["<test>"] = (len(spec["test"]), None, spec["test"].splitlines(True), "<test>")
    try:
        exec(compile(spec["context"], "<context>", "exec"), namespace)
        exec(compile(spec["test"], "<test>", "exec"), namespace)
        if not callable(namespace.get("check")):
            raise NameError("the test defines no check(candidate) function")
    except BaseException as e:  # the problem's own code: its failure is not the candidate's
        verdict["error"] = f"the problem's test does not run: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
        return verdict
    namespace[spec["entry_point"]] = candidate  # a test may call the function by its name (HumanEval/33)
    try:
        candidate.wait_until_loaded()
        namespace["check"](candidate)
        verdict["success"] = True
    except BaseException as e:  # the test failed, whatever it raised
        verdict["error"] = _describe_test_failure(e)
    if candidate.failure is not None:  # even where the test caught it
        verdict.update(success=False, **candidate.failure)
    return {**verdict, "calls": candidate.calls}


def _make_undumpable() -> None:
    """No process of the same user may read or write this one's memory or descriptors (ptrace, /proc/<pid>/mem,
    /proc/<pid>/fd): it matters where the sandbox is the weaker one, sharing our user and PID namespace."""
    try:
        _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the sandbox there is the weaker one anyway
        pass


def _judge_main(argv: list[str]) -> None:
    calls_fd, replies_fd, verdict_fd = int(argv[0]), int(argv[1]), int(argv[2])
    _make_undumpable()
    spec = json.loads(sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass"))
    sys.stdin = open(os.devnull)
    verdict = _judge(spec, calls_fd, replies_fd)
    os.close(calls_fd)  # the sandbox's serving ends
    _flush_output()
    _write_all(verdict_fd, (json.dumps({"token": spec["token"], **verdict}) + "\n").encode())
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
    _child_main(sys.argv[2:])
elif __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == JUDGE_FLAG:
    _judge_main(sys.argv[2:])
