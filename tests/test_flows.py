"""The pipeline as Prefect flows on a tiny CPU config: end to end, cached re-runs, kills and resume,
damaged artifacts, preflight, concurrency. Against a temporary Prefect server (prefect_test_harness)."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from pydantic import ValidationError
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            LogFilter, LogFilterTaskRunId)
from prefect.testing.utilities import prefect_test_harness

from flows.artifacts import read_manifest, verify
from flows.config import PipelineConfig
from flows.pipeline import Regression, failure_name, failure_sentence, full_pipeline, stage_flow
from flows.plan import PlanError, plan_pipeline
from flows.presets import deep_merge
from flows.report import PROGRESS_FILE
from flows.launcher import StageFailed
from flows.stage_task import LOG_FILE, cache_key

REPO = Path(__file__).resolve().parents[1]
LAUNCH_HEADER = " $ "   # each attempt writes one "# <time> $ <command>" line into stage.log


@pytest.fixture(scope="module", autouse=True)
def prefect_backend():
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


def kill_torchrun_after_checkpoint(out_dir: str, timeout: float = 180) -> threading.Thread:
    """SIGKILL the torchrun launcher writing into `out_dir` as soon as its first checkpoint is complete."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if list(Path(out_dir).glob("meta_*.json")):
                for entry in os.listdir("/proc"):
                    try:
                        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    except (OSError, ValueError):
                        continue
                    if b"torch.distributed.run" in cmdline and out_dir.encode() in cmdline:
                        os.kill(int(entry), signal.SIGKILL)
                        return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -----------------------------------------------------------------------------

CHAIN = ["tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_eval_mid", "chat_sft",
         "chat_eval_sft"]


