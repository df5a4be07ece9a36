"""
Run untrusted Python (model completions for HumanEval) in a separate, limited process.

    result = execute_code(prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n", timeout=5.0)
    result.success, result.timeout, result.error, result.stdout

The boundary is the kernel. A fresh interpreter (`python -I`, no PYTHON* env) is started as a small launcher
(nanopipe/sandbox_child.py) that, when running as root, first drops to `nobody`, then enters new user, mount,
PID, network and IPC namespaces and forks the sandbox's init, which runs the program:
- PID namespace: the program is process 1 of its namespace; when it ends, or when the launcher kills it at
  the deadline, the kernel kills every process left in the namespace (forked, `setsid`, re-parented: all);
  it dies with the launcher too (parent-death signal), and sees no process outside;
- mount namespace: the whole filesystem is read-only (every mount, recursively, nosuid); /tmp, /var/tmp,
  /run and /dev/shm are empty; the working directory is a private size-limited tmpfs, the only writable
  place, and it never reaches the host's disk; /proc is a fresh one for the new PID namespace;
- the init drops every capability (bounding set too, no_new_privs) once those mounts are made, so the
  program cannot undo them; a nested user namespace only gets locked copies of them;
- network namespace with no interface up (even loopback is unreachable); a private IPC namespace;
- resource limits: address space (memory), CPU seconds, file size, number of processes, no core dumps.
Inside the interpreter, convenience guards (disabled os.remove/system/fork/exec*, subprocess, ctypes,
sockets, writes outside the working directory) stop what a confused model writes with a clear error; they
can be bypassed by introspection and the kernel layers above are what hold then.

Where the namespaces cannot be made (e.g. a container without user namespaces), `execute_code` refuses
with SandboxUnavailableError unless called with `allow_weaker_sandbox=True` (chat_eval:
`--allow_unsandboxed_code`); then only the privilege drop, rlimits, the process-group kill and the Python
guards apply. `sandbox_protections()` says which layers this machine gives (logged once, on first use).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanopipe import sandbox_child
from nanopipe.sandbox_child import (CHILD_FLAG, KILL_GRACE_SECONDS, NOBODY_GID, NOBODY_UID, OPTIONAL_PROTECTIONS,
                                    REQUIRED_PROTECTIONS)

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 1024 * 1024           # stdout/stderr kept per run (the rest is dropped)


class SandboxUnavailableError(RuntimeError):
    """The kernel cannot isolate untrusted code here, and the caller did not accept a weaker sandbox."""


@dataclass(frozen=True)
class SandboxProtections:
    """The isolation layers the kernel gives a sandboxed program on this machine."""

    active: frozenset[str]

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(name for name in REQUIRED_PROTECTIONS if name not in self.active)

    @property
    def complete(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        known = REQUIRED_PROTECTIONS + OPTIONAL_PROTECTIONS
        text = "code sandbox: " + (", ".join(name for name in known if name in self.active) or "no kernel isolation")
        return text + (f"; missing {', '.join(self.missing)}" if self.missing else "")


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


def _read_lines(fd: int) -> list[dict]:
    """The JSON objects written to a pipe, one a line (what is not JSON is skipped)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) <= MAX_OUTPUT_BYTES and (chunk := os.read(fd, 65536)):
            data += chunk
    except BlockingIOError:
        pass
    objects = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def _read_report(fd: int, token: str) -> dict | None:
    """The program's JSON report from the result pipe, or None if it never wrote one."""
    # the program can write to the pipe too: only a report carrying the parent's token counts
    for report in _read_lines(fd):
        if report.get("token") == token and "success" in report:
            return report
    return None


def _read_status(fd: int) -> dict:
    """What the launcher says (protections made, refusal, deadline kill, how the init ended). Only the
    launcher holds this pipe: the program never gets it."""
    status = {}
    for line in _read_lines(fd):
        status.update(line)
    return status


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(returncode: int) -> tuple[str, bool]:
    """(error message, is_timeout) for a program that ended without reporting."""
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


