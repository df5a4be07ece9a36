"""Multi-node stages through a real Prefect server: node 0 in the calling process, node 1 the `node-agent`
deployment run by a process worker on work queue `node-1` (two "nodes" on one machine, gloo on CPU).

A 2-node x 1-process base_train gives the losses of a 1-node x 2-process run; SIGKILLing node 1's torchrun
after a checkpoint fails the stage retryably with node 0 stopped, and calling again resumes and completes; a
node no worker starts fails the stage (not retried) and stops the others, node 0 saying meanwhile what it waits
for and, when it gives up, which node never started and its run's state; a server without the node-agent
deployment fails the stage at once (not retried); an exception in the caller (what a cancelled pipeline run
raises in the task) stops every node; with resources.min_nnodes=1, a pipeline whose node 1 is lost (its worker
gone) retries base_train on node 0 alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.launcher import Resources, failure_from, launch, pids_with_env, stage_command
from flows.multinode import NODE_POOL, launch_across_nodes, node_queue
from flows.plan import StagePlan
from tests.fixtures.tiny_corpus import build_shards, build_tokenizer, tiny_model_flags
from tests.procs import pids_with_cmdline
from tests.test_flows_server_support import PrefectStack, free_port, prefect_stack

pytestmark = pytest.mark.slow

STEPS = 16   # base_train times the steps after its first 10 (tokens_per_sec in metrics.json)
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss: [\d.]+ \(this step ([\d.]+)\)", re.M)

@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """The shared server stack (which deploys prefect.yaml's node-agent to its own pool) plus one worker
    serving queue node-1 only (node 1, WORKERS[1]); the worker is stopped, with whatever it runs, at the end of
    the module."""
    stack = prefect_stack()
    WORKERS[1] = start_worker(stack, 1)
    try:
        yield stack
    finally:
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            _stop(stack, WORKERS.pop(1))


WORKERS: dict[int, subprocess.Popen] = {}   # node -> the worker serving its queue (a test may replace one)


def start_worker(stack: PrefectStack, node: int) -> subprocess.Popen:
    return stack.spawn("worker", "start", "--pool", NODE_POOL, "--work-queue", node_queue(node),
                       log_name=f"node-{node}-worker.log")


@pytest.fixture(autouse=True)
def stack_api(request):
    """Point this test's Prefect client at the shared stack, for this test only: a module-long setting
    (a context variable) would outlive the module and send the next module's client to the wrong server."""
    if "nodes" not in request.fixturenames:
        yield
        return
    with temporary_settings({PREFECT_API_URL: request.getfixturevalue("nodes").api_url}):
        yield


def _stop(stack: PrefectStack, worker: subprocess.Popen) -> None:
    """Stop node 1's worker, then anything still running for a node-agent run (a test that failed midway)."""
    with SyncPrefectClient(stack.api_url) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["node-agent"])))
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    stack.processes.remove(worker)
    for run in runs:
        for pid in pids_with_env("PREFECT__FLOW_RUN_ID", str(run.id)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    build_tokenizer(root / "tokenizer")
    build_shards(root / "data", row_group_docs=8)
    return root


def base_train_plan(inputs: Path, artifact_dir: Path, resources: Resources, **overrides) -> StagePlan:
    out_dir = artifact_dir / "checkpoints"
    args = tiny_model_flags(tokenizer_dir=inputs / "tokenizer", data_dir=inputs / "data", out_dir=out_dir,
                            device_type="cpu", resume_from_step="latest", **overrides)
    return StagePlan(stage="base_train", module="nanopipe.stages.base_train", tag="d2", hash="0" * 16,
                     code_version="test", artifact_dir=str(artifact_dir), out_dir=str(out_dir), config={}, args=args,
                     resources=resources, distributed=True, resume_flag=("resume_from_step", "latest"))


def two_nodes(endpoint: str) -> Resources:
    return Resources(nproc_per_node=1, nnodes=2, rdzv_endpoint=endpoint, env={"OMP_NUM_THREADS": "1"})


def without_endpoint(plan: StagePlan) -> StagePlan:
    """The plan with no rendezvous endpoint: launch_across_nodes picks node 0's host and a free port.
    (Resources' own rule still asks for an endpoint when nnodes > 1, hence the copy without validation.)"""
    return plan.model_copy(update={"resources": plan.resources.model_copy(update={"rdzv_endpoint": None})})


def step_losses(text: str) -> dict[int, float]:
    """{step: this step's loss} from the stage's human lines."""
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(text)}


