"""A recompute cancelled mid-stage never loses work: the good artifact stays in place, verified, and the next
run reuses it (flows/recompute.py). Against a temporary Prefect server, on the tiny CPU config of
tests/flow_support.py (a cancel between the swap's two renames: tests/test_recompute.py).

The cancelled run is a child process, cancelled the way a worker's runner does it: "cancel" over the runner's
control channel (Prefect's own listener in the flow process acknowledges it), then SIGTERM to that process. In
this test process, a SIGTERM would hit whatever the process is doing when it lands, pytest and Prefect's own
event workers included; in a child it reaches only the flow, as in a deployment. The stage is held right
after its first checkpoint (a `sitecustomize` on the flow process's PYTHONPATH, which its stages inherit), so
the cancel always finds it mid-stage, however fast the machine. The runs before and after it are child flow
processes too: this process only reads the server, so no flow ever runs in it (in a full two-process suite, a
run in this process after the cancel once never got its task runs recorded and its module's teardown then
waited forever on Prefect's event workers)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client

from flows.artifacts import read_manifest, verify
from flows.recompute import staging_dir
from tests.flow_support import REPO, plans_of, task_states, tiny
from tests.flow_support import prefect_backend, data_dir, shared_home, kill_home  # noqa: F401 (fixtures)

# Imported first by every Python process of the stage: its first checkpoint is saved, then the stage waits
# there, as if still training, until it is stopped.
HOLD_AFTER_FIRST_CHECKPOINT = '''
import importlib.abc, importlib.util, sys, time

class HoldAfterFirstCheckpoint(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "nanopipe.checkpoint":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            save = module.save_checkpoint

            def save_then_hold(*args, **kwargs):
                save(*args, **kwargs)
                while True:
                    time.sleep(60)
            module.save_checkpoint = save_then_hold
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, HoldAfterFirstCheckpoint())
'''
# The flow process a worker starts, in short: the pipeline with SIGTERM at its default until Prefect's engine
# takes it over; a run that ends (not cancelled) prints its flow run's id
FLOW_PROCESS = ("import json, sys; from flows.pipeline import full_pipeline; "
                "state = full_pipeline(json.loads(sys.argv[1]), return_state=True); "
                "print('flow run', state.state_details.flow_run_id, flush=True)")


def flow_process_env(**extra: str) -> dict[str, str]:
    """A flow process's environment: this one's, on this module's Prefect server."""
    from prefect.settings import get_current_settings
    return {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url), **extra}


def held_after_first_checkpoint(gate: Path) -> dict[str, str]:
    """The environment of a flow process whose stages wait after their first checkpoint (a stage inherits
    the flow process's environment)."""
    gate.mkdir(parents=True, exist_ok=True)
    (gate / "sitecustomize.py").write_text(HOLD_AFTER_FIRST_CHECKPOINT)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(gate), os.environ.get("PYTHONPATH")]))}


class Runner:
    """The runner's side of a flow process: its control channel (Prefect's version-one protocol: the child
    connects and sends its token; the runner sends an intent byte, the child acknowledges with b"a" once its
    engine has armed its SIGTERM handler) and the signal that follows."""

    def __init__(self, values: dict, log: Path, env: dict[str, str]):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.token = secrets.token_hex(16)
        env = flow_process_env(**env, PREFECT__CONTROL_PORT=str(self.server.getsockname()[1]),
                               PREFECT__CONTROL_TOKEN=self.token)
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", FLOW_PROCESS, json.dumps(values)], cwd=REPO,
                                         env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def connected(self) -> None:
        """Accept the flow process's control connection and check its token."""
        self.server.settimeout(0.5)
        while True:   # the flow engine connects once it has armed its SIGTERM handler
            try:
                self.conn, _ = self.server.accept()
                break
            except TimeoutError:
                assert self.proc.poll() is None, f"the flow process ended before its run began:\n{self.output()}"
        self.conn.settimeout(600)   # only so that a flow process that stops answering cannot hang the test
        assert self._read_line() == self.token, "the flow process sent another token"

    def _read_line(self) -> str:
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.conn.recv(1)
            assert chunk, f"the flow process closed its control channel; its output:\n{self.output()}"
            line += chunk
        return line.decode().strip()

    def cancel(self) -> int:
        """Cancel as the runner does: the intent, its acknowledgement, then SIGTERM; the process's exit code."""
        self.conn.sendall(b"c")
        ack = b""
        while ack != b"a":   # a version-two child's hello may come first; the runner ignores it
            ack = self.conn.recv(1)
            assert ack, f"the flow process never acknowledged the cancel; its output:\n{self.output()}"
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        return self.proc.wait(timeout=600)   # only so that a flow process that never ends cannot hang the test

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """A flow process still running when the test ends (it failed) is stopped with its stage."""
        if self.proc.poll() is None:
            self.proc.terminate()   # no intent: Prefect's crash path, which stops the stage too
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "conn"):
            self.conn.close()
        self.server.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


