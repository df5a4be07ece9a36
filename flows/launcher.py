"""
Launch one stage as a child process tree and never lose track of it.

    cmd = stage_command("nanopipe.stages.base_train", ["--depth=4"], Resources(nproc_per_node=2))
    result = launch(cmd, log_path=artifact_dir / "stage.log", on_line=logger.info)
    if result.returncode != 0:
        raise failure_from(result, stage="base_train")

The child runs in its own session (so a Ctrl-C or a Prefect cancel of the parent's group does not half-kill
it) with a parent-death signal (so a SIGKILLed parent takes it down). torchrun starts its workers in
sessions of their own, so the group alone cannot find them: every process of a launch carries a marker in
its environment, and cleanup kills whatever still carries it. Prefect-free on purpose: the tasks in
flows/stage_task.py pass in the logger and the progress callback.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.parent_death import die_with_parent
from nanopipe.events import MemoryEstimate, Progress, Record, StageFailure, last, parse_record
from nanopipe.exit_codes import ExitCode

LAUNCH_ENV = "NANOPIPE_LAUNCH_ID"   # every process of one launch inherits this marker
TAIL_LINES = 60


# Environment a flow parameter may set for a stage: thread counts and the tuning knobs of the libraries a
# training run uses. Anything else (PYTHONPATH, LD_PRELOAD, ...) could run code on the worker, and secrets
# passed as parameters would sit in plain text in Prefect's database: they come from the worker's own
# environment (or a Prefect Secret block the worker exports) instead.
ENV_ALLOWED_PREFIXES = ("NCCL_", "CUDA_", "CUBLAS_", "CUDNN_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "GLOO_",
                        "TP_", "NVIDIA_", "HF_HUB_", "HF_DATASETS_", "WANDB_")
ENV_ALLOWED = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
               "RAYON_NUM_THREADS", "MALLOC_ARENA_MAX"}
ENV_SECRETS = ("TOKEN", "API_KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def check_stage_env(env: dict[str, str]) -> dict[str, str]:
    """Refuse environment variables a run parameter has no business setting; name each and say why."""
    for name in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"env {name!r} is not a variable name (letters, digits and _ only)")
        if any(word in name.upper() for word in ENV_SECRETS):
            raise ValueError(f"env {name}: secrets are not run parameters (they would be stored in plain text); "
                             "set it in the worker's environment or a Prefect Secret block")
        if not (name in ENV_ALLOWED or name.startswith(ENV_ALLOWED_PREFIXES)):
            raise ValueError(f"env {name} is not a variable a stage may be given: allowed are "
                             f"{', '.join(sorted(ENV_ALLOWED))} and names starting with "
                             f"{', '.join(ENV_ALLOWED_PREFIXES)}")
    return env


class Resources(BaseModel):
    """Where and how a stage runs: torchrun's process layout, extra environment, limits, retries."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(1, ge=1, le=64, description="processes (usually GPUs) per node for torchrun")
    min_nproc_per_node: int | None = Field(None, ge=1, le=64, description="the fewest processes per node a retry "
                                           "accepts: a retry after a lost rank or node runs on the devices usable "
                                           "then, between this and nproc_per_node (flows/world.py); none = "
                                           "nproc_per_node")
    nnodes: int = Field(1, ge=1, le=1024, description="number of nodes; above 1, every node runs the same "
                        "command against rdzv_endpoint")
    min_nnodes: int | None = Field(None, ge=1, le=1024, description="the fewest nodes a retry accepts: a retry "
                                   "after a lost node runs on the nodes whose worker is still there, between "
                                   "this and nnodes (flows/world.py); none = nnodes")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous for multi-node "
                                      "runs; none means a standalone single-node run")
    rdzv_id: str = Field("nanopipe", description="rendezvous id shared by the nodes of one multi-node run")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for the stage: "
                                "thread counts and NCCL/CUDA/torch/HF tuning only; secrets come from the worker")
    timeout_minutes: float | None = Field(None, gt=0, description="wall-clock limit per attempt; none = no "
                                          "limit (a timeout is treated as a hang and retried)")
    retries: int = Field(2, ge=0, le=20, description="retries of a stage after a retryable failure (killed, "
                         "lost node, collective/network timeout); OOM, NaN loss and bad config never retry")
    retry_delay_seconds: float = Field(30.0, ge=0, description="pause before a retry")

    @field_validator("env")
    @classmethod
    def _allowed_env(cls, env: dict[str, str]) -> dict[str, str]:
        return check_stage_env(env)

    @model_validator(mode="after")
    def _multinode_needs_endpoint(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint=host:port (the rendezvous of the nodes)")
        if self.min_nproc_per_node is not None and self.min_nproc_per_node > self.nproc_per_node:
            raise ValueError(f"min_nproc_per_node={self.min_nproc_per_node} is more than nproc_per_node="
                             f"{self.nproc_per_node}: a retry never runs more processes than a first attempt")
        if self.min_nnodes is not None and self.min_nnodes > self.nnodes:
            raise ValueError(f"min_nnodes={self.min_nnodes} is more than nnodes={self.nnodes}: a retry never runs "
                             f"on more nodes than a first attempt")
        return self


def stage_command(module: str, args: list[str], resources: Resources, distributed: bool = True) -> list[str]:
    """The command line of one stage: torchrun for distributed stages, plain `python -m` otherwise.

    torchrun is invoked as `python -m torch.distributed.run` so it is the same interpreter (and virtualenv)
    as ours, whatever `torchrun` happens to be first on PATH.
    """
    if not distributed:
        return [sys.executable, "-m", module, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={resources.nproc_per_node}"]
    if resources.nnodes == 1 and resources.rdzv_endpoint is None:
        cmd.append("--standalone")   # c10d rendezvous on a free local port: concurrent runs never collide
    else:
        cmd += [f"--nnodes={resources.nnodes}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={resources.rdzv_endpoint}", f"--rdzv_id={resources.rdzv_id}"]
    return cmd + ["-m", module, "--", *args]


# -----------------------------------------------------------------------------
# Process tree handling

def marked_pids(launch_id: str) -> list[int]:
    """Pids of live processes whose environment carries this launch's marker."""
    return pids_with_env(LAUNCH_ENV, launch_id)


def pids_with_env(variable: str, value: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment holds variable=value (scans /proc)."""
    needle = f"{variable}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:   # gone, or not ours to read
            continue
    return [p for p in pids if not _is_zombie(p)]


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def _signal_all(proc: subprocess.Popen, launch_id: str, sig: int) -> None:
    if proc.returncode is None:   # once reaped, its pid (and group id) may belong to someone else
        with _suppress_lookup():
            os.killpg(proc.pid, sig)
    for pid in marked_pids(launch_id):
        with _suppress_lookup():
            os.kill(pid, sig)


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type in (ProcessLookupError, PermissionError)


def kill_tree(proc: subprocess.Popen, launch_id: str, grace_seconds: float = 10.0) -> None:
    """SIGTERM the launch (torchrun forwards it to its workers), then SIGKILL whatever is left."""
    if proc.poll() is None or marked_pids(launch_id):
        _signal_all(proc, launch_id, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and (proc.poll() is None or marked_pids(launch_id)):
            time.sleep(0.05)
    _signal_all(proc, launch_id, signal.SIGKILL)
    with _suppress_lookup():
        proc.wait(timeout=grace_seconds)
    deadline = time.monotonic() + grace_seconds
    while marked_pids(launch_id) and time.monotonic() < deadline:
        time.sleep(0.05)


# -----------------------------------------------------------------------------
# Launch and stream

@dataclass
class LaunchResult:
    command: list[str]
    returncode: int
    seconds: float
    timed_out: bool
    tail: list[str]
    log_path: Path
    last_progress: dict = field(default_factory=dict)
    oom_killed: bool = False            # the kernel's OOM killer struck in our memory cgroup during the launch
    records: list[Record] = field(default_factory=list)   # the stage's records but progress (nanopipe/events.py)

    def fails_with(self, reason: str) -> LaunchResult:
        """Give the flow's own reason for this failure (a node that never started, say): the last line of the
        tail, for the log, and an error record, for the failure's first line."""
        self.tail.append(f"nanopipe: error: {reason}")
        self.records.append(StageFailure(message=reason, exit_code=self.returncode))
        return self


def oom_kill_count(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup (cgroup v2
    `memory.events`, or v1 `memory.oom_control`), or None where that cannot be read. A SIGKILLed stage is
    otherwise indistinguishable from one a person or a lost node killed, which a retry can fix."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates = [root / path.lstrip("/") / "memory.events", root / "memory.events"]
        elif "memory" in controllers.split(","):
            candidates = [root / "memory" / path.lstrip("/") / "memory.oom_control", root / "memory" / "memory.oom_control"]
        else:
            continue
        for candidate in candidates:
            try:
                for entry in candidate.read_text().splitlines():
                    key, _, value = entry.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
    return None


def _pump(stream, lines: queue.Queue) -> None:
    """Reader thread: raw lines from the child's stdout into the queue; None marks the end."""
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    lines.put(None)


def launch(cmd: list[str], *, log_path: str | os.PathLike, env: dict[str, str] | None = None,
           on_line: Callable[[str], None] | None = None, on_progress: Callable[[dict], None] | None = None,
           on_record: Callable[[Record], None] | None = None, timeout_seconds: float | None = None,
           cwd: str | os.PathLike | None = None, grace_seconds: float = 10.0) -> LaunchResult:
    """Run `cmd` to completion, streaming every line to `log_path` (appended) and to `on_line`.

    The stage's records (`@@nanopipe-<kind> {json}`, nanopipe/events.py) are parsed instead of handed to
    `on_line`: progress goes to `on_progress` (its figures), every other record to `on_record` and the
    result's `records`. The log file keeps them, a person reading the run's log sees the stage's own human
    lines, and the tail that failure messages quote is free of them. The whole process tree is killed on
    return, on timeout and on any exception in the caller's thread (KeyboardInterrupt, Prefect's
    termination signal), so nothing outlives the launch.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    launch_id = uuid.uuid4().hex
    oom_kills_before = oom_kill_count()
    child_env = {**os.environ, **(env or {}), LAUNCH_ENV: launch_id, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last_progress: dict = {}
    records: list[Record] = []
    start = time.monotonic()
    deadline = start + timeout_seconds if timeout_seconds else None
    timed_out = False
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, cwd=cwd, start_new_session=True,
                                preexec_fn=die_with_parent(os.getpid()))
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True, name="stage-stdout")
        reader.start()
        try:
            exited_at = None
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if exited_at is None and proc.poll() is not None:
                        # torchrun is gone but a stray worker may still hold the pipe open: end it
                        exited_at = time.monotonic()
                        kill_tree(proc, launch_id, grace_seconds=1.0)
                    if exited_at is not None and time.monotonic() - exited_at > grace_seconds:
                        break   # something unmarked holds the pipe; the exit code is what counts
                    if deadline is not None and time.monotonic() > deadline:
                        timed_out = True
                        break
                    continue
                if line is None:
                    break
                log.write(line + "\n")
                if lines.empty():   # flush at every pause, so `tail -f` on the log follows along
                    log.flush()
                record = parse_record(line)
                if isinstance(record, Progress):
                    last_progress = record.model_dump(exclude_unset=True)
                    if on_progress is not None:
                        on_progress(last_progress)
                    continue
                if record is not None:
                    records.append(record)
                    if on_record is not None:
                        on_record(record)
                    continue
                tail.append(line)
                if on_line is not None:
                    on_line(line)
        finally:
            kill_tree(proc, launch_id, grace_seconds=grace_seconds)
            reader.join(timeout=5)
            proc.stdout.close()
            log.flush()
        returncode = proc.returncode
        seconds = time.monotonic() - start
        end_note = f"timed out (limit {timeout_seconds:.0f} s)" if timed_out else f"exit code {returncode}"
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {end_note} after {seconds:.1f} s\n")
    oom_kills_after = oom_kill_count()
    oom_killed = returncode != 0 and None not in (oom_kills_before, oom_kills_after) and \
        oom_kills_after > oom_kills_before
    return LaunchResult(cmd, returncode, seconds, timed_out, list(tail), log_path, last_progress, oom_killed,
                        records)


# -----------------------------------------------------------------------------
# Failure classification: what a retry can fix, and what it cannot

_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|torch\.OutOfMemoryError|\bMemoryError\b|"
                  r"can't allocate memory|Cannot allocate memory|HIP out of memory", re.I)
_NETWORK = re.compile(r"NCCL (error|WARN|timeout)|nccl\w*Error|collective operation timeout|Watchdog caught|"
                      r"DistNetworkError|DistStoreError|DistBackendError|Rendezvous\w*Error|"
                      r"Connection reset by peer|Connection refused|Connection closed by peer|Broken pipe|"
                      r"Socket Timeout|TimeoutError|timed out|connectFullMesh|No route to host|"
                      r"Network is unreachable", re.I)
_ROOT_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


class StageFailed(RuntimeError):
    """A stage process failed. `retryable` says whether running it again can help."""

    def __init__(self, message: str, kind: str = "error", retryable: bool = False, returncode: int | None = None,
                 log_path: str | None = None):
        super().__init__(message)
        self.kind, self.retryable, self.returncode, self.log_path = kind, retryable, returncode, log_path

    def __reduce__(self):   # picklable with its attributes (Prefect stores the exception in the state)
        return (type(self), (self.args[0], self.kind, self.retryable, self.returncode, self.log_path))


def root_exit_code(returncode: int, tail: list[str]) -> int:
    """The exit code of the worker that failed first: torchrun itself just exits 1 and reports it."""
    text = "\n".join(tail)
    root = text.rfind("Root Cause")
    match = _ROOT_EXIT.search(text, root if root >= 0 else 0)
    return int(match.group(1)) if match else returncode


_TORCH_LOG = re.compile(r"^[DIWEF]\d{4} .*torch/distributed/elastic/")  # the torchrun agent's own log lines
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")


def without_torchrun_report(tail: list[str]) -> list[str]:
    """The tail with torchrun's report of a failed worker (its agent's log lines and the ChildFailedError
    traceback, some 40 lines) replaced by one line naming the worker that failed first and its exit code, so
    that the stage's own last lines, e.g. its one-line error, are what a failure shows."""
    failed = [i for i, line in enumerate(tail) if "ChildFailedError" in line and not line.startswith(" ")]
    if not failed:
        return tail
    start = failed[-1]   # back over torchrun's own traceback: its frames (indented) and the line that opens it
    while start > 0 and tail[start - 1].startswith(" "):
        start -= 1
    if start > 0 and tail[start - 1].startswith("Traceback (most recent call"):
        start -= 1
    rules = [i for i in range(failed[-1], len(tail)) if tail[i].startswith("=====")]
    end = rules[1] + 1 if len(rules) > 1 else len(tail)   # the report is framed by two lines of '='
    report = tail[start:end]
    root_cause = report[next((i for i, line in enumerate(report) if line.startswith("Root Cause")), len(report)):]
    rank = next((m.group(1) for line in root_cause if (m := _ROOT_RANK.match(line))), "?")
    code = root_exit_code(1, report)
    summary = f"torchrun: worker rank {rank} failed first, with exit code {code} (torchrun's report is in the log)"
    return [line for line in tail[:start] if not _TORCH_LOG.match(line)] + [summary] + tail[end:]


def classify(result: LaunchResult) -> tuple[str, bool, str]:
    """(kind, retryable, reason) of a failed launch."""
    code = root_exit_code(result.returncode, result.tail)
    text = "\n".join(result.tail)
    if result.timed_out:
        return "timeout", True, "no exit before the stage timeout (a hang, e.g. a stuck collective)"
    if code == ExitCode.BAD_INPUT:
        return "config", False, "the stage rejected a flag, a value or an input file (exit code 2)"
    if code == ExitCode.DIVERGED:
        return "nan", False, "the loss became NaN/inf (exit code 3); lower the learning rate or check the data"
    if _OOM.search(text) or result.oom_killed:
        how = "killed by the kernel's out-of-memory killer" if result.oom_killed else "out of memory"
        estimate = last(result.records, MemoryEstimate)
        said = f" (the stage estimated {estimate.peak_bytes / 2**30:.2f} GiB per device)" if estimate else ""
        return "oom", False, f"{how}{said}: lower device_batch_size (gradient accumulation keeps the total batch)"
    if code < 0 or result.returncode < 0 or code in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
        signum = -code if code < 0 else (-result.returncode if result.returncode < 0 else code - 128)
        return "killed", True, f"killed by signal {_signal_name(signum)}"
    if _NETWORK.search(text):
        return "network", True, "a collective, rendezvous or network error (lost node or timeout)"
    return "error", False, f"exit code {code}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


# The last line of a Python traceback (`SomeError: ...`), for a stage that stopped without its error record (a
# bug, an import error). torchrun's own report of the failed child is not one.
_TRACEBACK_END = re.compile(r"(?:^|: )(?P<exc>[A-Z]\w*(?:Error|Exception): .+)$")
_NOT_A_REASON = re.compile(r"^(torch\.distributed|\s)|ChildFailedError")


def stage_reason(lines: list[str], records: list[Record] = ()) -> str | None:
    """Why the stage stopped: the message of its error record (in `records`, or a record line among `lines`),
    else the exception a traceback in `lines` ends with; None if neither."""
    failure = last([*records, *filter(None, map(parse_record, lines))], StageFailure)
    if failure is not None:
        return failure.reason()
    for line in reversed(lines):
        if _NOT_A_REASON.search(line):
            continue
        match = _TRACEBACK_END.search(line)
        if match:
            return match.group("exc").strip()
    return None


def failure_from(result: LaunchResult, stage: str) -> StageFailed:
    """The StageFailed of a failed launch. Its first line is the whole story in one sentence (the run's
    state message): stage, classified reason, the stage's own words, retry verdict, log path; the last
    lines of the log follow."""
    kind, retryable, reason = classify(result)
    advice = "will be retried" if retryable else "not retried"
    lines = without_torchrun_report(result.tail)
    said = stage_reason(lines, result.records)
    said = f": {said}" if said and said not in reason else ""
    tail = "\n".join(lines[-25:])
    message = (f"{stage} failed: {reason}{said} [{kind}, {advice}] (log: {result.log_path})\n"
               f"--- last lines ---\n{tail}")
    # under torchrun, the code of the worker that failed first (torchrun's own is 1 for any worker failure)
    return StageFailed(message, kind=kind, retryable=retryable,
                       returncode=root_exit_code(result.returncode, result.tail), log_path=str(result.log_path))
