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

Any node's failure is handled like a local one: the others are stopped (node 0's processes killed, the
agents' flow runs cancelled, which makes their workers kill their torchrun trees), and the result is the
failing node's, so `failure_from` classifies it as usual and a retryable failure resumes from the last
checkpoint on the task's next attempt. When node 0 fails on a broken collective, the node whose own failure
caused it (killed, out of memory, ...) is the one reported.

Until every node has joined the rendezvous, node 0 says every WAIT_REPORT_SECONDS (in the run's log and in
stage.log) what it waits for: which node, its run's state, and whether any worker polls that node's queue.
When it gives up (the start timeout, or node 0's own timeout before the others joined), the failure names
the node that never started and its run's state. Without a node-agent deployment on the server (a temporary
server, or nothing deployed) the stage fails at once, not retried, before anything starts.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Completed, Failed

from flows.launcher import (LaunchResult, StageFailed, check_stage_env, classify, failure_from, launch, pids_with_env,
                            stage_reason)
from flows.plan import StagePlan
from flows.stages import get_stage

NODE_AGENT_DEPLOYMENT = "node-agent/node-agent"
NODE_POOL = "nanopipe-nodes"
NODE_MARK = "NANOPIPE_NODE0_ID"   # marks node 0's processes, so a remote failure can stop them
RESULT_MARK = "@@nanopipe-node-result "
WAIT_REPORT_SECONDS = 30.0   # how often node 0 says what it waits for, until every node has joined
NODE0_WAITED_SECONDS = 60.0  # a node 0 that failed sooner than this, before anyone joined, failed by itself
QUEUE_GONE_SECONDS = 90.0    # a queue polled longer ago than this has lost its worker (workers poll every ~10 s)
# torchrun's own chatter before its rendezvous completes: its agent's log lines, c10d warnings, banners.
# Anything else on node 0's output comes from a worker process, which a static rendezvous starts only once
# every node has joined.
_AGENT_LINE = re.compile(r"^(\[?[DIWEF]\d{4} |\*{5})|torch[./]distributed")


def node_queue(node_rank: int) -> str:
    """The work queue of the node agent for `node_rank`: one worker on that node serves it alone."""
    return f"node-{node_rank}"


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

@dataclass
class _Remote:
    node_rank: int
    flow_run_id: str
    name: str
    log_path: Path         # the node's own stage log, on that node
    state: object = None   # the last state read from the API


def _remote_result(remote: _Remote, cmd: list[str], log_path: Path, started: float) -> LaunchResult:
    """A remote node's outcome as the LaunchResult `classify` reads: the agent's own result when it
    reported one, else a crashed or cancelled agent counts as a killed node (a retry can fix it)."""
    state = remote.state
    message = state.message or ""
    where = f"node {remote.node_rank} (flow run {remote.name})"
    if RESULT_MARK in message:
        text, _, summary = message.rpartition(RESULT_MARK)
        facts = json.loads(summary)
        lines = text.split("--- last lines ---\n", 1)[-1].splitlines()
        said = stage_reason(lines)
        # the last line is what the failure's first line quotes: which node, and the stage's own words there
        note = (f"{where} failed first{': ' + said if said else ''}; the other nodes were stopped (its log: "
                f"{remote.log_path} on that node)")
        return LaunchResult(cmd, facts["returncode"], time.monotonic() - started, facts["timed_out"],
                            lines, log_path, oom_killed=facts["oom_killed"]).fails_with(note)
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    return LaunchResult(cmd, -signal.SIGKILL, time.monotonic() - started, False, [],
                        log_path).fails_with(f"{where} ended {state.name} without a result: {first}")


def _started(state) -> bool:
    """Has a node's agent run started (or ended)? Scheduled (Late too) or Pending: not yet."""
    return state is not None and not (state.is_scheduled() or state.is_pending())