def processes_of(out_dir: Path) -> list[int]:
    """Live processes whose command line names this stage's output directory (torchrun and its workers)."""
    return pids_with_cmdline(str(out_dir))


def node_runs(stack: PrefectStack, out_dir: Path) -> dict[str, object]:
    """{flow run name: state} of the node-agent runs of the stage writing to out_dir."""
    with SyncPrefectClient(stack.api_url) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["node-agent"])))
    return {r.name: r.state for r in runs if r.parameters["plan"]["out_dir"] == str(out_dir)}


def test_two_nodes_through_prefect_match_one_node_with_two_processes(nodes, inputs, tmp_path):
    plan = without_endpoint(base_train_plan(inputs, tmp_path / "two", two_nodes("unused:1"), num_iterations=STEPS))
    lines: list[str] = []
    progress: list[dict] = []
    two = launch_across_nodes(plan, log_path=tmp_path / "two" / "stage.log", on_line=lines.append,
                              on_progress=progress.append, timeout_seconds=600)
    assert two.returncode == 0, "\n".join(two.tail) + nodes.log("node-1-worker.log")
    assert processes_of(tmp_path / "two") == []
    assert "World size 2, gradient accumulation steps: 1" in "\n".join(lines)   # rank 0 streamed here
    assert [p["step"] for p in progress if "loss" in p] == list(range(STEPS))
    assert "--node_rank=0" in two.command and "--rdzv_backend=static" in two.command
    remote_log = (tmp_path / "two" / "stage.node1.log").read_text()
    assert "--node_rank=1" in remote_log and "exit code 0" in remote_log
    assert {name: state.name for name, state in node_runs(nodes, Path(plan.out_dir)).items()} == \
        {"base_train-node-1": "Completed"}

    one_plan = base_train_plan(inputs, tmp_path / "one", two_nodes("unused:1"), num_iterations=STEPS)
    one_cmd = stage_command(one_plan.module, one_plan.args, Resources(nproc_per_node=2))
    one = launch(one_cmd, log_path=tmp_path / "one" / "stage.log", env={"OMP_NUM_THREADS": "1"}, timeout_seconds=600)
    assert one.returncode == 0, "\n".join(one.tail)

    losses_two = step_losses((tmp_path / "two" / "stage.log").read_text())
    losses_one = step_losses((tmp_path / "one" / "stage.log").read_text())
    assert sorted(losses_two) == sorted(losses_one) == list(range(STEPS))
    for step in range(STEPS):
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5), step
    assert losses_two[STEPS - 1] < losses_two[0]
    m_two, m_one = (json.loads((tmp_path / d / "checkpoints" / "metrics.json").read_text()) for d in ("two", "one"))
    assert m_two["world_size"] == m_one["world_size"] == 2
    assert m_two["train_loss"] == pytest.approx(m_one["train_loss"], rel=1e-5)
    print(f"\ntokens/s (metrics.json): 2 nodes x 1 process {m_two['tokens_per_sec']:,.0f}, "
          f"1 node x 2 processes {m_one['tokens_per_sec']:,.0f} (steps 10-{STEPS - 1}); launch to exit "
          f"{two.seconds:.1f} s vs {one.seconds:.1f} s")