def test_end_to_end_then_everything_cached(home, data_dir):
    values = tiny(data_dir)
    records_before = result_records()
    state, states, _ = run(values)
    assert state.is_completed(), state.message
    assert states == {stage: "Completed" for stage in CHAIN}
    plans = plans_of(values)
    for plan in plans.values():
        assert verify(plan.artifact_dir, plan.hash), plan.stage
        assert Path(plan.artifact_dir).parent.parent == home / "artifacts"
    base = read_manifest(plans["base_train"].artifact_dir)
    assert base["upstream"]["tokenizer_dir"]["hash"] == plans["tok_train"].hash
    assert base["metrics"]["step"] == 12 and base["metrics"]["val_bpb"] > 0
    assert "out/../" not in str(base["files"]) and "checkpoints/model_000012.pt" in base["files"]
    log = (Path(plans["base_train"].artifact_dir) / LOG_FILE).read_text()
    assert "step 00011/00012" in log and "@@nanopipe-progress" in log
    kinds = {(a.type, a.key) for a in artifacts_of(state.state_details.flow_run_id)}
    assert ("markdown", "nanopipe-summary") in kinds and ("table", "nanopipe-metrics") in kinds
    resolved = next(a for a in artifacts_of(state.state_details.flow_run_id) if a.key == "nanopipe-config")
    assert "Resolved config: preset `demo-cpu`" in resolved.data   # the first artifact of every run
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name.startswith("demo-cpu d2 ")
    table = next(a for a in artifacts_of(state.state_details.flow_run_id) if a.key == "nanopipe-metrics")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert all(set(row) == {"stage", "metric", "value"} for row in rows)   # every column shown by the UI
    assert {("base_train", "val_bpb"), ("chat_sft", "val_loss"), ("chat_eval_sft", "chatcore_partial")} <= \
        {(row["stage"], row["metric"]) for row in rows}
    assert any(kind == "progress" for kind, _ in kinds)

    linked = edges(state.state_details.flow_run_id)
    assert linked == {"tok_train": set(), "tok_eval": {"tok_train"}, "base_train": {"tok_train"},
                      "base_eval": {"tok_train", "base_train"}, "mid_train": {"tok_train", "base_train"},
                      "chat_eval_mid": {"tok_train", "mid_train"}, "chat_sft": {"tok_train", "mid_train"},
                      "chat_eval_sft": {"tok_train", "chat_sft"}}, linked
    mid, sft = (read_manifest(plans[s].artifact_dir) for s in ("mid_train", "chat_sft"))
    assert mid["upstream"]["checkpoint_dir"]["hash"] == plans["base_train"].hash and mid["metrics"]["step"] == 6
    assert sft["upstream"]["checkpoint_dir"]["hash"] == plans["mid_train"].hash and sft["metrics"]["step"] == 4
    for evaluation in ("chat_eval_mid", "chat_eval_sft"):
        # centred on chance: below-chance guessing (a tiny model on 4 problems) makes it negative; not all of
        # nanochat's six tasks, so the partial ChatCORE
        metrics = read_manifest(plans[evaluation].artifact_dir)["metrics"]
        assert metrics["chatcore"] is None and math.isfinite(metrics["chatcore_partial"])
        assert -1 <= metrics["chatcore_partial"] <= 1
    # the report card says what SFT taught on held-out problems, from the two evaluations' own counts
    card = (home / "report.md").read_text()
    after = read_manifest(plans["chat_eval_sft"].artifact_dir)["metrics"]["tasks"]["Arithmetic"]
    row = next(line for line in card.splitlines() if line.startswith("| chat_sft | Arithmetic accuracy |"))
    assert f"| {after['total']} | 0.0% |" in row and f"| {100 * after['accuracy']:.1f}% |" in row

    state, states, _ = run(values)
    assert state.is_completed()
    assert set(states.values()) == {"Cached"}, states
    # a verified artifact's task run carries no tags, so it asks the server for no concurrency slots
    assert all(r.tags == [] for r in task_runs(state.state_details.flow_run_id).values())
    # the cache is the verified artifact, never a persisted (pickled) task result
    assert result_records() == records_before
    # a fully cached run shows the same graph: the edges link this run's (Cached) task runs
    assert edges(state.state_details.flow_run_id) == linked
    assert all(launches(p.artifact_dir) == 1 for p in plans.values())
    refs = state.result()
    assert refs["base_train"].metrics["step"] == 12 and refs["base_train"].path == plans["base_train"].artifact_dir

    # recompute_from=mid_train redoes mid-training and everything after it, nothing before
    state, states, _ = run({**values, "recompute_from": "mid_train"})
    assert state.is_completed(), state.message
    assert states == {s: "Cached" if CHAIN.index(s) < CHAIN.index("mid_train") else "Completed" for s in CHAIN}

    # the optional RL stage joins after SFT, followed by its own chat evaluation
    state, states, _ = run({**values, "run_rl": True})
    assert state.is_completed(), state.message
    assert states == {**{s: "Cached" for s in CHAIN}, "chat_rl": "Completed", "chat_eval_rl": "Completed"}
    assert edges(state.state_details.flow_run_id)["chat_rl"] == {"tok_train", "chat_sft"}
    rl = read_manifest(plans_of({**values, "run_rl": True})["chat_rl"].artifact_dir)
    assert rl["metrics"]["step"] == 2 and 0 <= rl["metrics"]["reward"] <= 1


