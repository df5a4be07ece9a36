"""The pipeline as Prefect flows on a tiny CPU config: end to end, cached re-runs, kills and resume,
damaged artifacts, preflight, concurrency. Against a temporary Prefect server per module (tests/flow_support.py)."""

import json
import math
import signal
import subprocess
from pathlib import Path

from prefect.client.orchestration import get_client

from flows.artifacts import read_manifest, verify
from flows.report import PROGRESS_FILE
from flows.stage_task import LOG_FILE, cache_key
from tests.flow_support import (LAUNCH_HEADER, tiny, base_only, plans_of, run, edges, task_runs, task_log,
                                result_records, artifacts_of, launches, kill_torchrun_after_checkpoint)
from tests.flow_support import prefect_backend, data_dir, shared_home, kill_home  # noqa: F401 (fixtures)


# -----------------------------------------------------------------------------

CHAIN = ["tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_eval_mid", "chat_sft",
         "chat_eval_sft"]


def test_prefect_result_storage_is_this_test_process_own():
    """The check below that a run persisted no result reads Prefect's local result storage; another pytest-xdist
    worker's test that makes Prefect pickle an error there (tests/test_flows_failures.py) must not land in it."""
    import tempfile
    from prefect.settings import get_current_settings
    storage = Path(get_current_settings().results.local_storage_path)
    assert storage.parent.parent == Path(tempfile.gettempdir())
    assert storage.parent.name.startswith("nanopipe-test-prefect-") and storage.name == "storage"


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


def test_damaged_or_deleted_artifacts_are_recomputed(kill_home, data_dir):
    values = tiny(data_dir, stop_after="tok_eval")
    plans = plans_of(values)
    assert run(values)[0].is_completed()   # (cached when an earlier test of the module trained them)

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


def test_recompute_from_forces_that_stage_and_later_ones(kill_home, data_dir):
    values = tiny(data_dir, stop_after="tok_eval")
    assert run(values)[0].is_completed()
    state, states, _ = run({**values, "recompute_from": "tok_eval"})
    assert state.is_completed()
    assert states == {"tok_train": "Cached", "tok_eval": "Completed"}
    artifact = Path(plans_of(values)["tok_eval"].artifact_dir)
    assert launches(artifact) == 1   # discarded, then produced afresh
    # the stage's message names the artifact it replaced, not the staging folder it was built in
    message = task_runs(state.state_details.flow_run_id)["tok_eval"].state.message
    assert message.startswith(f"recomputed {artifact.name}, built beside") and ".recompute" not in message, message


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
