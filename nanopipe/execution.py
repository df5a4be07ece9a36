"""
Run untrusted Python (model completions for HumanEval) in a separate, limited process, and decide whether it
passes a problem's tests in another process, which never runs it.

    result = check_candidate(imports + completion, test, entry_point, context=prompt, timeout=5.0)
    result.success, result.timeout, result.error, result.stdout
    execute_code(program).success      # "ran to the end": the program's own claim, never a verdict

Threat model. The code checked is a model's completion; under RL the model is optimised against the score,
so treat that code as written by an adversary who has read this repository: anything Python allows,
introspection and the C API included. Trusted: the caller, the problem (its prompt's code and its test, from
the dataset), this module and the package nanopipe/sandbox/, the interpreter and the kernel. What must hold:
1. the verdict: nothing the candidate executes changes the recorded outcome, other than through the values
   its function returns to the test;
2. the host: it cannot write outside a private scratch directory, reach the network, outlive its deadline,
   see or signal other processes, or use more than its share of memory, CPU and processes.

How the verdict holds. With the test in the candidate's interpreter, code placed before the tests could
set the harness's `success` through `sys._getframe(1).f_locals`, write its own "passed" line with the
harness's token and pipe, call the harness's exit, `os._exit(0)`, patch `builtins`, or return an object
equal to everything (issue 21). So `check_candidate` runs three processes:
- the sandbox (below) runs the candidate's code, then serves calls of its function;
- the judge (`python -I -S sandbox/entry.py --judge`) runs the prompt's code and the test's `check(candidate)`,
  where `candidate` is a proxy: each call goes to the sandbox and the answer comes back. The candidate's
  code never runs in the judge or in the caller, and the test never runs in the sandbox;
- only literal values cross, as JSON with tags (None, bool, int, float, str, bytes, complex, and lists,
  tuples, dicts and sets of them; a finite iterator as what it yields; never pickle), and the judge decodes
  them into fresh builtin objects, so nothing the test does with an answer runs the candidate's code. Any
  other answer (a custom object, a message that is not JSON or too big) fails, saying why;
- each call waits at most until one deadline for the whole check. A candidate that crashes, exits, hangs,
  runs out of memory or answers with anything but a literal fails, and that failure sticks: it is raised in
  the test as a BaseException, and the verdict is failed even where the test catches it. An exception the
  candidate raises reaches the test as the same builtin exception type (a test may expect a ValueError);
- the judge writes the verdict on a socket that only it and the caller hold: one JSON line carrying a token
  that only they know (the sandbox never gets it); anything else there voids it. The sandbox holds only its
  ends of the call and answer pipes and its own output files: what it writes anywhere is at most an answer.
In the full sandbox the candidate cannot see the judge or the caller (its own PID namespace and /proc, no
capabilities, its own user namespace). In the weaker one it runs as `nobody` when the caller is root. Where
the caller is not root it shares the caller's user: the judge makes itself undumpable (no ptrace,
/proc/<pid>/mem or /proc/<pid>/fd by that user) and the verdict's socket cannot be reopened through /proc,
but a program that escapes the Python guards can kill the judge (no verdict: a failure), and where the
kernel lets it ptrace the caller (yama ptrace_scope 0) it can change anything there; the full sandbox is
what holds against that.
Out of scope: the candidate can read what the read-only filesystem shows (a copy of the dataset with its
solutions, say) and answer right without solving anything: a verdict says what the function returned.

The boundary is the kernel. A fresh interpreter (`python -I -S`: no PYTHON* env, no site-packages and none of
their .pth files) is started as a small launcher (nanopipe/sandbox/launcher.py) that, when running as root,
first drops to `nobody`, then enters new user, mount, PID, network and IPC namespaces and forks the sandbox's
init, which runs the program:
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

Where the namespaces cannot be made (e.g. a container without user namespaces), `execute_code` and
`check_candidate` refuse with SandboxUnavailableError unless called with `allow_weaker_sandbox=True`
(chat_eval: `--allow_unsandboxed_code`); then only the privilege drop, rlimits, the process-group kill and
the Python guards apply. `sandbox_protections()` says which layers this machine gives (logged once).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanopipe.sandbox import (CHILD_FLAG, ENTRY_SCRIPT, JUDGE_FLAG, KILL_GRACE_SECONDS, NOBODY_GID, NOBODY_UID,
                              OPTIONAL_PROTECTIONS, REQUIRED_PROTECTIONS)

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 1024 * 1024           # stdout/stderr kept per run (the rest is dropped)
MAX_VERDICT_BYTES = 16 * 1024            # the judge's one line (it fits in a pipe's buffer)


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
    """What happened to one program: passed (execute_code: ran to the end; check_candidate: the tests
    passed), or why not."""

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


def _read_available(fd: int, limit: int) -> bytes:
    """What the writers have put in a pipe or socket so far (up to about `limit` bytes), without waiting."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) <= limit and (chunk := os.read(fd, 65536)):
            data += chunk
    except BlockingIOError:
        pass
    return data