def test_killed_stage_is_retried_and_resumes_from_its_checkpoint(kill_home, data_dir):
    values = tiny(data_dir, resources={"retries": 1}, base_train={"num_iterations": 80, "save_every": 10},
                  stop_after="base_train")
    plan = plans_of(values)["base_train"]
    records_before = result_records()
    killer = kill_torchrun_after_checkpoint(plan.out_dir)
    state, states, _ = run(values)
    killer.join()
    assert state.is_completed(), state.message
    assert states["base_train"] == "Completed"
    manifest = read_manifest(plan.artifact_dir)
    assert manifest["timings"]["attempt"] == 2 and manifest["metrics"]["step"] == 80
    log = (Path(plan.artifact_dir) / LOG_FILE).read_text()
    assert launches(plan.artifact_dir) == 2
    commands = [line.split(LAUNCH_HEADER, 1)[1] for line in log.splitlines() if line.startswith("# ")
                and LAUNCH_HEADER in line]
    assert len(commands) == 2 and commands[0] == commands[1] and "--resume_from_step=latest" in commands[0]
    assert "Resuming from step" in log
    assert f"exit code {-signal.SIGKILL}" in log

    # the ref says where the retry resumed, in the stage's own words
    resumed = state.result()["base_train"].resumed_from
    assert resumed and resumed % 10 == 0 and f"Resuming from step {resumed} " in log
    assert manifest["timings"]["resumed_from"] == resumed
    # the progress history holds both attempts, the steps before the resume included, and is in the manifest
    records = [json.loads(line) for line in (Path(plan.artifact_dir) / PROGRESS_FILE).read_text().splitlines()]
    first = [r["step"] for r in records if r["attempt"] == 1]
    second = [r["step"] for r in records if r["attempt"] == 2]
    # (checkpoint N is written after step N-1 trained; the steps after it were trained again)
    assert first and first[0] == 0 and first[-1] >= resumed - 1 and second[0] == resumed and second[-1] == 80
    assert all(r["total"] == 80 and r["t"] > 0 and ("loss" in r or "val_bpb" in r) for r in records)
    assert PROGRESS_FILE in manifest["files"]

    # the task run: named and tagged by stage, preset and artifact; its state message says key and code
    run_of_stage = task_runs(state.state_details.flow_run_id)["base_train"]
    assert {"stage:base_train", "preset:demo-cpu", f"artifact:{plan.hash}"} <= set(run_of_stage.tags)
    assert cache_key(plan) in run_of_stage.state.message and plan.code_version in run_of_stage.state.message
    assert f"resumed from step {resumed}" in run_of_stage.state.message
    # one human line per step in the Prefect log, no machine-readable progress lines
    messages = task_log(run_of_stage.id)
    assert any(m.startswith("step 00079/00080") for m in messages), messages[-20:]
    assert not any("@@nanopipe-progress" in m for m in messages)
    # the progress artifact keeps the last step's figures
    progress = [a for a in artifacts_of(state.state_details.flow_run_id) if a.type == "progress"]
    assert any(a.description.startswith("base_train: 80/80 loss=") and "val_bpb=" in a.description
               and a.description.endswith("(done)") for a in progress), [a.description for a in progress]
    assert "base-train-progress" in {a.key for a in progress}   # the card is titled by its stage
    assert result_records() == records_before


def test_a_failed_run_rerun_executes_no_upstream_stage(kill_home, data_dir):
    values = tiny(data_dir, base_train={"num_iterations": 70, "save_every": 10}, stop_after="base_train")
    plans = plans_of(values)
    killer = kill_torchrun_after_checkpoint(plans["base_train"].out_dir)
    state, states, _ = run(values)
    killer.join()
    assert state.is_failed()
    assert states["base_train"] == "Failed" and {states["tok_train"], states["tok_eval"]} <= {"Completed", "Cached"}
    assert "SIGKILL" in state.message or "SIGKILL" in str(state.result(raise_on_failure=False))
    assert not verify(plans["base_train"].artifact_dir)

    state, states, _ = run(values)
    assert state.is_completed(), state.message
    assert states == {"tok_train": "Cached", "tok_eval": "Cached", "base_train": "Completed"}
    # the resumed stage is linked to the Cached tokenizer it reads
    assert edges(state.state_details.flow_run_id)["base_train"] == {"tok_train"}
    assert launches(plans["tok_train"].artifact_dir) == 1
    assert "Resuming from step" in (Path(plans["base_train"].artifact_dir) / LOG_FILE).read_text()


def test_a_killed_mid_training_resumes_that_stage_only(kill_home, data_dir):
    values = tiny(data_dir, resources={"retries": 1}, mid_train={"num_iterations": 40, "save_every": 5},
                  stop_after="mid_train")
    plan = plans_of(values)["mid_train"]
    killer = kill_torchrun_after_checkpoint(plan.out_dir)
    state, states, _ = run(values)
    killer.join()
    assert state.is_completed(), state.message
    assert states["mid_train"] == "Completed" and states["base_train"] in ("Completed", "Cached")
    manifest = read_manifest(plan.artifact_dir)
    assert manifest["timings"]["attempt"] == 2 and manifest["metrics"]["step"] == 40
    log = (Path(plan.artifact_dir) / LOG_FILE).read_text()
    assert launches(plan.artifact_dir) == 2 and "Resuming from step" in log
    upstream = plans_of(values)["base_train"]
    assert launches(upstream.artifact_dir) == 1    # the base model was trained once, never again