def run_in_child(values: dict, log: Path) -> dict[str, str]:
    """Run the pipeline in a flow process of its own, to its end; {stage: task run state name} as the server
    recorded them. The flow run must complete."""
    command = [sys.executable, "-c", FLOW_PROCESS, json.dumps(values)]
    with open(log, "wb") as out:
        done = subprocess.run(command, cwd=REPO, env=flow_process_env(), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-5000:]
    flow_run_id = UUID(text.rsplit("flow run ", 1)[1].split()[0])
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_completed(), text[-5000:]
    return task_states(flow_run_id)


def wait_for_checkpoint(runner: Runner, out_dir: Path) -> None:
    """Until the stage's first checkpoint is complete (its meta file is written last); fail if the flow
    process ends first. (The stage then waits there: no race with its end.) The bound only keeps a hung
    recompute from hanging the test."""
    hung = time.monotonic() + 900
    while not list(out_dir.glob("meta_*.json")):
        assert runner.proc.poll() is None, f"the recompute ended before its first checkpoint:\n{runner.output()}"
        assert time.monotonic() < hung, f"no checkpoint after 15 minutes: the recompute hangs\n{runner.output()}"
        time.sleep(0.1)


def processes_writing_into(out_dir: Path) -> list[str]:
    """Live processes given `--out_dir=<out_dir>` (the stage's torchrun and its worker)."""
    flag, found = f"--out_dir={out_dir}".encode(), []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            zombie = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
        except (OSError, IndexError):
            continue
        if flag in args and not zombie:
            found.append(b" ".join(args).decode(errors="replace"))
    return found


@pytest.mark.slow
def test_a_cancelled_recompute_keeps_the_good_artifact_for_the_next_run(kill_home, data_dir, tmp_path):
    values = tiny(data_dir, stop_after="base_train", base_train={"save_every": 2})
    run_in_child(values, tmp_path / "first.log")
    plan = plans_of(values)["base_train"]
    before = read_manifest(plan.artifact_dir)
    staged_out = staging_dir(plan.artifact_dir) / Path(plan.out_dir).name
    # the same artifact again, in a flow process of its own, cancelled at its recompute's first checkpoint
    with Runner({**values, "recompute_from": "base_train"}, tmp_path / "flow.log",
                env=held_after_first_checkpoint(tmp_path / "gate")) as runner:
        runner.connected()
        wait_for_checkpoint(runner, staged_out)
        code = runner.cancel()
    assert code != -signal.SIGTERM, f"SIGTERM killed the flow process instead of cancelling its run:\n{runner.output()}"
    with get_client(sync_client=True) as client:
        cancelled = client.read_flow_runs(limit=1, sort="START_TIME_DESC")[0]
    assert cancelled.state.type.value == "CANCELLED", (cancelled.state, runner.output())
    assert not processes_writing_into(staged_out), "the cancel left the stage's processes running"
    assert list(staged_out.glob("meta_*.json")), "the recompute's checkpoint is kept for a retry of its run"
    # the good artifact is where it was, unchanged and verified
    assert verify(plan.artifact_dir, plan.hash) and read_manifest(plan.artifact_dir) == before
    states = run_in_child(values, tmp_path / "again.log")
    assert states["base_train"] == "Cached", states
    assert read_manifest(plan.artifact_dir) == before