def _queue_note(client, remote: _Remote, pool: str) -> str:
    """What Prefect knows of the queue a node's run waits on: whether any worker polls it, and how to start one."""
    queue_name = node_queue(remote.node_rank)
    start = f"start one with: prefect worker start --pool {pool} --work-queue {queue_name}"
    try:
        queue = client.read_work_queue_by_name(queue_name, work_pool_name=pool)
    except ObjectNotFound:
        return f"which does not exist and no worker has polled ({start})"
    except Exception as err:   # the diagnosis is a courtesy: never let it break the waiting
        return f"whose workers could not be read ({type(err).__name__}; if none polls it, {start})"
    if queue.is_paused:
        return f"which is paused (resume it: prefect work-queue resume {queue_name} --pool {pool})"
    if queue.last_polled is None:
        return f"which no worker has polled ({start})"
    age = max(0.0, time.time() - queue.last_polled.timestamp())
    if age > QUEUE_GONE_SECONDS:
        return f"whose worker last polled it {age:.0f} s ago and seems gone ({start})"
    return (f"polled by a worker {age:.0f} s ago that has not taken the run yet (is that worker at its "
            f"concurrency limit, or the pool {pool} paused?)")


def node_wait(client, remote: _Remote, pool: str, endpoint: str | None) -> str:
    """Why node `remote.node_rank` has not joined yet, from its run's state (and its queue, while no worker has
    taken the run): "its node-agent run base_train-node-1 is Scheduled on queue node-1 of pool nanopipe-nodes,
    which no worker has polled (start one with: ...)"."""
    state = remote.state
    run = f"its node-agent run {remote.name}"
    if state is None:
        return f"{run} is not readable on the server yet"
    if state.is_scheduled():
        return (f"{run} is {state.name} on queue {node_queue(remote.node_rank)} of pool {pool}, "
                f"{_queue_note(client, remote, pool) if client is not None else 'waiting for a worker'}")
    if state.is_pending():
        return f"{run} is Pending: a worker took it from queue {node_queue(remote.node_rank)} and is starting it"
    if state.is_running():
        return (f"{run} is Running, but its torchrun has not joined the rendezvous at {endpoint} yet (can that "
                f"node reach {endpoint}? its log: {remote.log_path} on that node)")
    return f"{run} is {state.name}"


def _never_started(remote: _Remote, cmd: list[str], log_path: Path, started: float, seconds: float, pool: str,
                   why: str, gave_up: str) -> LaunchResult:
    return LaunchResult(cmd, 1, time.monotonic() - started, False, [], log_path).fails_with(
        f"node {remote.node_rank} never started: {why}; node 0 gave up after {seconds:.0f} s ({gave_up})")