def test_a_killed_node_fails_retryably_stops_node_0_and_the_retry_resumes(nodes, inputs, tmp_path):
    out_dir = tmp_path / "run" / "checkpoints"
    plan = base_train_plan(inputs, tmp_path / "run", two_nodes(f"127.0.0.1:{free_port()}"), num_iterations=30,
                           save_every=5)
    killed: list[int] = []

    def kill_node_1_after_a_checkpoint(progress: dict) -> None:   # called by node 0's stream, once per step
        if killed or not list(out_dir.glob("meta_*.json")):
            return
        for pid in processes_of(out_dir):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"torch.distributed.run" in cmdline and b"--node_rank=1" in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    first = launch_across_nodes(plan, log_path=tmp_path / "run" / "stage.log",
                                on_progress=kill_node_1_after_a_checkpoint, timeout_seconds=600)
    assert killed, "node 1 never ran after a checkpoint"
    assert processes_of(out_dir) == [], "a node outlived the failure"
    failure = failure_from(first, "base_train")
    print(f"\n{str(failure).splitlines()[0]}")
    assert failure.retryable and failure.kind == "killed", str(failure)
    assert "node 1 (flow run base_train-node-1) failed first" in str(failure).splitlines()[0]
    assert node_runs(nodes, out_dir)["base_train-node-1"].name == "Failed"
    # the newest step every rank finished saving (node 1's orphaned worker may have died mid-save)
    checkpoint = max(step for step in map(int, re.findall(r"meta_(\d+)\.json", " ".join(os.listdir(out_dir))))
                     if all((out_dir / f"optim_{step:06d}_rank{rank}.pt").is_file() for rank in (0, 1)))

    # the task's retry: the same call with the same plan, resuming from the checkpoint
    lines: list[str] = []
    second = launch_across_nodes(plan, log_path=tmp_path / "run" / "stage.log", on_line=lines.append,
                                 timeout_seconds=600)
    assert second.returncode == 0, "\n".join(second.tail)
    assert f"Resuming from step {checkpoint}" in "\n".join(lines)
    assert json.loads((out_dir / "metrics.json").read_text())["world_size"] == 2
    assert processes_of(out_dir) == []


def test_a_node_no_worker_starts_fails_the_stage_and_stops_the_nodes_that_did(nodes, inputs, tmp_path):
    """Three nodes, but nothing serves work queue node-2: after the start timeout node 0 is stopped, node 1's
    run (waiting at the rendezvous) is cancelled and its worker kills it, and the failure names the queue."""
    out_dir = tmp_path / "run" / "checkpoints"
    resources = Resources(nproc_per_node=1, nnodes=3, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          env={"OMP_NUM_THREADS": "1"})
    plan = base_train_plan(inputs, tmp_path / "run", resources, total_batch_size=768)
    result = launch_across_nodes(plan, log_path=tmp_path / "run" / "stage.log", start_timeout_seconds=20,
                                 timeout_seconds=600)
    failure = failure_from(result, "base_train")
    print(f"\n{str(failure).splitlines()[0]}")
    assert not failure.retryable and "node 2 never started" in str(failure) and "--work-queue node-2" in str(failure)
    assert processes_of(out_dir) == [], "a node outlived the failure"
    runs = {name: state.name for name, state in node_runs(nodes, out_dir).items()}
    assert runs == {"base_train-node-1": "Cancelled", "base_train-node-2": "Cancelled"}, runs


IDLE_POOL = "nanopipe-nodes-idle"   # a pool no worker serves: node 1's queue there is never polled


