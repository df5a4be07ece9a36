"""The stage launcher: command lines, streaming, progress, process-tree cleanup, failure classification."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from flows.launcher import (LaunchResult, Resources, StageFailed, classify, failure_from, launch, marked_pids,
                            root_exit_code, stage_command, stage_reason)
from nanopipe.common import PROGRESS_PREFIX


def procs_with(token: str) -> list[int]:
    """Live (non-zombie) pids whose command line contains `token`: /proc only, no psutil."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state != b"Z":
            pids.append(int(entry))
    return pids


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# A stand-in for a training worker: says hello, reports progress, then sleeps until killed. It carries a
# unique token in its argv so the test can find it in /proc.
WORKER = textwrap.dedent("""
    import os, sys, time
    from nanopipe.common import report_progress
    print("worker up", os.environ.get("RANK", "-"), flush=True)
    report_progress(step=1, total=10, loss=2.5)
    if sys.argv[2] == "exit3":
        sys.exit(3)
    time.sleep(600)
""")


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker_script.py"
    path.write_text(WORKER)
    return path


def torchrun(script: Path, *args: str, nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *args]


# A cheaper tree with the same trap as torchrun: the child starts a grandchild in a session of its own.
SPAWNER = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]], start_new_session=True)
    print("worker up", flush=True)
    time.sleep(600)