def test_damaged_or_deleted_artifacts_are_recomputed(home, data_dir):
    values = tiny(data_dir, stop_after="tok_eval")
    plans = plans_of(values)
    assert run(values)[0].is_completed()

    records_before = result_records()
    metrics = Path(plans["tok_eval"].out_dir) / "metrics.json"
    metrics.write_text(metrics.read_text() + " ")
    state, states, _ = run(values)
    assert states == {"tok_train": "Cached", "tok_eval": "Completed"}
    assert verify(plans["tok_eval"].artifact_dir, plans["tok_eval"].hash)
    cached = task_runs(state.state_details.flow_run_id)["tok_train"].state
    assert cache_key(plans["tok_train"]) in cached.message and plans["tok_train"].code_version in cached.message
    assert result_records() == records_before

    subprocess.run(["rm", "-rf", plans["tok_train"].artifact_dir], check=True)
    state, states, _ = run(values)
    assert state.is_completed()
    # same inputs, same address: the recomputed tokenizer lands where it was, the eval stays valid
    assert states == {"tok_train": "Completed", "tok_eval": "Cached"}
    assert verify(plans["tok_train"].artifact_dir, plans["tok_train"].hash)


def test_recompute_from_forces_that_stage_and_later_ones(home, data_dir):
    values = tiny(data_dir, stop_after="tok_eval")
    assert run(values)[0].is_completed()
    state, states, _ = run({**values, "recompute_from": "tok_eval"})
    assert state.is_completed()
    assert states == {"tok_train": "Cached", "tok_eval": "Completed"}
    assert launches(plans_of(values)["tok_eval"].artifact_dir) == 1   # discarded, then produced afresh


@pytest.mark.slow
def test_a_failed_recompute_keeps_the_good_artifact(home, data_dir):
    """recompute_from builds beside the artifact: one that fails leaves it in place, verified and reused; the
    next recompute (another run) discards the unfinished one and swaps its own in once it verifies."""
    from flows.recompute import staging_dir, staging_owner
    values = tiny(data_dir, stop_after="tok_eval")
    first, _, _ = run(values)
    assert first.is_completed()
    plan = plans_of(values)["tok_eval"]
    before = read_manifest(plan.artifact_dir)
    # the same artifact (resources are not in its hash), recomputed without the time to do it
    no_time = {"tok_eval": {"timeout_minutes": 0.001, "retries": 0, "env": {"OMP_NUM_THREADS": "1"}}}
    state, states, _ = run({**values, "recompute_from": "tok_eval", "stage_resources": no_time})
    assert state.is_failed() and state.name == "Timed out" and states == {"tok_train": "Cached", "tok_eval": "Failed"}
    assert verify(plan.artifact_dir, plan.hash) and read_manifest(plan.artifact_dir) == before
    assert staging_owner(plan.artifact_dir) == str(state.state_details.flow_run_id)
    assert run(values)[1] == {"tok_train": "Cached", "tok_eval": "Cached"}   # still the good one

    state, states, _ = run({**values, "recompute_from": "tok_eval"})
    assert state.is_completed() and states == {"tok_train": "Cached", "tok_eval": "Completed"}
    assert not staging_dir(plan.artifact_dir).exists() and verify(plan.artifact_dir, plan.hash)
    after = read_manifest(plan.artifact_dir)
    assert after["flow_run_id"] == str(state.state_details.flow_run_id) != before["flow_run_id"]
    assert after["config"]["out_dir"] == plan.out_dir   # where it lives now, not where it was built
    assert launches(plan.artifact_dir) == 1   # the other run's unfinished attempt was not continued


@pytest.mark.slow
def test_a_retried_recompute_continues_from_its_own_checkpoints(kill_home, data_dir):
    """A recompute killed mid-stage, then retried as the same flow run (the UI's Retry; here the flow's own
    retry): the good artifact stays until the end, and the retry resumes the recompute's checkpoints."""
    from flows.recompute import staging_dir
    values = tiny(data_dir, stop_after="base_train")
    assert run(values)[0].is_completed()
    plan = plans_of(values)["base_train"]
    before = read_manifest(plan.artifact_dir)
    staged_out = str(staging_dir(plan.artifact_dir) / Path(plan.out_dir).name)
    killer = kill_torchrun_after_checkpoint(staged_out)
    retried = full_pipeline.with_options(retries=1, retry_delay_seconds=0)
    state = retried({**values, "recompute_from": "base_train"}, return_state=True)
    killer.join()
    assert state.is_completed(), state.message
    after = read_manifest(plan.artifact_dir)
    assert after["flow_run_id"] == str(state.state_details.flow_run_id) != before["flow_run_id"]
    assert verify(plan.artifact_dir, plan.hash) and not staging_dir(plan.artifact_dir).exists()
    log = (Path(plan.artifact_dir) / LOG_FILE).read_text()
    assert launches(plan.artifact_dir) == 2 and "Resuming from step" in log, log[-2000:]