class _Supervisor:
    """Polls the remote nodes' flow runs; on the first failure (or a node that never starts) records it and
    stops node 0's processes, which ends the `launch` running in the caller's thread. Until every node has
    joined the rendezvous it reports, every WAIT_REPORT_SECONDS, what node 0 waits for."""

    def __init__(self, remotes: list[_Remote], node0_id: str, cmd: list[str], log_path: Path,
                 start_timeout_seconds: float, poll_seconds: float, pool: str, nnodes: int = 2,
                 endpoint: str | None = None, on_wait: Callable[[str], None] | None = None):
        self.remotes, self.node0_id, self.cmd, self.log_path = remotes, node0_id, cmd, log_path
        self.start_timeout, self.poll, self.pool = start_timeout_seconds, poll_seconds, pool
        self.nnodes, self.endpoint, self.on_wait = nnodes, endpoint, on_wait
        self.started = time.monotonic()
        self.failure: LaunchResult | None = None
        self.done = threading.Event()
        self.joined = threading.Event()   # node 0 saw a worker's line: every node passed the rendezvous
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._watch,), daemon=True,
                                       name="node-supervisor")

    def refresh(self, client) -> None:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[r.flow_run_id for r in self.remotes])))
        states = {str(run.id): run.state for run in runs}
        for remote in self.remotes:
            remote.state = states.get(remote.flow_run_id, remote.state)

    def waiting_for(self) -> list[_Remote]:
        """The nodes node 0 waits for: those whose run has not started, else (all started) every running one
        while the rendezvous is not complete; none once it is."""
        if self.joined.is_set():
            return []
        unstarted = [r for r in self.remotes if not _started(r.state)]
        return unstarted or [r for r in self.remotes if r.state is not None and r.state.is_running()]

    def wait_line(self, client) -> str | None:
        """One line saying what node 0 waits for, node by node; None when it waits for nothing."""
        waited = time.monotonic() - self.started
        parts = [f"waiting for node {r.node_rank} of {self.nnodes} ({waited:.0f} s so far): "
                 f"{node_wait(client, r, self.pool, self.endpoint)}" for r in self.waiting_for()]
        return "; ".join(parts) or None

    def gave_up(self, client, gave_up: str) -> LaunchResult | None:
        """The failure naming the first node that never started, if one did not, for node 0 giving up."""
        unstarted = [] if self.joined.is_set() else [r for r in self.remotes if not _started(r.state)]
        if not unstarted:
            return None
        remote = unstarted[0]
        waited = time.monotonic() - self.started
        return _never_started(remote, self.cmd, self.log_path, self.started, waited, self.pool,
                              node_wait(client, remote, self.pool, self.endpoint), gave_up)

    def check(self, client=None) -> LaunchResult | None:
        """The failure of a remote node, if one failed (or never started); None otherwise."""
        for remote in self.remotes:
            state = remote.state
            if state is not None and state.is_final() and not state.is_completed():
                return _remote_result(remote, self.cmd, self.log_path, self.started)
        if time.monotonic() - self.started > self.start_timeout:
            return self.gave_up(client, f"the start timeout of {self.start_timeout:.0f} s")
        return None

    def saw_line(self, line: str) -> None:
        """Node 0 printed `line`: a worker's line means every node joined (workers start after the rendezvous)."""
        if not self.joined.is_set() and not _AGENT_LINE.search(line):
            self.joined.set()

    def report(self, line: str) -> None:
        """A waiting line into the run's log (`on_wait`) and node 0's stage log."""
        if self.on_wait is not None:
            self.on_wait(line)
        try:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError:
            pass

    def _watch(self) -> None:
        last_report = self.started
        with get_client(sync_client=True) as client:
            while not self.done.wait(self.poll):
                try:
                    self.refresh(client)
                except Exception as err:   # an API hiccup: node 0 keeps running, the next poll tries again
                    print(f"node supervisor: reading the node runs failed ({err!r}); retrying", file=sys.stderr)
                    continue
                self.failure = self.check(client)
                if self.failure is not None:
                    stop_marked(self.node0_id)
                    return
                if time.monotonic() - last_report >= WAIT_REPORT_SECONDS and not self.joined.is_set():
                    last_report = time.monotonic()
                    try:
                        line = self.wait_line(client)
                    except Exception as err:   # never let the report stop the watch
                        line = f"waiting for the other nodes (could not describe them: {err!r})"
                    if line:
                        self.report(line)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread.ident is not None:   # never started when starting the remotes failed
            self.thread.join(timeout=30)


def stop_marked(node0_id: str) -> None:
    """SIGTERM node 0's processes (torchrun forwards it to its workers); `launch` then reaps the rest."""
    for pid in pids_with_env(NODE_MARK, node0_id):
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


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


def _start_remotes(plan: StagePlan, deployment: str, pool: str, remotes: list[_Remote]) -> None:
    """One node-agent run per node 1.., each on its node's queue; appended to `remotes` as they start, so
    that a failure halfway leaves nothing the caller cannot cancel."""
    for node_rank in range(1, plan.resources.nnodes):
        try:
            run = run_deployment(deployment, parameters={"plan": plan.model_dump(mode="json"), "node_rank": node_rank},
                                 timeout=0, work_queue_name=node_queue(node_rank),
                                 flow_run_name=f"{plan.stage}-node-{node_rank}",
                                 tags=["nanopipe", "node-agent", f"stage:{plan.stage}", f"node:{node_rank}"])
        except ObjectNotFound:   # deleted since check_deployment
            raise no_deployment(plan, deployment, pool) from None
        remotes.append(_Remote(node_rank, str(run.id), run.name, node_log(plan, node_rank), run.state))


def _stop_remotes(remotes: list[_Remote], reason: str, stop_seconds: float, poll_seconds: float) -> list[str]:
    """Cancel every remote run not yet final and wait until they are; returns a note per run that did not
    stop in time. A cancelled run's worker kills its flow process, whose `launch` kills torchrun's tree."""
    if not remotes:
        return []
    try:
        return _cancel_and_wait(remotes, reason, stop_seconds, poll_seconds)
    except Exception as err:   # the API is unreachable: say which runs to cancel by hand, keep the real outcome
        return [f"could not cancel the node runs ({err!r}): prefect flow-run cancel {r.flow_run_id} (node "
                f"{r.node_rank})" for r in remotes]


