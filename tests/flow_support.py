"""What the flow tests share: a temporary Prefect server per module, the tiny pipeline config, and readers
of what a run left on the server and on disk."""

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            LogFilter, LogFilterTaskRunId)
from prefect.testing.utilities import prefect_test_harness

from flows.config import PipelineConfig
from flows.pipeline import full_pipeline
from flows.plan import plan_pipeline
from flows.presets import deep_merge
from flows.stage_task import LOG_FILE

REPO = Path(__file__).resolve().parents[1]
LAUNCH_HEADER = " $ "   # each attempt writes one "# <time> $ <command>" line into stage.log


@pytest.fixture(scope="module", autouse=True)
def prefect_backend():
    """A temporary Prefect server per module, not one per session: the regression gate and the trend compare a
    run with the earlier runs of its lineage on the server, so one module's runs must not be another's past."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One builtin corpus for every test of the module (materialised by the first stage that reads it)."""
    return tmp_path_factory.mktemp("data") / "builtin"


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """A NANOPIPE_HOME kept across the kill tests, so they share one trained tokenizer."""
    return tmp_path_factory.mktemp("shared-home")


@pytest.fixture
def kill_home(shared_home, monkeypatch) -> Path:
    monkeypatch.setenv("NANOPIPE_HOME", str(shared_home))
    return shared_home


def tiny(data_dir: Path, **overrides) -> dict:
    """The demo-cpu preset, shrunk: a depth-2, width-64 model on 64-token sequences, vocab 512."""
    values = {
        "preset": "demo-cpu",
        "data": {"data_source": "builtin", "data_dir": str(data_dir)},
        "resources": {"nproc_per_node": 1, "retries": 0, "retry_delay_seconds": 0, "env": {"OMP_NUM_THREADS": "1"}},
        "tok_train": {"max_chars": 300_000, "vocab_size": 512},
        "tok_eval": {"val_chars": 20_000},
        "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64, "device_batch_size": 4,
                       "total_batch_size": 256, "num_iterations": 12, "eval_every": None, "eval_tokens": 512,
                       "save_every": 6},
        "base_eval": {"eval": "bpb", "device_batch_size": 4, "split_tokens": 512},
        "mid_train": {"mixture": "builtin", "builtin_size": 12, "max_seq_len": 64, "device_batch_size": 4,
                      "total_batch_size": 256, "num_iterations": 6, "eval_every": None, "eval_tokens": 512,
                      "save_every": 3},
        "chat_sft": {"mixture": "builtin", "builtin_size": 12, "device_batch_size": 2, "target_examples_per_step": 4,
                     "num_iterations": 5, "eval_every": None, "eval_steps": 2, "eval_metrics_every": None,
                     "eval_metrics_max_problems": 4, "save_every": 2},
        "chat_eval": {"task": ["Arithmetic", "MultipleChoice"], "max_problems": 4, "synthetic_size": 8,
                      "max_new_tokens": 12, "batch_size": 4},
        "chat_rl": {"task": "builtin-arithmetic", "synthetic_size": 16, "num_iterations": 2, "examples_per_step": 2,
                    "num_samples": 2, "device_batch_size": 2, "max_new_tokens": 8, "eval_every": None,
                    "eval_examples": 4, "save_every": 1},
    }
    return deep_merge(values, overrides)


def base_only(data_dir: Path, **overrides) -> dict:
    """`tiny`, ending after the base model's evaluation."""
    return tiny(data_dir, **{"stop_after": "base_eval", **overrides})


def plans_of(values: dict) -> dict:
    return {p.stage: p for p in plan_pipeline(PipelineConfig.model_validate(values))}


def run(values: dict):
    """Run full_pipeline; (final state, {step: task run state name}, wall seconds)."""
    started = time.monotonic()
    state = full_pipeline(values, return_state=True)
    # a run that failed may have failed before any stage (a config error): then it has no task run to wait for
    states = task_states(state.state_details.flow_run_id, expect_runs=state.is_completed())
    return state, states, time.monotonic() - started


def read_task_runs(flow_run_id: UUID, patience: float = 120.0, expect_runs: bool = True) -> list:
    """The flow run's task runs once the server has recorded them all in a final state. Prefect 3 records
    task runs from the events the run sends, a moment after the flow returns (longer on a loaded machine):
    read until all are final and two reads agree (and, with `expect_runs`, at least one is there)."""
    deadline = time.monotonic() + patience
    previous = None
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        seen = sorted((str(r.id), r.state.name if r.state else "") for r in runs)
        settled = ((runs or not expect_runs) and all(r.state and r.state.is_final() for r in runs)
                   and seen == previous)
        if settled or time.monotonic() > deadline:
            return runs
        previous = seen
        time.sleep(0.5)


def server_state(state):
    """The flow run's state as the server holds it (what the run header and the runs list show)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).state


def task_states(flow_run_id: UUID, expect_runs: bool = True) -> dict[str, str]:
    return {r.name.split(":")[0]: r.state.name for r in read_task_runs(flow_run_id, expect_runs=expect_runs)}


def edges(flow_run_id: UUID) -> dict[str, set[str]]:
    """{stage: upstream stages of its `upstream` parameter}, as the Prefect server recorded the task runs'
    inputs (what the UI draws as the run's graph)."""
    runs = read_task_runs(flow_run_id)
    name_of = {r.id: r.name for r in runs}
    return {r.name: {name_of.get(i.id, "?") for i in r.task_inputs.get("upstream", [])
                     if getattr(i, "input_type", "") == "task_run"} for r in runs}


def task_runs(flow_run_id: UUID) -> dict[str, object]:
    return {r.name: r for r in read_task_runs(flow_run_id)}


def task_log(task_run_id: UUID) -> list[str]:
    """The messages the task run sent to the Prefect log (what its page shows)."""
    with get_client(sync_client=True) as client:
        return [entry.message for entry in client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=200)]


def result_records() -> set[Path]:
    """Files in Prefect's local result storage: a run must add none (results are not persisted). (Prefect
    itself pickles the exception of a run whose parameters fail validation there, before any of our code.)"""
    from prefect.settings import get_current_settings
    storage = Path(get_current_settings().results.local_storage_path)
    return {p for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()


def artifacts_of(flow_run_id: UUID) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))


def launches(artifact_dir: str) -> int:
    log = Path(artifact_dir) / LOG_FILE
    return sum(1 for line in log.read_text().splitlines() if line.startswith("# ") and LAUNCH_HEADER in line)


def kill_after_checkpoint(out_dir: str, chosen: Callable[[bytes, list[bytes]], bool], timeout: float,
                          before: Callable[[], None] = lambda: None) -> threading.Thread:
    """SIGKILL the first process writing into `out_dir` that `chosen(cmdline, environ)` picks, as soon as the
    stage's first checkpoint there is complete; `before()` runs just before the kill."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if list(Path(out_dir).glob("meta_*.json")):
                for entry in filter(str.isdigit, os.listdir("/proc")):
                    try:
                        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                        environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if out_dir.encode() in cmdline and chosen(cmdline, environ):
                        before()
                        os.kill(int(entry), signal.SIGKILL)
                        return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_torchrun_after_checkpoint(out_dir: str, timeout: float = 180) -> threading.Thread:
    """SIGKILL the torchrun launcher writing into `out_dir` as soon as its first checkpoint is complete."""
    return kill_after_checkpoint(out_dir, lambda cmdline, _: b"torch.distributed.run" in cmdline, timeout)