def test_bad_late_stage_setting_fails_before_any_stage_runs(home, data_dir):
    # 256 tokens per step do not split over 3 processes x 4 sequences x 64 tokens: only the dry run knows
    values = tiny(data_dir, resources={"nproc_per_node": 3})
    state, states, _ = run(values)
    assert state.is_failed()
    # the run's state message is one sentence: which stage, and why
    assert "stage base_train" in state.message and "--total_batch_size" in state.message
    assert "\n" not in state.message and not state.message.startswith("Flow run encountered")
    assert state.name == "Bad config" and server_state(state).name == "Bad config"   # the header and runs list
    assert states == {} and not (home / "artifacts").exists()
    with pytest.raises(PlanError, match="total_batch_size"):   # called without return_state, the flow raises
        full_pipeline(values)

    # a value the parameter form cannot check: the run ends at once, saying which field and why
    records_before = result_records()
    state = full_pipeline(tiny(data_dir, base_eval={"eval": "nope"}), return_state=True)
    assert state.is_failed() and state.message.startswith("invalid config (PipelineConfig): base_eval.eval: ")
    assert "nope" in state.message and "\n" not in state.message and state.name == "Bad config"
    horizons = tiny(data_dir, base_train={"target_param_data_ratio": 10})   # and num_iterations=12
    state = full_pipeline(horizons, return_state=True)
    assert state.is_failed() and state.message.startswith("invalid config (PipelineConfig): base_train: ")
    assert "training horizons" in state.message and "\n" not in state.message
    assert result_records() == records_before   # Prefect's own parameter check would pickle the error


def test_an_unknown_field_is_refused_at_once_with_the_closest_names(home, data_dir):
    state = full_pipeline(tiny(data_dir, base_train={"depht": 3}, stage_resources={"tok_train": {"nproc": 1}}),
                          return_state=True)
    assert state.is_failed() and server_state(state).name == "Bad config"
    assert "unknown field 'depht' in base_train; did you mean 'depth'?" in state.message
    assert "unknown field 'nproc' in stage_resources.tok_train; did you mean 'nproc_per_node'" in state.message
    assert "Extra inputs" not in state.message and not (home / "artifacts").exists()   # before any stage


def test_concurrent_runs_of_one_config_produce_it_once(home, data_dir):
    values = tiny(data_dir, stop_after="tok_train")
    results = []
    threads = [threading.Thread(target=lambda: results.append(run(values))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0].is_completed() for r in results] == [True, True]
    plan = plans_of(values)["tok_train"]
    assert launches(plan.artifact_dir) == 1 and verify(plan.artifact_dir, plan.hash)


def test_a_single_stage_flow_needs_its_inputs(home, data_dir):
    values = tiny(data_dir)
    state = stage_flow("tok_eval", values, return_state=True)
    assert state.is_failed() and "tok_train" in state.message and "run those stages first" in state.message
    assert state.name == "Missing inputs"
    assert stage_flow("tok_train", values, return_state=True).is_completed()
    ref = stage_flow("tok_eval", values)
    assert ref.stage == "tok_eval" and verify(ref.path, ref.hash)


