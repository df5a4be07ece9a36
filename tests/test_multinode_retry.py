"""A multi-node retry on the nodes that are still there (resources.min_nnodes, flows/world.py and
flows/multinode.py): which nodes count as there (their worker polls its work queue), how many of them a retry
takes (the most, down to min_nnodes, passing over a world size the batch arithmetic refuses), the retry's
launch (node ranks renumbered over the nodes chosen, each node-agent run on its node's queue, one node
standalone) and the world size its segment records. No Prefect server: the API is a fake."""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

import flows.multinode as multinode
import flows.node_watch as node_watch
from flows.launcher import LaunchResult, Resources, StageFailed
from flows.multinode import _start_remotes, node_command, retry_layout
from flows.world import AVAILABLE_ENV, record_launch, retry_nnodes
from tests.flow_support import tiny
from tests.test_reshard_flow import plan_of

ENDPOINT = "127.0.0.1:29500"


def accepts(world_size: int) -> str | None:
    return None


def odd_refused(world_size: int) -> str | None:
    return f"world size {world_size} is odd" if world_size % 2 else None


def test_min_nnodes_is_at_most_nnodes():
    assert Resources(nnodes=4, rdzv_endpoint=ENDPOINT, min_nnodes=2).min_nnodes == 2
    assert Resources(nnodes=4, rdzv_endpoint=ENDPOINT).min_nnodes is None
    with pytest.raises(ValidationError, match="min_nnodes=3 is more than nnodes=2"):
        Resources(nnodes=2, rdzv_endpoint=ENDPOINT, min_nnodes=3)


def test_a_retry_takes_the_most_nodes_that_are_there():
    res = Resources(nnodes=4, rdzv_endpoint=ENDPOINT, min_nnodes=2)
    assert retry_nnodes(res, [0, 1, 2, 3], None, accepts)[:2] == ([0, 1, 2, 3], 1)
    nodes, nproc, why = retry_nnodes(res, [3, 0, 2], None, accepts)
    assert (nodes, nproc) == ([0, 2, 3], 1)
    assert why.startswith("3 of 4 nodes (node 1 gone) x 1 of 1 processes per node")
    # 3 nodes x 1 process is refused by the batch arithmetic: 2 of the 3 nodes there
    nodes, nproc, why = retry_nnodes(res, [0, 1, 3], None, odd_refused)
    assert (nodes, nproc) == ([0, 1], 1)
    assert "passed over 3 nodes (" in why and "world size 3 is odd" in why
    with pytest.raises(StageFailed, match=r"only 1 of the 4 nodes are there now \(nodes 1, 2, 3 gone\), fewer than "
                                          r"resources.min_nnodes=2") as below:
        retry_nnodes(res, [0], None, accepts)
    assert below.value.retryable and below.value.kind == "devices"
    with pytest.raises(StageFailed, match="no number of nodes from 3 down to resources.min_nnodes=2 fits") as none:
        retry_nnodes(res, [0, 1, 2], None, lambda world_size: "never")
    assert none.value.retryable


def test_the_processes_per_node_are_chosen_with_the_nodes():
    """2 processes per node planned (at least 1): node 0 can run 1 now, so each node of the retry runs 1; with
    every process usable, 3 nodes x 2 processes fit where 3 x 1 would not."""
    res = Resources(nproc_per_node=2, min_nproc_per_node=1, nnodes=3, rdzv_endpoint=ENDPOINT, min_nnodes=1)
    assert retry_nnodes(res, [0, 1, 2], 1, odd_refused)[:2] == ([0, 1], 1)
    assert retry_nnodes(res, [0, 1, 2], None, odd_refused)[:2] == ([0, 1, 2], 2)


def four_nodes(tmp_path, **resources) -> dict:
    """base_train on 4 nodes x 1 process, 1024 tokens a step: 4, 2 and 1 processes fit the batch, 3 do not."""
    return tiny(tmp_path / "data", stop_after="base_train", base_train={"total_batch_size": 1024, "eval_tokens": 1024},
                resources={"nnodes": 4, "rdzv_endpoint": ENDPOINT, "retries": 1, **resources})


@pytest.fixture
def nodes_there(monkeypatch):
    """Set which nodes the fake API says are there; records each question asked."""
    asked: list[int] = []
    there: list[int] = []

    def live_nodes(nnodes: int, pool: str, wait_seconds: float = 20.0) -> list[int]:
        asked.append(nnodes)
        return list(there)
    monkeypatch.setattr(multinode, "live_nodes", live_nodes)
    monkeypatch.delenv(AVAILABLE_ENV, raising=False)
    return SimpleNamespace(there=there, asked=asked)