def _read_lines(fd: int) -> list[dict]:
    """The JSON objects written to a pipe, one a line (what is not JSON is skipped)."""
    data = _read_available(fd, MAX_OUTPUT_BYTES)
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


def _read_verdict(fd: int, token: str) -> tuple[dict | None, str]:
    """The judge's verdict: exactly one JSON line, carrying the token (else None, and why)."""
    data = _read_available(fd, MAX_VERDICT_BYTES)
    lines = data.splitlines()
    if len(lines) != 1:
        return None, f"{len(lines)} lines on the verdict socket, where the judge writes one"
    try:
        verdict = json.loads(lines[0])
    except (ValueError, RecursionError):
        verdict = None
    if type(verdict) is not dict or verdict.get("token") != token or type(verdict.get("success")) is not bool:
        return None, "the verdict socket carried something other than the judge's verdict"
    return verdict, ""


class _Pipes:
    """Pipe (and socket) ends, each closed once: by close(), or when the block ends."""

    def __init__(self):
        self.open: set[int] = set()

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        self.open |= {read_end, write_end}
        return read_end, write_end

    def socketpair(self) -> tuple[int, int]:
        ends = tuple(end.detach() for end in socket.socketpair())
        self.open |= set(ends)
        return ends

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self.open:
                self.open.discard(fd)
                os.close(fd)

    def __enter__(self) -> "_Pipes":
        return self

    def __exit__(self, *exc) -> None:
        self.close(*list(self.open))


def _feed(proc: subprocess.Popen, text: str) -> None:
    """Write a child's whole input and close it (each child reads all of it before anything else)."""
    try:
        proc.stdin.write(text.encode("utf-8", errors="surrogatepass"))
        proc.stdin.close()
    except BrokenPipeError:  # it died before reading: how it ended says why
        pass


def _wait_or_kill(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait for `proc`; past `seconds`, kill its process group. Whether it had to be killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        return True


def _start_judge(script: str, root: Path, env: dict, calls_w: int, replies_r: int, verdict_w: int) -> subprocess.Popen:
    """The judge, in a session of its own, its output (the test's prints, its own errors) in root/judge.log."""
    with open(root / "judge.log", "wb") as log_f:
        argv = [sys.executable, "-I", "-S", script, JUDGE_FLAG, str(calls_w), str(replies_r), str(verdict_w)]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log_f, stderr=subprocess.STDOUT, cwd=root,
                                env={**env, "HOME": str(root), "TMPDIR": str(root)},
                                pass_fds=(calls_w, replies_r, verdict_w), start_new_session=True)