def test_the_cli_runs_the_pipeline(home, data_dir):
    from prefect.settings import PREFECT_API_URL
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    args = ["--preset=demo-cpu", f"--home={home}", f"--data.data_dir={data_dir}", "--stop_after=tok_train",
            "--tok_train.max_chars=300000", "--tok_train.vocab_size=512", "--resources.env.OMP_NUM_THREADS=1"]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "nanopipe: Completed" in out.stdout
    status = subprocess.run([sys.executable, "-m", "flows.cli", "status", *args, "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert '"state": "complete"' in status.stdout and "tok_train" in status.stdout


def test_a_failure_a_retry_cannot_fix_is_not_retried(home, data_dir, tmp_path):
    missing = tmp_path / "no-such-shards"
    values = tiny(data_dir, stop_after="tok_train", resources={"retries": 3, "retry_delay_seconds": 0},
                  data={"data_source": "local", "data_dir": str(missing)})
    state, states, _ = run(values)
    assert state.is_failed() and states == {"tok_train": "Failed"}
    assert "not retried" in state.message and str(missing) in state.message   # the stage's own reason
    assert state.message.startswith("tok_train failed: ") and "\n" not in state.message
    assert server_state(state).name == "Bad config"   # the stage refused its input: the class, as the state name
    assert "(log: " in state.message and not state.message.startswith("Flow run encountered")
    assert isinstance(state.result(raise_on_failure=False), StageFailed)   # the exception stays the data
    assert launches(plans_of(values)["tok_train"].artifact_dir) == 1


@pytest.mark.slow
def test_a_cancelled_run_is_named_by_the_stage_and_step_it_stopped_at(kill_home, data_dir):
    """The cancel a worker's runner sends (its intent on the control channel, then SIGTERM), in-process: the run
    ends Cancelled, its state named "Cancelled at base_train step N" and its message saying where a re-run
    resumes; the process that renames it ends by itself."""
    from prefect._internal import control_listener
    from flows.cancel_note import rename_when_cancelled   # noqa: F401  (the module the flow starts)
    values = tiny(data_dir, stop_after="base_train", base_train={"num_iterations": 100_000, "save_every": 2})
    out_dir = Path(plans_of(values)["base_train"].out_dir)

    def cancel_after_a_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out_dir.glob("meta_*.json")):
            time.sleep(0.05)
        control_listener._set_intent("cancel")   # what the runner says before its SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    canceller = threading.Thread(target=cancel_after_a_checkpoint, daemon=True)
    canceller.start()
    try:
        full_pipeline(values, return_state=True)
    except BaseException as exc:   # the engine re-raises the termination once the run is Cancelled
        assert type(exc).__name__ == "TerminationSignal", exc
    finally:
        control_listener.clear_intent()
        signal.signal(signal.SIGTERM, before)
    canceller.join()
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=None, limit=1, sort="START_TIME_DESC")[0]
        deadline = time.monotonic() + 120
        while not run.state.name.startswith("Cancelled at") and time.monotonic() < deadline:
            time.sleep(0.5)
            run = client.read_flow_run(run.id)
    assert run.state.type.value == "CANCELLED", run.state
    saved = max(int(p.stem.split("_")[1]) for p in out_dir.glob("model_*.pt"))
    name = run.state.name
    # the step the stage last reported (0-based) is at or after the checkpoint's (steps done), never before it
    assert name.startswith("Cancelled at base_train step ") and int(name.rsplit(" ", 1)[1]) + 1 >= saved, name
    assert run.state.message == (f"base_train cancelled at step {name.rsplit(' ', 1)[1]} on the run's cancel; a "
                                 f"re-run resumes from its checkpoint at step {saved} in {out_dir}")


def test_a_regression_ends_the_run_failed_and_keeps_the_artifacts(home, data_dir, monkeypatch):
    """The summary's regression gate (publish_summary returning `.markdown` and `.regressions`) fails a run
    whose stages all completed, naming each regression; the artifacts stay valid and are reused."""
    import flows.pipeline
    from flows.report import publish_summary

    class Gated:
        def __init__(self, report):
            self.markdown, self.regressions = report.markdown, ["tok_train val_bytes_per_token 3.1 < 3.2 (last good)"]
            self.summary = str(report)

        def __str__(self):
            return self.summary

    values = tiny(data_dir, stop_after="tok_train")
    with monkeypatch.context() as patch:
        patch.setattr(flows.pipeline, "publish_summary", lambda *a, **k: Gated(publish_summary(*a, **k)))
        state, states, _ = run(values)
    assert state.is_failed() and states == {"tok_train": "Completed"}
    assert state.message == "regression: tok_train val_bytes_per_token 3.1 < 3.2 (last good)"
    assert server_state(state).name == "Regression"
    state, states, _ = run(values)
    assert state.is_completed() and states == {"tok_train": "Cached"}


