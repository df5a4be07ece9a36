"""
Multi-node stages started through Prefect: nobody logs in on the other nodes.

A stage with `resources.nnodes > 1` runs one torchrun agent per node. Node 0 is the stage task itself (the
usual `launch`, whose log and progress the run shows); every other node k runs the `node-agent` flow,
started with `run_deployment(..., work_queue_name="node-k")` on the `nanopipe-nodes` pool, whose queue
`node-k` is served by exactly one process worker on that node:

    prefect work-pool create nanopipe-nodes --type process                           # once per server
    prefect worker start --pool nanopipe-nodes --work-queue node-1                   # on node 1
    result = launch_across_nodes(plan, log_path=artifact_dir / "stage.log", on_line=logger.info)

The nodes meet at a static rendezvous on node 0 (`resources.rdzv_endpoint`, or node 0's host name and a free
port): with `--rdzv_backend=static` torchrun honours `--node_rank`, so global rank 0 (the rank that prints
and reports progress) is always on node 0. (c10d rendezvous ignores `--node_rank` and orders nodes by host
name and pid.) Every node runs the same stage command against the same paths: NANOPIPE_HOME must be one
shared filesystem mounted at the same path on every node, since each rank writes its optimizer shard to
the stage's checkpoint directory and a resume reads them all.

Any node's failure is handled like a local one (flows/node_watch.py watches the other nodes): the others are
stopped (node 0's processes killed, the agents' flow runs cancelled, which makes their workers kill their
torchrun trees), and the result is the failing node's, so `failure_from` classifies it as usual and a
retryable failure resumes from the last checkpoint on the task's next attempt. When node 0 fails on a broken
collective, the node whose own failure caused it (killed, out of memory, ...) is the one reported.

Until every node has joined the rendezvous, node 0 says every WAIT_REPORT_SECONDS (in the run's log and in
stage.log) what it waits for: which node, its run's state, and whether any worker polls that node's queue.
When it gives up (the start timeout, or node 0's own timeout before the others joined), the failure names
the node that never started and its run's state. Without a node-agent deployment on the server (a temporary
server, or nothing deployed) the stage fails at once, not retried, before anything starts.

A retry with `resources.min_nnodes` below `nnodes` (`retry_layout`) runs on the nodes that are there: node 0
and each node whose worker polls its queue; node ranks are renumbered over them, so node rank r may run on
node k's queue (`launch_across_nodes(nodes=...)`), and one node left runs standalone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable

from prefect import flow, get_client, get_run_logger
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Failed

from flows.launcher import LaunchResult, StageFailed, check_stage_env, classify, failure_from, launch
from flows.node_watch import (NODE_MARK, RESULT_MARK, Remote, Supervisor, live_nodes, node_queue, node_wait,
                              stop_remotes, wait_remotes)
from flows.plan import StagePlan
from flows.stages import get_stage
from flows.world import retry_nodes_plan, retry_plan

NODE_AGENT_DEPLOYMENT = "node-agent/node-agent"
NODE_POOL = "nanopipe-nodes"
NODE0_WAITED_SECONDS = 60.0  # a node 0 that failed sooner than this, before anyone joined, failed by itself


def node_command(plan: StagePlan, node_rank: int) -> list[str]:
    """The torchrun command of one node: static rendezvous at node 0, this node's rank."""
    res = plan.resources
    assert res.rdzv_endpoint, f"{plan.stage}: a multi-node command needs an endpoint, got {res.rdzv_endpoint!r}"
    assert 0 <= node_rank < res.nnodes, f"node_rank={node_rank} outside 0..{res.nnodes - 1}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={res.nproc_per_node}",
            f"--nnodes={res.nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=static",
            f"--rdzv_endpoint={res.rdzv_endpoint}", "-m", plan.module, "--", *plan.args]


def node_log(plan: StagePlan, node_rank: int) -> Path:
    """Where node `node_rank` (1..) writes its stage log: beside node 0's stage.log on a shared filesystem."""
    return Path(plan.artifact_dir) / f"stage.node{node_rank}.log"


def with_endpoint(plan: StagePlan) -> StagePlan:
    """The plan with its rendezvous endpoint decided: the configured one, or node 0's (this) host and a free
    port. Node 0 is this process's machine, so the port is checked free where it will be bound."""
    if plan.resources.rdzv_endpoint:
        return plan
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    resources = plan.resources.model_copy(update={"rdzv_endpoint": f"{socket.getfqdn()}:{port}"})
    return plan.model_copy(update={"resources": resources})


# -----------------------------------------------------------------------------
# The node agent: one torchrun agent on the node whose worker picked the flow run up

def _agent_summary(result: LaunchResult) -> str:
    return RESULT_MARK + json.dumps({"returncode": result.returncode, "timed_out": result.timed_out,
                                     "oom_killed": result.oom_killed, "seconds": round(result.seconds, 3)})