def _cancel_and_wait(remotes: list[_Remote], reason: str, stop_seconds: float, poll_seconds: float) -> list[str]:
    with get_client(sync_client=True) as client:
        for remote in remotes:
            run = client.read_flow_run(remote.flow_run_id)
            if run.state.is_final():
                continue
            state = Cancelled(message=reason) if run.state.is_scheduled() else Cancelling(message=reason)
            client.set_flow_run_state(remote.flow_run_id, state, force=True)
        deadline = time.monotonic() + stop_seconds
        pending = list(remotes)
        while pending:
            pending = [r for r in pending if not _final(client, r)]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(poll_seconds)
    return [f"node {r.node_rank} (flow run {r.name}) still {r.state.name} {stop_seconds:.0f} s after its cancel"
            for r in pending]


def _final(client, remote: _Remote) -> bool:
    remote.state = client.read_flow_run(remote.flow_run_id).state
    return remote.state.is_final()


def _root_failure(node0: LaunchResult, remote: LaunchResult | None) -> LaunchResult:
    """Which failure to report when node 0 failed by itself and a remote failed too: node 0's broken
    collective or timeout is usually the echo of the remote's own failure (a killed node, out of memory)."""
    if remote is None:
        return node0
    return remote if classify(node0)[0] in ("network", "killed", "timeout") else node0


def _node0_failed(supervisor: _Supervisor, node0: LaunchResult, stop_seconds: float,
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
    return _root_failure(node0, _wait_remotes(supervisor, min(stop_seconds, 30.0)))


def launch_across_nodes(plan: StagePlan, *, log_path: str | os.PathLike, on_line: Callable[[str], None] | None = None,
                        on_progress: Callable[[dict], None] | None = None, timeout_seconds: float | None = None,
                        deployment: str | None = None, pool: str = NODE_POOL,
                        start_timeout_seconds: float = 300.0, stop_seconds: float = 120.0,
                        poll_seconds: float = 2.0) -> LaunchResult:
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
    plan = with_endpoint(plan)
    log_path = Path(log_path)
    cmd = node_command(plan, 0)
    check_deployment(plan, deployment, pool)
    node0_id = uuid.uuid4().hex
    remotes: list[_Remote] = []
    supervisor = _Supervisor(remotes, node0_id, cmd, log_path, start_timeout_seconds, poll_seconds, pool,
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
        _start_remotes(plan, deployment, pool, remotes)
        supervisor.start()
        node0 = launch(cmd, log_path=log_path, env={**plan.resources.env, NODE_MARK: node0_id}, on_line=node0_line,
                       on_progress=node0_progress, timeout_seconds=timeout_seconds)
        supervisor.stop()
        if supervisor.failure is not None:   # a remote failed first (or never started): node 0 was stopped for it
            result = supervisor.failure
        elif node0.returncode == 0 and not node0.timed_out:   # node 0 done: the others end too
            supervisor.joined.set()
            result = _wait_remotes(supervisor, stop_seconds) or node0
        else:   # node 0 failed by itself: give the remotes' own failures time to reach the server
            result = _node0_failed(supervisor, node0, stop_seconds, timeout_seconds)
    finally:
        supervisor.stop()
        notes = _stop_remotes(remotes, f"{plan.stage}: stopped by node 0", stop_seconds, poll_seconds)
    # node 0's log says which node failed first, and names any node run that would not stop
    written = ([result.tail[-1]] if result is not node0 else []) + notes
    if written:
        with open(log_path, "a", encoding="utf-8") as log:
            log.writelines(f"# {line}\n" for line in written)
    if result is not node0:
        result.last_progress = node0.last_progress
    result.tail.extend(notes)
    return result


def _wait_remotes(supervisor: _Supervisor, seconds: float) -> LaunchResult | None:
    """Wait up to `seconds` for every remote run to end; the first failure among them, if any."""
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            supervisor.refresh(client)
            failure = supervisor.check(client)
            if failure is not None or all(r.state.is_final() for r in supervisor.remotes):
                return failure
            if time.monotonic() > deadline:
                return None
            time.sleep(supervisor.poll)
