"""
Node 0's watch over the other nodes of a multi-node stage (flows/multinode.py starts them): their node-agent
runs' states, what node 0 waits for while they start, the first failure among them, and stopping them.

The supervisor runs in a thread beside node 0's `launch`: it polls the remote runs, and on the first failure
(or a node that never starts) records it and stops node 0's processes, which ends that `launch`. Until every
node has joined the rendezvous it says, every WAIT_REPORT_SECONDS, which node node 0 waits for and why: its
run's state and, while no worker has taken the run, whether any worker polls that node's work queue.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling

from flows.launcher import LaunchResult, pids_with_env, stage_reason

NODE_MARK = "NANOPIPE_NODE0_ID"   # marks node 0's processes, so a remote failure can stop them
RESULT_MARK = "@@nanopipe-node-result "
WAIT_REPORT_SECONDS = 30.0   # how often node 0 says what it waits for, until every node has joined
QUEUE_GONE_SECONDS = 90.0    # a queue polled longer ago than this has lost its worker (workers poll every ~10 s)
# torchrun's own chatter before its rendezvous completes: its agent's log lines, c10d warnings, banners.
# Anything else on node 0's output comes from a worker process, which a static rendezvous starts only once
# every node has joined.
_AGENT_LINE = re.compile(r"^(\[?[DIWEF]\d{4} |\*{5})|torch[./]distributed")


def node_queue(node: int) -> str:
    """The work queue of the node agent for node `node`: one worker on that node serves it alone. (A retry on
    fewer nodes may run node rank r on another node than node r: flows/world.py.)"""
    return f"node-{node}"



@dataclass
class Remote:
    node_rank: int
    flow_run_id: str
    name: str
    log_path: Path         # the node's own stage log, on that node
    state: object = None   # the last state read from the API
    queue: str = ""        # the work queue its run waits on; "" for node_queue(node_rank)

    def __post_init__(self):
        self.queue = self.queue or node_queue(self.node_rank)


def _remote_result(remote: Remote, cmd: list[str], log_path: Path, started: float) -> LaunchResult:
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


def _queue_note(client, remote: Remote, pool: str) -> str:
    """What Prefect knows of the queue a node's run waits on: whether any worker polls it, and how to start one."""
    queue_name = remote.queue
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


def live_nodes(nnodes: int, pool: str, wait_seconds: float = 20.0, poll_seconds: float = 1.0) -> list[int]:
    """The nodes that are there for a retry: node 0 (this machine) and each node 1.. whose worker polls its
    work queue within `wait_seconds` of this call (a worker polls every ~10 s; a lost node's worker no longer
    does). Polls are told by the queue's last_polled advancing, so no clock is compared with the server's; a
    paused queue, or one that does not exist, counts as gone. Returns early once every node has polled."""
    queues = {node: node_queue(node) for node in range(1, nnodes)}
    with get_client(sync_client=True) as client:
        first = {node: _last_polled(client, queue, pool) for node, queue in queues.items()}
        there = [0]
        deadline = time.monotonic() + wait_seconds
        while len(there) < nnodes and time.monotonic() < deadline:
            time.sleep(poll_seconds)
            for node, queue in queues.items():
                polled = _last_polled(client, queue, pool)
                if node not in there and polled is not None and polled != first[node]:
                    there.append(node)
    return sorted(there)


def _last_polled(client, queue_name: str, pool: str):
    """When a worker last polled `queue_name` (None: never, or the queue is paused or does not exist)."""
    try:
        queue = client.read_work_queue_by_name(queue_name, work_pool_name=pool)
    except ObjectNotFound:
        return None
    return None if queue.is_paused else queue.last_polled


def node_wait(client, remote: Remote, pool: str, endpoint: str | None) -> str:
    """Why node `remote.node_rank` has not joined yet, from its run's state (and its queue, while no worker has
    taken the run): "its node-agent run base_train-node-1 is Scheduled on queue node-1 of pool nanopipe-nodes,
    which no worker has polled (start one with: ...)"."""
    state = remote.state
    run = f"its node-agent run {remote.name}"
    if state is None:
        return f"{run} is not readable on the server yet"
    if state.is_scheduled():
        return (f"{run} is {state.name} on queue {remote.queue} of pool {pool}, "
                f"{_queue_note(client, remote, pool) if client is not None else 'waiting for a worker'}")
    if state.is_pending():
        return f"{run} is Pending: a worker took it from queue {remote.queue} and is starting it"
    if state.is_running():
        return (f"{run} is Running, but its torchrun has not joined the rendezvous at {endpoint} yet (can that "
                f"node reach {endpoint}? its log: {remote.log_path} on that node)")
    return f"{run} is {state.name}"


def _never_started(remote: Remote, cmd: list[str], log_path: Path, started: float, seconds: float, pool: str,
                   why: str, gave_up: str) -> LaunchResult:
    return LaunchResult(cmd, 1, time.monotonic() - started, False, [], log_path).fails_with(
        f"node {remote.node_rank} never started: {why}; node 0 gave up after {seconds:.0f} s ({gave_up})")


class Supervisor:
    """Polls the remote nodes' flow runs; on the first failure (or a node that never starts) records it and
    stops node 0's processes, which ends the `launch` running in the caller's thread. Until every node has
    joined the rendezvous it reports, every WAIT_REPORT_SECONDS, what node 0 waits for."""

    def __init__(self, remotes: list[Remote], node0_id: str, cmd: list[str], log_path: Path,
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

    def waiting_for(self) -> list[Remote]:
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

def stop_remotes(remotes: list[Remote], reason: str, stop_seconds: float, poll_seconds: float) -> list[str]:
    """Cancel every remote run not yet final and wait until they are; returns a note per run that did not
    stop in time. A cancelled run's worker kills its flow process, whose `launch` kills torchrun's tree."""
    if not remotes:
        return []
    try:
        return _cancel_and_wait(remotes, reason, stop_seconds, poll_seconds)
    except Exception as err:   # the API is unreachable: say which runs to cancel by hand, keep the real outcome
        return [f"could not cancel the node runs ({err!r}): prefect flow-run cancel {r.flow_run_id} (node "
                f"{r.node_rank})" for r in remotes]


def _cancel_and_wait(remotes: list[Remote], reason: str, stop_seconds: float, poll_seconds: float) -> list[str]:
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


def _final(client, remote: Remote) -> bool:
    remote.state = client.read_flow_run(remote.flow_run_id).state
    return remote.state.is_final()


def wait_remotes(supervisor: Supervisor, seconds: float) -> LaunchResult | None:
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