def _spawn(program: str, timeout: float, max_memory_bytes: int | None, require_isolation: bool,
           judge: dict | None = None) -> tuple[ExecutionResult, dict]:
    """Run `program` through the launcher; (its result, the launcher's status). With `judge` ({"context",
    "test", "entry_point"}), the judge runs the test against the function the program defines, and the
    result is its verdict."""
    drop_privileges = os.geteuid() == 0
    token = secrets.token_hex(16)
    # the launcher's hard kill, counted from the sandbox's set-up; a judge's calls get one more grace period
    deadline_s = timeout + KILL_GRACE_SECONDS * (2 if judge else 1)
    with tempfile.TemporaryDirectory(prefix="nanopipe-sandbox-", ignore_cleanup_errors=True) as root, \
            _Pipes() as pipes:
        root = Path(root)
        work_dir = root / "work"
        work_dir.mkdir()
        if drop_privileges:  # the child runs as nobody: it must reach and write its working directory
            os.chmod(root, 0o711)
            os.chown(work_dir, NOBODY_UID, NOBODY_GID)
        stdout_path, stderr_path = root / "stdout", root / "stderr"
        report_r, report_w = pipes.pipe()  # the program's report to us; or its answers to the judge
        status_r, status_w = pipes.pipe()  # the launcher's: protections, refusal, how the init ended
        calls_r = calls_w = verdict_r = verdict_w = -1
        if judge is not None:
            calls_r, calls_w = pipes.pipe()
            # a socket, not a pipe: a process of our user can reopen a pipe through /proc/<pid>/fd, not a socket
            verdict_r, verdict_w = pipes.socketpair()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work_dir),
               "TMPDIR": str(work_dir), "OMP_NUM_THREADS": "1"}
        script = ENTRY_SCRIPT
        argv = [sys.executable, "-I", "-S", script, CHILD_FLAG, str(report_w), str(status_w), str(calls_r),
                repr(float(timeout)), repr(deadline_s), str(max_memory_bytes or 0), "1" if drop_privileges else "0",
                "1" if require_isolation else "0"]
        # the sandbox never learns the judge's token; its own report (execute_code) carries it
        header = json.dumps({"token": "" if judge else token, "entry_point": judge and judge["entry_point"]})
        launcher = judge_proc = None
        try:
            with open(stdout_path, "wb") as out_f, open(stderr_path, "wb") as err_f:
                launcher = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f, cwd=work_dir,
                                            env=env, pass_fds=[fd for fd in (report_w, status_w, calls_r) if fd >= 0],
                                            start_new_session=True)
            pipes.close(report_w, status_w, calls_r)
            if judge is not None:
                judge_proc = _start_judge(script, root, env, calls_w, report_r, verdict_w)
                pipes.close(calls_w, report_r, verdict_w)  # the judge alone talks to the sandbox
            _feed(launcher, header + "\n" + program)
            if judge_proc is None:  # the launcher kills the program at its deadline; this is the backstop
                killed = _wait_or_kill(launcher, timeout + 2 * KILL_GRACE_SECONDS)
                report = _read_report(report_r, token)
            else:
                _feed(judge_proc, json.dumps({**judge, "token": token, "deadline_s": deadline_s}))
                killed = _wait_or_kill(judge_proc, deadline_s + 2 * KILL_GRACE_SECONDS)
                verdict, problem = _read_verdict(verdict_r, token)
                _wait_or_kill(launcher, KILL_GRACE_SECONDS)  # its calls pipe is closed: the sandbox is ending
            _kill_group(launcher.pid)  # without a PID namespace: whatever it left behind in its group goes too
            status = _read_status(status_r)
        finally:
            for proc in (launcher, judge_proc):
                if proc is not None and proc.poll() is None:
                    _kill_group(proc.pid)
                    proc.wait()
        stdout, stderr = _read_capped(stdout_path), _read_capped(stderr_path)
        if judge is not None:
            log = _read_capped(root / "judge.log", limit=2000) if verdict is None else ""
            result = _verdict_result(verdict, problem, killed, stdout, stderr, log, deadline_s)
            if not result.success and status.get("killed_at_deadline"):  # what ended the candidate's process
                result.timeout = True
                result.error = f"{result.error} (the sandbox was killed at its deadline, {deadline_s:g} s)"
            return result, status
    return _program_result(report, killed, status, launcher.returncode, stdout, stderr, timeout), status