""")


def spawner(tmp_path: Path, token: str) -> list[str]:
    path = tmp_path / "spawner.py"
    path.write_text(SPAWNER)
    return [sys.executable, str(path), token]


# -----------------------------------------------------------------------------
# Command lines

def test_torchrun_command_uses_this_interpreter():
    cmd = stage_command("nanopipe.stages.base_train", ["--depth=4"], Resources(nproc_per_node=2))
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                   "-m", "nanopipe.stages.base_train", "--", "--depth=4"]


def test_multinode_command_uses_the_rendezvous():
    res = Resources(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_id="job7")
    cmd = stage_command("m", [], res)
    assert "--standalone" not in cmd
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=job7"} <= set(cmd)


def test_multinode_without_endpoint_is_rejected():
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        Resources(nnodes=2)


def test_single_process_stage_runs_plain_python():
    assert stage_command("m", ["--a=1"], Resources(), distributed=False) == [sys.executable, "-m", "m", "--a=1"]


# -----------------------------------------------------------------------------
# Streaming

def test_every_line_reaches_the_callback_and_the_log(tmp_path):
    code = ("import sys\nfrom nanopipe.common import report_progress\n"
            "for i in range(50): print(f'line {i}')\n"
            "print('to stderr', file=sys.stderr)\n"
            "report_progress(step=5, total=10, loss=1.25)\n")
    seen, progress = [], []
    log = tmp_path / "stage.log"
    result = launch([sys.executable, "-c", code], log_path=log, on_line=seen.append, on_progress=progress.append)
    assert result.returncode == 0 and not result.timed_out
    assert [line for line in seen if line.startswith("line ")] == [f"line {i}" for i in range(50)]
    assert "to stderr" in seen
    assert not any(PROGRESS_PREFIX in line for line in seen + result.tail)   # the log file keeps them
    assert progress == [{"step": 5, "total": 10, "loss": 1.25}] and result.last_progress == progress[0]
    text = log.read_text()
    assert "line 49" in text and "to stderr" in text and PROGRESS_PREFIX in text and "exit code 0" in text


def test_records_reach_their_callback_and_the_result_not_the_lines(tmp_path):
    code = ("from nanopipe.events import MemoryEstimate, Resumed, emit\n"
            "print('Resuming, in words a person may change any day')\n"
            "emit(Resumed(step=4, checkpoint_dir='ckpt'))\n"
            "emit(MemoryEstimate(peak_bytes=2**30, parts={'weights': 2**29}))\n"
            "print('@@nanopipe-resumed {\"step\": ')\n")   # cut short: not a record, a line like any other
    seen, records = [], []
    result = launch([sys.executable, "-c", code], log_path=tmp_path / "stage.log", on_line=seen.append,
                    on_record=records.append)
    assert result.returncode == 0
    assert [type(r).__name__ for r in records] == ["Resumed", "MemoryEstimate"] and result.records == records
    assert records[0].step == 4 and records[1].peak_bytes == 2**30 and records[1].parts == {"weights": 2**29}
    assert seen == ["Resuming, in words a person may change any day", '@@nanopipe-resumed {"step": ']
    assert "@@nanopipe-memory " in (tmp_path / "stage.log").read_text()


def test_log_is_appended_across_attempts(tmp_path):
    log = tmp_path / "stage.log"
    launch([sys.executable, "-c", "print('first attempt')"], log_path=log)
    launch([sys.executable, "-c", "print('second attempt')"], log_path=log)
    text = log.read_text()
    assert text.index("first attempt") < text.index("second attempt")


def test_nonzero_exit_carries_the_log_tail(tmp_path):
    code = "import sys\nfor i in range(100): print(f'step {i}')\nprint('boom: bad thing'); sys.exit(7)"
    result = launch([sys.executable, "-c", code], log_path=tmp_path / "stage.log")
    assert result.returncode == 7
    err = failure_from(result, "base_train")
    assert "boom: bad thing" in str(err) and "step 99" in str(err) and "step 0\n" not in str(err)
    assert not err.retryable and err.kind == "error" and str(tmp_path / "stage.log") in str(err)


# -----------------------------------------------------------------------------
# Nothing outlives a launch

def test_timeout_kills_the_whole_tree(tmp_path):
    token = f"np-test-{uuid.uuid4().hex}"
    up = []
    started = time.monotonic()
    result = launch(spawner(tmp_path, token), log_path=tmp_path / "stage.log", timeout_seconds=4,
                    grace_seconds=5, on_line=up.append)
    assert result.timed_out and 4 <= time.monotonic() - started < 30
    assert up == ["worker up"], "the tree should have been fully up before the timeout"
    assert procs_with(token) == []
    kind, retryable, _ = classify(result)
    assert kind == "timeout" and retryable


def test_exception_in_the_caller_kills_the_tree(tmp_path):
    token = f"np-test-{uuid.uuid4().hex}"

    class Cancelled(Exception):
        pass

    def on_line(line):
        if line.startswith("worker up"):
            wait_until(lambda: len(procs_with(token)) == 2, 30, "child and grandchild")
            raise Cancelled   # what Prefect's TerminationSignal does on cancel

    with pytest.raises(Cancelled):
        launch(spawner(tmp_path, token), log_path=tmp_path / "stage.log", on_line=on_line, grace_seconds=5)
    assert procs_with(token) == []


def test_sigkilled_torchrun_leaves_no_orphan_workers(tmp_path, worker):
    """torchrun puts workers in their own sessions: killing its group would not reach them."""
    token = f"np-test-{uuid.uuid4().hex}"
    up = threading.Event()

    def on_line(line):
        if line.startswith("worker up"):
            up.set()

    def kill_torchrun():
        up.wait(60)
        for pid in procs_with("torch.distributed.run"):
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_torchrun)
    killer.start()
    result = launch(torchrun(worker, token, "sleep"), log_path=tmp_path / "stage.log", on_line=on_line,
                    timeout_seconds=90, grace_seconds=5)
    killer.join()
    assert up.is_set() and result.returncode == -signal.SIGKILL and not result.timed_out
    assert procs_with(token) == []
    kind, retryable, reason = classify(result)
    assert (kind, retryable) == ("killed", True) and "SIGKILL" in reason


def test_parent_death_takes_the_stage_down(tmp_path, worker):
    """The flow process SIGKILLed (no finally runs): PR_SET_PDEATHSIG makes torchrun stop its workers."""
    token = f"np-test-{uuid.uuid4().hex}"
    log = tmp_path / "stage.log"
    parent_code = (f"from flows.launcher import launch\n"
                   f"launch({[str(a) for a in torchrun(worker, token, 'sleep')]!r}, log_path={str(log)!r})\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=Path(__file__).resolve().parents[1])
    try:
        wait_until(lambda: log.exists() and "worker up" in log.read_text(), 90, "the worker to start")
        assert len(procs_with(token)) >= 2   # torchrun and its worker
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_until(lambda: procs_with(token) == [], 45, "torchrun and its worker to exit")
    finally:
        parent.kill()
        for pid in procs_with(token):
            os.kill(pid, signal.SIGKILL)


def test_torchrun_root_cause_exit_code_is_classified(tmp_path, worker):
    """Exit code 3 (NaN loss) in a worker: torchrun exits 1, the report names 3 as the root cause."""
    result = launch(torchrun(worker, "np-test", "exit3", nproc=2), log_path=tmp_path / "stage.log",
                    timeout_seconds=90)
    assert result.returncode == 1
    assert root_exit_code(result.returncode, result.tail) == 3
    assert classify(result)[:2] == ("nan", False)
    assert marked_pids("no-such-launch") == []


# -----------------------------------------------------------------------------
# Classification (what a retry can fix)

def _result(returncode, tail, timed_out=False):
    return LaunchResult(["x"], returncode, 1.0, timed_out, tail, Path("stage.log"))


@pytest.mark.parametrize("returncode, tail, kind, retryable", [
    (2, ["error: --depth: Input should be greater than 0"], "config", False),
    (3, ["loss is nan at step 12"], "nan", False),
    (1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"], "oom", False),
    (-9, ["step 100"], "killed", True),
    (137, ["Killed"], "killed", True),
    (1, ["[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)"],
     "network", True),
    (1, ["torch.distributed.DistNetworkError: Connection reset by peer"], "network", True),
    (1, ["RendezvousTimeoutError: the node 2 did not join"], "network", True),
    (1, ["Traceback (most recent call last):", "KeyError: 'model_config'"], "error", False),
    (1, ["Root Cause (first observed failure):", "[0]:", "  exitcode  : -9 (pid: 12)"], "killed", True),
    (1, ["Root Cause (first observed failure):", "[0]:", "  exitcode  : 2 (pid: 12)"], "config", False),
])
def test_classification(returncode, tail, kind, retryable):
    assert classify(_result(returncode, tail))[:2] == (kind, retryable)


def test_timeout_is_retryable_even_with_a_signal_exit():
    assert classify(_result(-15, ["step 3"], timed_out=True))[:2] == ("timeout", True)


def test_the_first_line_of_a_failure_is_the_stage_s_own_reason():
    """A torchrun launch whose worker exited 2 with its error record: the first line of the StageFailed (the
    run's state message) names the stage, the stage's own words (the record's, whatever its human line
    says), the verdict and the log."""
    from nanopipe.events import StageFailure
    tail = ["step 00003/00010 | loss: 2.1", "the stage's human line, worded any way it likes",
            "E1202 17:00:00 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 2)",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
            "Root Cause (first observed failure):", "[0]:", "  exitcode  : 2 (pid: 12)"]
    said = StageFailure(message="BaseTrainConfig: --total_batch_size=1000 is bad", exit_code=2)
    result = _result(1, tail)
    result.records.append(said)
    first = str(failure_from(result, "base_train")).splitlines()[0]
    assert first == ("base_train failed: the stage rejected a flag, a value or an input file (exit code 2): "
                     "BaseTrainConfig: --total_batch_size=1000 is bad [config, not retried] (log: stage.log)")
    assert "the stage's human line" not in first and stage_reason(tail) is None
    assert stage_reason(["Traceback (most recent call last):", '  File "x.py", line 1', "KeyError: 'model_config'"]) \
        == "KeyError: 'model_config'"
    assert stage_reason(["step 1", "step 2"]) is None


def test_the_flow_s_own_reason_for_a_failure_is_a_record_too():
    """A failure the flow itself explains (a node that never started): the reason is the first line's, and
    the log's last line says it to people."""
    result = _result(1, ["step 1"]).fails_with("node 1 never started: no worker; node 0 gave up after 300 s")
    first = str(failure_from(result, "base_train")).splitlines()[0]
    assert first.startswith("base_train failed: exit code 1: node 1 never started: no worker; node 0 gave up")
    assert result.tail[-1] == "nanopipe: error: node 1 never started: no worker; node 0 gave up after 300 s"


def test_stage_failed_survives_pickling():
    err = failure_from(_result(-9, ["step 1"]), "base_train")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, StageFailed) and back.retryable and back.kind == "killed" and str(back) == str(err)