@pytest.fixture(scope="module")
def idle_deployment(nodes):
    """A node-agent deployment on a pool without any worker: node 1 of a stage started through it never starts."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from flows.multinode import node_agent
    with SyncPrefectClient(nodes.api_url) as client:
        client.create_work_pool(WorkPoolCreate(name=IDLE_POOL, type="process"), overwrite=True)
        flow_id = client.create_flow(node_agent)
        deployment_id = client.create_deployment(flow_id, "idle", work_pool_name=IDLE_POOL,
                                                 entrypoint="flows/multinode.py:node_agent",
                                                 path=str(Path(__file__).resolve().parents[1]))
    yield f"{node_agent.name}/idle"
    # the server is shared with other modules (which check what prefect.yaml deployed): leave nothing behind
    with SyncPrefectClient(nodes.api_url) as client:
        client.delete_deployment(deployment_id)
        client.delete_work_pool(IDLE_POOL)


def test_without_the_node_agent_deployment_the_stage_fails_at_once_and_is_not_retried(nodes, inputs, tmp_path,
                                                                                      monkeypatch):
    """A server where nothing was deployed (a temporary one, say): the stage task fails before anything
    starts, with the sentence that says what to deploy, not retried; not the supervisor thread's join error."""
    import flows.multinode as multinode
    from flows.launcher import StageFailed
    from flows.stage_task import run_stage
    from prefect import flow
    monkeypatch.setattr(multinode, "NODE_AGENT_DEPLOYMENT", "node-agent/absent")
    checks: list[str] = []
    check = multinode.check_deployment
    monkeypatch.setattr(multinode, "check_deployment", lambda *a: (checks.append(a[0].stage), check(*a))[1])
    started: list[str] = []   # "at once": neither a remote node nor node 0 was started (nothing to wait for)
    start_remotes, launch = multinode._start_remotes, multinode.launch
    monkeypatch.setattr(multinode, "_start_remotes", lambda *a: (started.append("remotes"), start_remotes(*a))[1])
    monkeypatch.setattr(multinode, "launch", lambda *a, **kw: (started.append("node 0"), launch(*a, **kw))[1])
    out_dir = tmp_path / "run" / "checkpoints"
    plan = base_train_plan(inputs, tmp_path / "run", two_nodes(f"127.0.0.1:{free_port()}"))

    @flow
    def one_stage():   # in a flow run, as the pipeline calls it (a task alone has no flow run to log to)
        return run_stage.with_options(retries=2, retry_delay_seconds=0)(plan)

    with pytest.raises(StageFailed) as failed:
        one_stage()
    print(f"\n{failed.value}")
    assert str(failed.value).startswith("multi-node stage base_train needs the node-agent deployment on this "
                                        "Prefect server (")
    assert "none found" in str(failed.value) and "prefect --no-prompt deploy --name node-agent" in str(failed.value)
    assert (failed.value.kind, failed.value.retryable) == ("config", False)
    assert checks == ["base_train"], "a setup error was retried"
    assert "cannot join thread" not in str(failed.value) and not isinstance(failed.value.__context__, RuntimeError)
    assert started == []
    assert processes_of(out_dir) == [] and node_runs(nodes, out_dir) == {}


def test_a_supervisor_that_never_started_stops_without_error(tmp_path):
    """The old cause of "cannot join thread before it is started": stopping a supervisor whose thread was
    never started (the remotes failed to start) must let the real error through."""
    from flows.node_watch import Supervisor
    supervisor = Supervisor([], "id", ["true"], tmp_path / "stage.log", 300, 2, NODE_POOL)
    supervisor.stop()
    supervisor.stop()


GIVE_UP = 12   # seconds: the start timeout, or node 0's stage timeout, after which node 0 gives up on node 1