def _program_result(report: dict | None, killed: bool, status: dict, launcher_returncode: int, stdout: str,
                    stderr: str, timeout: float) -> ExecutionResult:
    killed_at_deadline = killed or bool(status.get("killed_at_deadline"))
    if report is not None and not killed_at_deadline:
        return ExecutionResult(success=bool(report["success"]), stdout=stdout, stderr=stderr,
                               timeout=bool(report.get("timeout")), error=report.get("error"),
                               memory_exceeded=bool(report.get("memory_exceeded")))
    if killed_at_deadline:
        return ExecutionResult(False, stdout, stderr, timeout=True,
                               error=f"timed out after {timeout:g} s (sandbox killed)")
    returncode = status.get("returncode", launcher_returncode)  # the init's, when there was one
    error, is_timeout = _describe_exit(returncode if isinstance(returncode, int) else launcher_returncode)
    return ExecutionResult(False, stdout, stderr, timeout=is_timeout, error=error)


def _verdict_result(verdict: dict | None, problem: str, judge_killed: bool, stdout: str, stderr: str,
                    judge_log: str, deadline_s: float) -> ExecutionResult:
    if verdict is None:  # no verdict is a failure, never a pass
        if judge_killed:
            return ExecutionResult(False, stdout, stderr, timeout=True,
                                   error=f"timed out: the check did not end within {deadline_s:g} s (judge killed)")
        return ExecutionResult(False, stdout, stderr, error=f"no verdict: {problem}" + (
            f"; the judge's output: {judge_log.strip()}" if judge_log.strip() else ""))
    error = verdict.get("error")
    return ExecutionResult(success=verdict["success"], stdout=stdout, stderr=stderr,
                           timeout=verdict.get("timeout") is True, error=error if isinstance(error, str) else None,
                           memory_exceeded=verdict.get("memory_exceeded") is True)


@functools.cache
def sandbox_protections() -> SandboxProtections:
    """Which isolation layers this machine gives (found once per process by sandboxing an empty program)."""
    _, status = _spawn("", timeout=10.0, max_memory_bytes=DEFAULT_MAX_MEMORY_BYTES, require_isolation=False)
    protections = SandboxProtections(frozenset(status.get("protections", ())))
    logger.info(protections.describe() + (f" ({status['error']})" if status.get("error") else ""))
    return protections


def _require_sandbox(timeout: float, max_memory_bytes: int | None, allow_weaker_sandbox: bool) -> None:
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


def _refuse_if_refused(status: dict) -> None:
    if status.get("refused"):  # the probe said yes, this run could not: never run it unisolated
        raise SandboxUnavailableError(f"refusing to run untrusted code: {status['refused']}")


def execute_code(program: str, timeout: float = 5.0, max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
                 allow_weaker_sandbox: bool = False) -> ExecutionResult:
    """Run `program` in a sandboxed child interpreter; success means it ran to the end without raising,
    which the program itself can always arrange: to score untrusted code against tests, use check_candidate.
    Raises SandboxUnavailableError where the kernel cannot isolate it, unless `allow_weaker_sandbox`."""
    _require_sandbox(timeout, max_memory_bytes, allow_weaker_sandbox)
    result, status = _spawn(program, timeout, max_memory_bytes, require_isolation=not allow_weaker_sandbox)
    _refuse_if_refused(status)
    return result


def check_candidate(code: str, test: str, entry_point: str, context: str = "", timeout: float = 5.0,
                    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
                    allow_weaker_sandbox: bool = False) -> ExecutionResult:
    """Whether the function `entry_point` that untrusted `code` defines passes `test` (trusted: defines
    check(candidate), HumanEval's format). `code` runs in the sandbox; `context` (trusted: a HumanEval prompt,
    whose imports and helper functions the test may use) and the test run in the judge, which calls the
    function through a proxy passing literal values only. `timeout` bounds the candidate's running time,
    loading and calls together. success: check() returned and every call answered in time with a literal.
    Raises SandboxUnavailableError where the kernel cannot isolate it, unless `allow_weaker_sandbox`."""
    assert entry_point.isidentifier(), f"entry_point must be a Python name, got {entry_point!r}"
    _require_sandbox(timeout, max_memory_bytes, allow_weaker_sandbox)
    result, status = _spawn(code, timeout, max_memory_bytes, require_isolation=not allow_weaker_sandbox,
                            judge={"context": context, "test": test, "entry_point": entry_point})
    _refuse_if_refused(status)
    return result