@pytest.mark.parametrize("name, needle", [
    ("PYTHONPATH", "not a variable a stage may be given"), ("LD_PRELOAD", "not a variable"),
    ("HF_TOKEN", "secrets are not run parameters"), ("WANDB_API_KEY", "secrets are not run parameters"),
    ("NCCL_X;touch /tmp/owned", "not a variable name"),
])
def test_run_parameters_cannot_set_code_paths_or_secrets(name, needle):
    from pydantic import ValidationError
    from flows.launcher import Resources
    with pytest.raises(ValidationError, match=needle):
        Resources(env={name: "x"})
    assert Resources(env={"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "INFO", "HF_HUB_OFFLINE": "1"}).env["NCCL_DEBUG"] == "INFO"


@pytest.mark.parametrize("membership, files", [
    ("0::/jobs/run1\n", {"jobs/run1/memory.events": "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n"}),          # v2
    ("4:memory:/jobs/run1\n0::/\n", {"memory/jobs/run1/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"}),  # v1
])
def test_oom_kills_are_counted_from_the_memory_cgroup(tmp_path, membership, files):
    from flows.launcher import oom_kill_count
    (tmp_path / "cgroup").write_text(membership)
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    assert oom_kill_count(tmp_path / "fs", tmp_path / "cgroup") == 2
    assert oom_kill_count(tmp_path / "nowhere", tmp_path / "cgroup") is None


def test_a_stage_the_oom_killer_ended_is_not_retried_and_says_its_estimate(tmp_path):
    from flows.launcher import LaunchResult, classify
    from nanopipe.events import MemoryEstimate
    log = tmp_path / "stage.log"
    estimate = MemoryEstimate(peak_bytes=4425 * 2**30, parts={"weights": 2**30})   # the stage's memory record
    killed = LaunchResult(["x"], -9, 1.0, False, ["step 00001 ..."], log, oom_killed=True, records=[estimate])
    kind, retryable, reason = classify(killed)
    assert (kind, retryable) == ("oom", False) and "out-of-memory killer" in reason and "4425.00 GiB" in reason
    # the same SIGKILL without an OOM kill in the cgroup is a kill a retry can fix
    assert classify(LaunchResult(["x"], -9, 1.0, False, [], log))[:2] == ("killed", True)