@pytest.mark.parametrize("gives_up", ["start timeout", "node 0 timeout"])
def test_node_0_says_what_it_waits_for_and_why_it_gave_up(nodes, idle_deployment, inputs, tmp_path, monkeypatch,
                                                           gives_up):
    """Node 1's run waits on a queue no worker polls: node 0 says so (and how to start the worker) every
    WAIT_REPORT_SECONDS in its log and stage.log, and when it gives up (the start timeout, or node 0's own
    timeout) the failure names node 1, its run's state and the queue; nothing stays running or scheduled."""
    import flows.node_watch as node_watch
    monkeypatch.setattr(node_watch, "WAIT_REPORT_SECONDS", 1.0)
    out_dir = tmp_path / "run" / "checkpoints"
    plan = base_train_plan(inputs, tmp_path / "run", two_nodes(f"127.0.0.1:{free_port()}"))
    # the limit that gives up: long enough for a report (every second here) on a loaded machine, no longer
    limits = ({"start_timeout_seconds": GIVE_UP, "timeout_seconds": 900} if gives_up == "start timeout" else
              {"start_timeout_seconds": 900, "timeout_seconds": GIVE_UP})
    lines: list[str] = []
    started = time.monotonic()
    result = launch_across_nodes(plan, log_path=tmp_path / "run" / "stage.log", on_line=lines.append,
                                 deployment=idle_deployment, pool=IDLE_POOL, **limits)
    seconds = time.monotonic() - started
    waiting = [line for line in lines if line.startswith("waiting for node 1 of 2")]
    print(f"\n{waiting[0] if waiting else lines}\n{len(waiting)} waiting line(s) in {seconds:.0f} s")
    assert waiting, lines
    assert "its node-agent run base_train-node-1 is" in waiting[0]
    assert f"on queue node-1 of pool {IDLE_POOL}, which no worker has polled" in waiting[0]
    assert f"prefect worker start --pool {IDLE_POOL} --work-queue node-1" in waiting[0]
    assert "waiting for node 1 of 2" in (tmp_path / "run" / "stage.log").read_text()

    failure = failure_from(result, "base_train")
    first = str(failure).splitlines()[0]
    print(first)
    assert not failure.retryable, first
    assert re.search(r"node 1 never started: its node-agent run base_train-node-1 is (Scheduled|Late) on queue "
                     rf"node-1 of pool {IDLE_POOL}", first), first
    assert (f"(the start timeout of {GIVE_UP} s)" if gives_up == "start timeout" else
            f"(node 0's stage timeout of {GIVE_UP} s)") in first, first
    assert processes_of(out_dir) == [], "node 0 outlived the failure"
    assert {name: state.name for name, state in node_runs(nodes, out_dir).items()} == \
        {"base_train-node-1": "Cancelled"}


class Interrupted(Exception):
    pass


def test_an_exception_in_the_caller_stops_every_node(nodes, inputs, tmp_path):
    """What Prefect's termination signal (a cancelled pipeline run) does inside the task: node 0's tree is
    killed on the way out and node 1's run is cancelled, its worker killing its torchrun."""
    out_dir = tmp_path / "run" / "checkpoints"
    plan = base_train_plan(inputs, tmp_path / "run", two_nodes(f"127.0.0.1:{free_port()}"), num_iterations=1000)

    def interrupt_at_step_2(progress: dict) -> None:
        if progress.get("step") == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        launch_across_nodes(plan, log_path=tmp_path / "run" / "stage.log", on_progress=interrupt_at_step_2,
                            timeout_seconds=600)
    assert processes_of(out_dir) == [], "a node outlived the interruption"
    assert {name: state.name for name, state in node_runs(nodes, out_dir).items()} == {"base_train-node-1": "Cancelled"}


def _run_stage_goes_multinode() -> bool:
    import inspect
    from flows import stage_task
    return "launch_across_nodes" in inspect.getsource(stage_task)


def two_node_base_train(num_iterations: int, **resources) -> dict:
    """A pipeline that stops after base_train, trained on two nodes of one process each (checkpoint every 5 steps)."""
    from tests.test_flows_server_support import TINY
    return {**TINY, "stop_after": "base_train",
            "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64, "device_batch_size": 4,
                           "total_batch_size": 512, "num_iterations": num_iterations, "eval_every": None,
                           "eval_tokens": 512, "save_every": 5},
            "stage_resources": {"base_train": {"nproc_per_node": 1, "nnodes": 2,
                                               "rdzv_endpoint": f"127.0.0.1:{free_port()}", "retries": 1,
                                               "retry_delay_seconds": 0, "env": {"OMP_NUM_THREADS": "1"},
                                               **resources}}}


@pytest.mark.skipif(not _run_stage_goes_multinode(),
                    reason="run_stage does not launch multi-node stages through flows.multinode yet")