@flow(name="node-agent", flow_run_name="{plan.stage}-node-{node_rank}", persist_result=False, retries=0)
def node_agent(plan: StagePlan, node_rank: int):
    """Run node `node_rank` of a multi-node stage here; the task on node 0 started this run and watches it.

    Its lines go to this run's log and to `stage.node{rank}.log` in the artifact directory. The final state
    carries the launch's outcome: Completed, or Failed with the classified reason, the last lines and a
    machine-readable result line for the supervisor."""
    logger = get_run_logger()
    stage = get_stage(plan.stage)
    if (plan.module, plan.distributed) != (stage.module, True) or node_rank < 1:
        # this deployment runs known distributed stages only, never an arbitrary module
        raise ValueError(f"node-agent runs node 1.. of a distributed stage; got module {plan.module!r} for stage "
                         f"{plan.stage!r} (expects {stage.module!r}, distributed={stage.distributed}), "
                         f"node_rank={node_rank}")
    cmd = node_command(plan, node_rank)
    logger.info(f"{plan.stage} node {node_rank}/{plan.resources.nnodes} on {socket.gethostname()}: {' '.join(cmd)}")
    timeout = plan.resources.timeout_minutes * 60 if plan.resources.timeout_minutes else None
    result = launch(cmd, log_path=node_log(plan, node_rank),
                    env=check_stage_env(dict(plan.resources.env)), on_line=logger.info, timeout_seconds=timeout)
    if result.returncode == 0 and not result.timed_out:
        return Completed(message=f"{plan.stage} node {node_rank}: exit code 0 after {result.seconds:.1f} s")
    failure = failure_from(result, f"{plan.stage} (node {node_rank})")
    return Failed(message=f"{failure}\n{_agent_summary(result)}")


# -----------------------------------------------------------------------------
# The supervisor, in the stage task on node 0


def retry_layout(plan: StagePlan, pool: str = NODE_POOL,
                 wait_seconds: float = 20.0) -> tuple[StagePlan, list[int] | None, str | None]:
    """The plan of a training stage's retry, the node that runs each node rank (None: node k runs rank k) and
    the line saying what was chosen (None: nothing to choose). With resources.min_nnodes below nnodes the
    retry runs on the nodes whose worker still polls its queue (flows/world.py), else on as many processes
    per node as node 0 can run now (`retry_plan`)."""
    res = plan.resources
    if not plan.resume_flag or not plan.distributed or (res.min_nnodes or res.nnodes) >= res.nnodes:
        plan, line = retry_plan(plan)
        return plan, None, line
    return retry_nodes_plan(plan, live_nodes(res.nnodes, pool, wait_seconds))


def no_deployment(plan: StagePlan, deployment: str, pool: str) -> StageFailed:
    """The failure of a multi-node stage on a server without the node-agent deployment: a setup error that no
    retry fixes (a temporary server never has it)."""
    return StageFailed(f"multi-node stage {plan.stage} needs the node-agent deployment on this Prefect server "
                       f"(prefect work-pool create {pool} --type process, then from the repository root: prefect "
                       f"--no-prompt deploy --name node-agent; see deployments/multinode.md); none found (looked "
                       f"for {deployment}) [config, not retried]", kind="config", retryable=False)


def check_deployment(plan: StagePlan, deployment: str, pool: str) -> None:
    """Fail at once, before any node starts, when the server has no `deployment` to start nodes 1.. with."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise no_deployment(plan, deployment, pool) from None


def _start_remotes(plan: StagePlan, deployment: str, pool: str, remotes: list[Remote], nodes: list[int]) -> None:
    """One node-agent run per node rank 1.., each on the queue of node `nodes[rank]`; appended to `remotes` as
    they start, so that a failure halfway leaves nothing the caller cannot cancel."""
    for node_rank in range(1, plan.resources.nnodes):
        queue = node_queue(nodes[node_rank])
        try:
            run = run_deployment(deployment, parameters={"plan": plan.model_dump(mode="json"), "node_rank": node_rank},
                                 timeout=0, work_queue_name=queue,
                                 flow_run_name=f"{plan.stage}-node-{node_rank}",
                                 tags=["nanopipe", "node-agent", f"stage:{plan.stage}", f"node:{node_rank}"])
        except ObjectNotFound:   # deleted since check_deployment
            raise no_deployment(plan, deployment, pool) from None
        remotes.append(Remote(node_rank, str(run.id), run.name, node_log(plan, node_rank), run.state, queue))


def _root_failure(node0: LaunchResult, remote: LaunchResult | None) -> LaunchResult:
    """Which failure to report when node 0 failed by itself and a remote failed too: node 0's broken
    collective or timeout is usually the echo of the remote's own failure (a killed node, out of memory)."""
    if remote is None:
        return node0
    return remote if classify(node0)[0] in ("network", "killed", "timeout") else node0


