"""Integration against a real `prefect server start` on 127.0.0.1: `prefect deploy --all` from prefect.yaml,
a process worker on the `nanopipe` pool runs the full-pipeline deployment, and cancelling a run mid-stage
leaves no process behind."""

import json
import os
import re
import time
from pathlib import Path

import pytest
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from flows.artifacts import verify
from flows.launcher import pids_with_env
from tests.test_flows_server_support import POOL, TINY, prefect_stack, wait_for_state

EXPECTED_DEPLOYMENTS = {"full-pipeline/full-pipeline", "full-pipeline/nightly", "stage/stage-tok-train", "stage/stage-chat-sft",
                        "stage/stage-tok-eval", "stage/stage-base-train", "stage/stage-base-eval"}


@pytest.fixture(scope="module")
def stack():
    return prefect_stack()


def processes_of_flow_run(flow_run_id: str) -> list[int]:
    """Pids (not zombies) whose environment names this flow run: its process, torchrun, the workers."""
    return pids_with_env("PREFECT__FLOW_RUN_ID", flow_run_id)


def run_deployment(stack, name: str, parameters: dict, watch: bool) -> tuple[str, str]:
    args = ["deployment", "run", name, "--params", json.dumps(parameters)]
    if watch:
        args += ["--watch", "--watch-timeout", "400"]
    done = stack.prefect(*args, timeout=450)
    match = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert match, f"no flow run id in the output:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return match.group(1), done.stdout + done.stderr


def test_prefect_yaml_deploys_every_deployment_to_the_pool(stack):
    from prefect.client.orchestration import SyncPrefectClient
    with SyncPrefectClient(stack.api_url) as client:
        deployments = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
        names = {f"{flows[d.flow_id]}/{d.name}" for d in deployments}
        assert EXPECTED_DEPLOYMENTS <= names
        nightly = client.read_deployment_by_name("full-pipeline/nightly")
        # the nightly runs on GPU nodes only (its own pool), deployed paused; everything else on the CPU pool
        agent = next(d for d in deployments if d.name == "node-agent")   # multi-node stages' nodes 1, 2, ...
        assert agent.work_pool_name == "nanopipe-nodes"
        assert {d.work_pool_name for d in deployments if d.id not in (nightly.id, agent.id)} == {POOL}
        assert nightly.work_pool_name == "nanopipe-gpu"
        assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [("0 2 * * *", False)]
        scheduled = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))
        assert scheduled == []   # paused: no nightly run is pre-created until it is resumed
        manual = client.read_deployment_by_name("full-pipeline/full-pipeline")
        assert manual.parameters == {"config": {"preset": "demo-cpu"}} and not manual.schedules
        schema = manual.parameter_openapi_schema
        assert "PipelineConfig" in json.dumps(schema) and "recompute_from" in json.dumps(schema)


def test_a_worker_runs_the_full_pipeline_deployment(stack):
    flow_run_id, output = run_deployment(stack, "full-pipeline/full-pipeline", {"config": TINY}, watch=True)
    state = wait_for_state(stack, flow_run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=60)
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}\n{output[-3000:]}\n{stack.log('worker.log')}"
    tokenizers = list((stack.nanopipe_home / "artifacts" / "tok_train").glob("v512-*"))
    assert len(tokenizers) == 1 and verify(tokenizers[0])
    assert (tokenizers[0] / "tokenizer" / "tokenizer.json").is_file()


def test_cancelling_a_run_mid_stage_leaves_no_process(stack):
    config = {**TINY, "stop_after": "base_train",
              "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64,
                             "device_batch_size": 4, "total_batch_size": 256, "num_iterations": 100_000,
                             "eval_every": None, "eval_tokens": 512}}
    flow_run_id, _ = run_deployment(stack, "full-pipeline/full-pipeline", {"config": config}, watch=False)
    deadline = time.monotonic() + 240
    training = []
    while time.monotonic() < deadline and len(training) < 2:   # torchrun and its worker are up
        training = [p for p in processes_of_flow_run(flow_run_id)
                    if b"nanopipe.stages.base_train" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.2)
    assert len(training) >= 2, f"base_train never started; worker log:\n{stack.log('worker.log')}"

    done = stack.prefect("flow-run", "cancel", flow_run_id)
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processes_of_flow_run(flow_run_id):
        time.sleep(0.2)
    assert processes_of_flow_run(flow_run_id) == [], "processes survived the cancellation"
    # named by where it stopped, once the worker has written its own "Cancelled" (flows/cancel_note.py)
    state = wait_for_state(stack, flow_run_id, {"CANCELLED"}, timeout=90, name="Cancelled at base_train")
    assert "a re-run " in state.message and "Flow run was cancelled" not in state.message
    # the stage that was running ends Cancelled (not Crashed), and the run's summary says so
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)
    with SyncPrefectClient(stack.api_url) as client:
        stages = {r.name: r.state for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
        summary = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))) if a.key == "nanopipe-summary"]
    stage = stages["base_train"]
    assert stage.type.value == "CANCELLED", f"{stage.name}: {stage.message}"
    assert stage.message.startswith("base_train cancelled")
    rows = [line for a in summary for line in str(a.data).splitlines() if line.startswith("| base_train ")]
    assert rows and "Cancelled" in rows[-1], rows


def test_retrying_a_failed_run_reruns_only_the_failed_stage_from_its_checkpoint(stack):
    from flows.config import PipelineConfig
    from flows.plan import plan_pipeline
    config = {**TINY, "stop_after": "base_train",
              "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64,
                             "device_batch_size": 4, "total_batch_size": 256, "num_iterations": 80,
                             "eval_every": None, "eval_tokens": 512, "save_every": 10}}
    plans = {p.stage: p for p in plan_pipeline(PipelineConfig.model_validate(config), home=stack.nanopipe_home)}
    out_dir = plans["base_train"].out_dir
    flow_run_id, _ = run_deployment(stack, "full-pipeline/full-pipeline", {"config": config}, watch=False)
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and not killed:   # SIGKILL torchrun once a checkpoint is complete
        if list(Path(out_dir).glob("meta_*.json")):
            for pid in processes_of_flow_run(flow_run_id):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"torch.distributed.run" in cmdline and out_dir.encode() in cmdline:
                    os.kill(pid, 9)
                    killed = True
        time.sleep(0.05)
    assert killed, f"base_train never checkpointed; worker log:\n{stack.log('worker.log')}"
    state = wait_for_state(stack, flow_run_id, {"FAILED", "COMPLETED", "CRASHED"}, timeout=120)
    assert state.type.value == "FAILED", state.name

    done = stack.prefect("flow-run", "retry", flow_run_id)
    assert done.returncode == 0, done.stdout + done.stderr
    state = wait_for_state(stack, flow_run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=300)
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}\n{stack.log('worker.log')}"
    log = (Path(plans["base_train"].artifact_dir) / "stage.log").read_text()
    assert log.count(" $ ") == 2 and "Resuming from step" in log
    assert verify(plans["base_train"].artifact_dir, plans["base_train"].hash)
    assert (Path(plans["tok_train"].artifact_dir) / "stage.log").read_text().count(" $ ") == 1