def test_the_pipeline_runs_base_train_on_two_nodes_and_its_retry_resumes_after_a_killed_node(nodes, home):
    """The whole path: full_pipeline -> run_stage -> launch_across_nodes; node 1 SIGKILLed after a checkpoint,
    Prefect's retry of the task resumes both nodes from it, and the artifact completes with both nodes' logs."""
    from flows.artifacts import read_manifest, verify
    from flows.config import PipelineConfig
    from flows.pipeline import full_pipeline
    from flows.plan import plan_pipeline
    config = two_node_base_train(num_iterations=30)
    plan = next(p for p in plan_pipeline(PipelineConfig.model_validate(config), home=home) if p.stage == "base_train")
    out_dir = Path(plan.out_dir)
    killed: list[int] = []

    def kill_node_1_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 400
        while not killed and time.monotonic() < deadline:
            if list(out_dir.glob("meta_*.json")):
                for pid in processes_of(out_dir):
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"torch.distributed.run" in cmdline and b"--node_rank=1" in cmdline:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_node_1_after_a_checkpoint, daemon=True)
    killer.start()
    state = full_pipeline(config, return_state=True)
    killer.join(timeout=10)
    assert killed, "node 1 never ran after a checkpoint"
    assert state.is_completed(), state.message
    manifest = read_manifest(plan.artifact_dir)
    assert manifest["timings"]["attempt"] == 2 and manifest["timings"]["resumed_from"] is not None
    assert "--node_rank=0" in manifest["command"] and "stage.node1.log" in manifest["files"]
    assert verify(plan.artifact_dir, plan.hash)
    assert processes_of(out_dir) == []


@pytest.mark.skipif(not _run_stage_goes_multinode(),
                    reason="run_stage does not launch multi-node stages through flows.multinode yet")
def test_a_two_node_base_train_whose_node_1_is_lost_retries_on_node_0_alone(nodes, home):
    """resources.min_nnodes=1: node 1 is lost after a checkpoint (its worker and its torchrun killed), so no
    worker polls queue node-1 any more; Prefect's retry of the task runs base_train on node 0 alone
    (standalone, 1 process), resumes the 2-rank checkpoint re-sharded and completes; the manifest's segments
    say 2 processes then 1. Node 1's worker is started again for the tests after this one."""
    from flows.artifacts import read_manifest, verify
    from flows.config import PipelineConfig
    from flows.pipeline import full_pipeline
    from flows.plan import plan_pipeline
    # 25 steps, not 30: the regression gate compares only runs of one config, and this run, which finishes on
    # one node (other rows per step), is not the 2-node run above
    config = two_node_base_train(num_iterations=25, min_nnodes=1)
    plan = next(p for p in plan_pipeline(PipelineConfig.model_validate(config), home=home) if p.stage == "base_train")
    out_dir = Path(plan.out_dir)
    lost: list[int] = []

    def lose_node_1_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while not lost and time.monotonic() < deadline:
            node_1 = [pid for pid in processes_of(out_dir) if b"--node_rank=1" in
                      Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            if list(out_dir.glob("meta_*.json")) and node_1:
                worker = WORKERS[1]
                os.killpg(worker.pid, signal.SIGKILL)
                for pid in node_1:
                    os.kill(pid, signal.SIGKILL)
                worker.wait()
                nodes.processes.remove(worker)
                lost.append(worker.pid)
            time.sleep(0.05)

    killer = threading.Thread(target=lose_node_1_after_a_checkpoint, daemon=True)
    killer.start()
    try:
        state = full_pipeline(config, return_state=True)
    finally:
        killer.join(timeout=10)
        if lost:
            WORKERS[1] = start_worker(nodes, 1)
    assert lost, "node 1 never ran after a checkpoint"
    assert state.is_completed(), state.message
    manifest = read_manifest(plan.artifact_dir)
    resumed_from = manifest["timings"]["resumed_from"]
    assert manifest["timings"]["attempt"] == 2 and resumed_from is not None
    assert "--standalone" in manifest["command"] and "--nproc_per_node=1" in manifest["command"]
    assert json.loads((out_dir / "metrics.json").read_text())["world_size"] == 1
    assert f"resuming step {resumed_from} written by 2 ranks on 1 rank" in (Path(plan.artifact_dir) /
                                                                           "stage.log").read_text()
    assert manifest["segments"] == [{"from_step": 0, "to_step": resumed_from, "world_size": 2},
                                    {"from_step": resumed_from, "to_step": 25, "world_size": 1}]
    assert verify(plan.artifact_dir, plan.hash)
    assert processes_of(out_dir) == []