def test_a_failure_is_told_in_one_sentence():
    """The run's state message: the first line of our own errors (preflight's names each failed stage and its
    reason, tests/test_events.py); a pydantic error names each field; anything else keeps its type."""
    preflight = PlanError("preflight failed before any stage ran: stage base_train: dry run failed (exit code 2): "
                          "BaseTrainConfig: --depth must be positive\n\nstage base_train: dry run failed (exit code "
                          "2): BaseTrainConfig: --depth must be positive\nthe end of its output")
    assert failure_sentence(preflight) == (
        "preflight failed before any stage ran: stage base_train: dry run failed (exit code 2): BaseTrainConfig: "
        "--depth must be positive")
    with pytest.raises(ValidationError) as invalid:
        PipelineConfig.model_validate({"preset": "demo-cpu", "base_eval": {"eval": "nope"}})
    sentence = failure_sentence(invalid.value)
    assert sentence.startswith("invalid config (PipelineConfig): base_eval.eval: ") and "nope" in sentence
    assert failure_sentence(KeyError("model_config")) == "KeyError: model_config"   # not str()'s quotes
    assert len(failure_sentence(RuntimeError("x" * 5000))) <= 600


@pytest.mark.parametrize("exc, name", [
    (StageFailed("base_train failed: out of memory [oom, not retried]", kind="oom"), "Out of memory"),
    (StageFailed("base_train failed: exit code 2 [config, not retried]", kind="config"), "Bad config"),
    (StageFailed("base_train failed: the loss became NaN [nan, not retried]", kind="nan"), "Loss diverged"),
    (StageFailed("base_train failed: a collective ... [network, will be retried]", kind="network"), "Node lost"),
    (StageFailed("base_train failed: killed by signal SIGKILL: node 1 (flow run base_train-node-1) ended Crashed "
                 "without a result: boom [killed, will be retried]", kind="killed"), "Node lost"),
    (StageFailed("base_train failed: exit code 1: node 2 never started: no worker [error, not retried]"), "Node lost"),
    (StageFailed("base_train failed: killed by signal SIGKILL [killed, will be retried]", kind="killed"), "Killed"),
    (StageFailed("base_train failed: exit code 1 [error, not retried]"), "Stage error"),
    (PlanError("preflight failed before any stage ran: stage base_train: dry run failed"), "Preflight failed"),
    (PlanError("stage base_train on 2 process(es): --total_batch_size=5000 ..."), "Bad config"),
    (Regression("regression: base_eval core 0.1 < 0.2"), "Regression"),
    (RuntimeError("something else"), "Failed"),
])
def test_a_failure_is_named_by_its_class(exc, name):
    assert failure_name(exc) == name


# -----------------------------------------------------------------------------
# The artifact store: a node without the local files

import shutil  # noqa: E402

from tests.test_store import moto_endpoint, s3_url  # noqa: E402,F401  (the loopback S3 server fixtures)


def test_a_node_without_the_artifacts_restores_them_from_the_store(data_dir, home, s3_url):
    from flows.store import open_store
    values = base_only(data_dir, stop_after="base_train", artifact_store=s3_url)
    plans = plans_of(values)
    state, states, _ = run(values)
    assert state.is_completed(), state.message
    fs, root = open_store(s3_url)
    base = plans["base_train"]
    stored = fs.find(f"{root}/base_train/{Path(base.artifact_dir).name}")
    assert any(p.endswith("manifest.json") for p in stored) and any("model_000012.pt" in p for p in stored)

    shutil.rmtree(home / "artifacts")   # another node: the same home path, none of the files
    state, states, _ = run(values)
    assert state.is_completed(), state.message
    assert set(states.values()) == {"Cached"}, states
    runs = task_runs(state.state_details.flow_run_id)
    assert all("restored" in r.state.message for r in runs.values()), [r.state.message for r in runs.values()]
    for plan in plans.values():
        assert verify(plan.artifact_dir, plan.hash)
        assert (Path(plan.artifact_dir) / LOG_FILE).read_text().count(LAUNCH_HEADER) == 1   # not run again