def test_a_retry_with_node_1_gone_runs_node_rank_1_on_node_3(tmp_path, nodes_there):
    plan = plan_of(four_nodes(tmp_path, min_nnodes=2))
    nodes_there.there[:] = [0, 3]
    retry, nodes, line = retry_layout(plan)
    assert nodes == [0, 3] and retry.resources.nnodes == 2 and retry.resources.rdzv_endpoint == ENDPOINT
    assert line == ("base_train retry on 2 of 4 nodes (nodes 1, 2 gone) x 1 of 1 processes per node (no limit "
                    "known); node rank 1 on node 3")
    command = " ".join(node_command(retry, 1))
    assert "--nnodes=2 --node_rank=1 --rdzv_backend=static" in command
    assert plan.resources.nnodes == 4   # the plan itself is left alone
    # the node-agent run of node rank 1 goes to node 3's queue, and its plan says 2 nodes
    started: list[dict] = []

    def run_deployment(name, parameters, work_queue_name, **kwargs):
        started.append({"queue": work_queue_name, "node_rank": parameters["node_rank"],
                        "nnodes": parameters["plan"]["resources"]["nnodes"]})
        return SimpleNamespace(id="run-1", name=kwargs["flow_run_name"], state=None)
    remotes = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multinode, "run_deployment", run_deployment)
        _start_remotes(retry, "node-agent/node-agent", "nanopipe-nodes", remotes, nodes)
    assert started == [{"queue": "node-3", "node_rank": 1, "nnodes": 2}]
    assert [(r.node_rank, r.queue, r.name) for r in remotes] == [(1, "node-3", "base_train-node-1")]


def test_a_retry_passes_over_three_nodes_and_runs_alone_on_one(tmp_path, nodes_there):
    plan = plan_of(four_nodes(tmp_path, min_nnodes=1))
    nodes_there.there[:] = [0, 1, 3]
    retry, nodes, line = retry_layout(plan)
    assert nodes == [0, 1] and retry.resources.nnodes == 2
    assert "passed over 3 nodes (" in line and "total_batch_size" in line
    nodes_there.there[:] = [0]
    retry, nodes, line = retry_layout(plan)
    assert nodes == [0] and retry.resources.nnodes == 1 and retry.resources.rdzv_endpoint is None
    assert "--standalone" in retry.command()
    # the segment of a launch on one node records its world size
    result = LaunchResult(retry.command(), 0, 1.0, False, [], tmp_path / "stage.log")
    record_launch(tmp_path / "launches.jsonl", retry.resources, result)
    assert json.loads((tmp_path / "launches.jsonl").read_text())["world_size"] == 1
    # a retry's plan goes to the node agents as parameters: it still validates
    assert type(retry).model_validate(retry.model_dump(mode="json")) == retry


def test_without_min_nnodes_a_retry_keeps_its_nodes_and_asks_nothing(tmp_path, nodes_there):
    plan = plan_of(four_nodes(tmp_path))
    assert retry_layout(plan) == (plan, None, None)
    assert nodes_there.asked == []
    with pytest.raises(StageFailed, match="fewer than resources.min_nnodes=4"):
        from flows.world import retry_nodes_plan
        retry_nodes_plan(plan.model_copy(update={"resources": plan.resources.model_copy(update={"min_nnodes": 4})}),
                         [0, 1, 2])


def test_a_single_node_retry_chooses_its_processes_as_before(tmp_path, nodes_there, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, "1")
    plan = plan_of(tiny(tmp_path / "data", resources={"nproc_per_node": 2, "min_nproc_per_node": 1, "retries": 1},
                        base_train={"device_batch_size": 2}, stop_after="base_train"))
    retry, nodes, line = retry_layout(plan)
    assert nodes is None and retry.resources.nproc_per_node == 1 and nodes_there.asked == []
    assert line == "base_train retry on 1 of 2 processes per node (1 usable now)"


# -----------------------------------------------------------------------------
# Which nodes are there: their worker polls their work queue

class FakeQueues:
    """read_work_queue_by_name of a fake API: node-1's worker polls (its last_polled moves on every read),
    node-2's worker stopped polling, node-3's queue does not exist, node-4's is paused."""

    def __init__(self):
        self.reads = 0
        self.base = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def read_work_queue_by_name(self, name: str, work_pool_name: str):
        self.reads += 1
        if name == "node-3":
            raise ObjectNotFound(None)
        polled = self.base + timedelta(seconds=self.reads) if name == "node-1" else self.base
        return SimpleNamespace(is_paused=name == "node-4", last_polled=polled)


def fake_client(monkeypatch, client) -> None:
    @contextmanager
    def get_client(sync_client: bool):
        yield client
    monkeypatch.setattr(node_watch, "get_client", get_client)


def test_live_nodes_are_those_whose_worker_polls_their_queue(monkeypatch):
    queues = FakeQueues()
    fake_client(monkeypatch, queues)
    assert node_watch.live_nodes(5, "nanopipe-nodes", wait_seconds=0.05, poll_seconds=0.01) == [0, 1]


def test_live_nodes_returns_once_every_node_has_polled(monkeypatch):
    queues = FakeQueues()
    fake_client(monkeypatch, queues)
    assert node_watch.live_nodes(2, "nanopipe-nodes", wait_seconds=600, poll_seconds=0.01) == [0, 1]
    assert queues.reads == 2   # the first reading, and the one that saw node 1's worker poll again