def _node0_failed(supervisor: Supervisor, node0: LaunchResult, stop_seconds: float,
                  timeout_seconds: float | None) -> LaunchResult:
    """The failure to report when node 0 ended by itself (its timeout, its own torchrun's error). Before every
    node joined, a node 0 that waited long (its timeout, the static rendezvous' own timeout) was waiting for
    the others: the node that never started, and its run's state, is the real reason."""
    if not supervisor.joined.is_set() and (node0.timed_out or node0.seconds >= NODE0_WAITED_SECONDS):
        gave_up = (f"node 0's stage timeout of {timeout_seconds:.0f} s" if node0.timed_out and timeout_seconds else
                   f"node 0's own torchrun: {classify(node0)[2]}")
        try:
            with get_client(sync_client=True) as client:
                supervisor.refresh(client)
                never = supervisor.gave_up(client, gave_up)
                waiting = [] if never else supervisor.waiting_for()
                notes = [f"node {r.node_rank}: {node_wait(client, r, supervisor.pool, supervisor.endpoint)}"
                         for r in waiting]
        except Exception:   # the API is gone: node 0's own failure is all there is to say
            never, notes = None, []
        if never is not None:
            return never
        if notes:   # every node started, but the rendezvous never completed
            node0.fails_with(f"the rendezvous at {supervisor.endpoint} never completed, {gave_up}: "
                             f"{'; '.join(notes)}")
    return _root_failure(node0, wait_remotes(supervisor, min(stop_seconds, 30.0)))


def launch_across_nodes(plan: StagePlan, *, log_path: str | os.PathLike, on_line: Callable[[str], None] | None = None,
                        on_progress: Callable[[dict], None] | None = None, timeout_seconds: float | None = None,
                        deployment: str | None = None, pool: str = NODE_POOL,
                        start_timeout_seconds: float = 300.0, stop_seconds: float = 120.0,
                        poll_seconds: float = 2.0, nodes: list[int] | None = None) -> LaunchResult:
    """Run a `resources.nnodes > 1` stage: nodes 1.. through the node-agent deployment, node 0 here.

    Same contract as `launch`: node 0's lines go to `log_path` and `on_line`, its progress to `on_progress`;
    the returned LaunchResult is the failing node's when one failed (so `failure_from` says which node and
    why), node 0's otherwise. Until every node joined, a line every WAIT_REPORT_SECONDS goes to `on_line` and
    `log_path` saying what node 0 waits for. Without the deployment (default NODE_AGENT_DEPLOYMENT) on the
    server, a StageFailed (config, not retried) is raised before anything starts. Nothing is left running on
    return, on failure or on the caller's exception (Prefect's termination signal): node 0's tree is killed
    and every remote run is cancelled and waited for.
    """
    deployment = deployment or NODE_AGENT_DEPLOYMENT
    nodes = nodes or list(range(plan.resources.nnodes))
    assert len(nodes) == plan.resources.nnodes and nodes[0] == 0, f"nodes {nodes} for nnodes={plan.resources.nnodes}"
    plan = with_endpoint(plan)
    log_path = Path(log_path)
    cmd = node_command(plan, 0)
    check_deployment(plan, deployment, pool)
    node0_id = uuid.uuid4().hex
    remotes: list[Remote] = []
    supervisor = Supervisor(remotes, node0_id, cmd, log_path, start_timeout_seconds, poll_seconds, pool,
                             nnodes=plan.resources.nnodes, endpoint=plan.resources.rdzv_endpoint,
                             on_wait=on_line)

    def node0_line(line: str) -> None:
        supervisor.saw_line(line)
        if on_line is not None:
            on_line(line)

    def node0_progress(progress: dict) -> None:
        supervisor.joined.set()
        if on_progress is not None:
            on_progress(progress)

    try:
        _start_remotes(plan, deployment, pool, remotes, nodes)
        supervisor.start()
        node0 = launch(cmd, log_path=log_path, env={**plan.resources.env, NODE_MARK: node0_id}, on_line=node0_line,
                       on_progress=node0_progress, timeout_seconds=timeout_seconds)
        supervisor.stop()
        if supervisor.failure is not None:   # a remote failed first (or never started): node 0 was stopped for it
            result = supervisor.failure
        elif node0.returncode == 0 and not node0.timed_out:   # node 0 done: the others end too
            supervisor.joined.set()
            result = wait_remotes(supervisor, stop_seconds) or node0
        else:   # node 0 failed by itself: give the remotes' own failures time to reach the server
            result = _node0_failed(supervisor, node0, stop_seconds, timeout_seconds)
    finally:
        supervisor.stop()
        notes = stop_remotes(remotes, f"{plan.stage}: stopped by node 0", stop_seconds, poll_seconds)
    # node 0's log says which node failed first, and names any node run that would not stop
    written = ([result.tail[-1]] if result is not node0 else []) + notes
    if written:
        with open(log_path, "a", encoding="utf-8") as log:
            log.writelines(f"# {line}\n" for line in written)
    if result is not node0:
        result.last_progress = node0.last_progress
    result.tail.extend(notes)
    return result