def _spawn(program: str, timeout: float, max_memory_bytes: int | None,
           require_isolation: bool) -> tuple[ExecutionResult, dict]:
    """Run `program` through the launcher; (its result, the launcher's status)."""
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
        status_r, status_w = os.pipe()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work_dir),
               "TMPDIR": str(work_dir), "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", os.path.abspath(sandbox_child.__file__), CHILD_FLAG, str(report_w), str(status_w),
                repr(float(timeout)), str(max_memory_bytes or 0), "1" if drop_privileges else "0",
                "1" if require_isolation else "0"]
        try:
            with open(stdout_path, "wb") as out_f, open(stderr_path, "wb") as err_f:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f, cwd=work_dir,
                                        env=env, pass_fds=(report_w, status_w), start_new_session=True)
            for fd in (report_w, status_w):
                os.close(fd)
            report_w = status_w = -1
            killed_at_deadline = False
            try:  # the launcher kills the program at timeout + grace; this is the backstop if it hangs
                proc.communicate((token + "\n" + program).encode("utf-8", errors="surrogatepass"),
                                 timeout=timeout + 2 * KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                killed_at_deadline = True
                _kill_group(proc.pid)
                proc.wait()
            _kill_group(proc.pid)  # without a PID namespace: whatever it left behind in its group goes too
            report, status = _read_report(report_r, token), _read_status(status_r)
        finally:
            for fd in (report_w, status_w, report_r, status_r):
                if fd >= 0:
                    os.close(fd)
        stdout, stderr = _read_capped(stdout_path), _read_capped(stderr_path)
    killed_at_deadline = killed_at_deadline or bool(status.get("killed_at_deadline"))
    if report is not None and not killed_at_deadline:
        return ExecutionResult(success=bool(report["success"]), stdout=stdout, stderr=stderr,
                               timeout=bool(report.get("timeout")), error=report.get("error"),
                               memory_exceeded=bool(report.get("memory_exceeded"))), status
    if killed_at_deadline:
        return ExecutionResult(False, stdout, stderr, timeout=True,
                               error=f"timed out after {timeout:g} s (sandbox killed)"), status
    returncode = status.get("returncode", proc.returncode)  # the init's, when there was one
    error, is_timeout = _describe_exit(returncode if isinstance(returncode, int) else proc.returncode)
    return ExecutionResult(False, stdout, stderr, timeout=is_timeout, error=error), status


@functools.cache
def sandbox_protections() -> SandboxProtections:
    """Which isolation layers this machine gives (found once per process by sandboxing an empty program)."""
    _, status = _spawn("", timeout=10.0, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES, require_isolation=False)
    protections = SandboxProtections(frozenset(status.get("protections", ())))
    logger.info(protections.describe() + (f" ({status['error']})" if status.get("error") else ""))
    return protections


def execute_code(program: str, timeout: float = 5.0, max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
                 allow_weaker_sandbox: bool = False) -> ExecutionResult:
    """Run `program` in a sandboxed child interpreter; success means it ran to the end without raising.
    Raises SandboxUnavailableError where the kernel cannot isolate it, unless `allow_weaker_sandbox`."""
    assert timeout > 0, f"timeout must be positive, got {timeout}"
    assert max_memory_bytes is None or max_memory_bytes >= 32 * 1024 * 1024, (
        f"max_memory_bytes={max_memory_bytes} is below what an interpreter needs to start (32 MiB)")
    protections = sandbox_protections()
    if not protections.complete and not allow_weaker_sandbox:
        raise SandboxUnavailableError(
            f"refusing to run untrusted code: the kernel here does not give {', '.join(protections.missing)} "
            f"({protections.describe()}). Run where unprivileged user namespaces and mounts in them are allowed "
            f"(in a container: a seccomp profile that permits unshare and mount), or accept the weaker sandbox "
            f"with allow_weaker_sandbox=True (chat_eval: --allow_unsandboxed_code)")
    result, status = _spawn(program, timeout, max_memory_bytes, require_isolation=not allow_weaker_sandbox)
    if status.get("refused"):  # the probe said yes, this run could not: never run it unisolated
        raise SandboxUnavailableError(f"refusing to run untrusted code: {status['refused']}")
    return result
