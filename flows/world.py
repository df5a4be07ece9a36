"""
How many processes a retry runs on: fewer than planned when a device is gone.

A training stage retried after a lost rank or node (a retryable failure, flows/launcher.py's `classify`)
resumes from its last checkpoint, and it resumes on any number of processes (nanopipe/reshard.py: the
optimizer is re-sharded, gradient accumulation recomputed, the data carries on). So with
`resources.min_nproc_per_node` below `nproc_per_node`, a retry does not wait for the lost GPU: it runs with as
many processes per node as the node can run now, never more than `nproc_per_node`, never fewer than
`min_nproc_per_node`, and only with a world size whose batch arithmetic works (the checks planning makes:
a count that fails them is passed over for the next smaller one).

What the node can run now: NANOPIPE_AVAILABLE_NPROC in the worker's environment when set (an operator's
word, and how a CPU run, which has no device to lose, is told); else, for a stage that may run on CUDA, the
GPUs `nvidia-smi -L` still lists, counting only those CUDA_VISIBLE_DEVICES leaves visible; else (a CPU stage,
no nvidia-smi) every planned process. Each node runs the count node 0 found (the nodes of a static rendezvous
run the same command).

A multi-node retry with `resources.min_nnodes` below `nnodes` likewise runs on the nodes that are there
(flows/multinode.py asks which nodes' workers still poll their work queues): the most of them, never fewer
than `min_nnodes`, passing over a number of nodes whose world size fails the batch arithmetic; node ranks are
renumbered over the nodes chosen, node 0 (the flow's own machine) first.

Torch-free: the flow process imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from flows.config import PipelineConfig
from flows.launcher import LaunchResult, Resources, StageFailed
from flows.plan import WORLD_CHECKS, StagePlan
from flows.stages import get_stage
from nanopipe.configs import ConfigError
from nanopipe.configs.base import world_size_checked_later
from nanopipe.events import Resumed, last

AVAILABLE_ENV = "NANOPIPE_AVAILABLE_NPROC"
_GPU_LINE = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[0-9a-fA-F-]+)\)")


def listed_gpus(timeout_seconds: float = 60.0) -> list[tuple[str, str]] | None:
    """(index, UUID) of each GPU `nvidia-smi -L` lists now; None where there is no nvidia-smi. A GPU that fell
    off the bus is not listed; an nvidia-smi that hangs or cannot run lists none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_seconds).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [(m.group(1), m.group(2)) for line in out.splitlines() if (m := _GPU_LINE.match(line.strip()))]


def visible_count(gpus: list[tuple[str, str]], cuda_visible_devices: str | None) -> int:
    """How many of `gpus` a process sees under CUDA_VISIBLE_DEVICES (indices or UUID prefixes; unset: all)."""
    if cuda_visible_devices is None:
        return len(gpus)
    wanted = [v.strip() for v in cuda_visible_devices.split(",") if v.strip()]
    return sum(any(v == index or (v.startswith("GPU-") and uuid.startswith(v)) for index, uuid in gpus)
               for v in wanted)


def usable_processes(stage_env: dict[str, str], device_type: str,
                     listed: Callable[[], list[tuple[str, str]] | None] = listed_gpus) -> int | None:
    """How many processes this node can run for the stage now (see the module docstring); None: no limit known."""
    said = os.environ.get(AVAILABLE_ENV)
    if said is not None:
        if not said.strip().isdigit():
            raise StageFailed(f"{AVAILABLE_ENV}={said!r} in the worker's environment is not a number of processes "
                              f"[config, not retried]", kind="config", retryable=False)
        return int(said)
    if device_type not in ("", "cuda"):
        return None
    gpus = listed()
    if gpus is None or (not gpus and device_type == ""):   # no GPU here to lose: autodetect runs on the CPU
        return None
    return visible_count(gpus, stage_env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")))


def retry_nproc(resources: Resources, usable: int | None, refusal: Callable[[int], str | None]) -> tuple[int, str]:
    """(processes per node, why) for a retry: the most, from min(nproc_per_node, usable) down to
    min_nproc_per_node, whose world size `refusal` accepts (None; else it returns the reason). Raises a
    retryable StageFailed (kind "devices") when no count qualifies: the next retry looks again."""
    planned = resources.nproc_per_node
    fewest = resources.min_nproc_per_node or planned
    top = planned if usable is None else min(planned, usable)
    if top < fewest:
        raise StageFailed(f"only {usable} of the {planned} processes per node can run now, fewer than "
                          f"resources.min_nproc_per_node={fewest} [devices, will be retried]",
                          kind="devices", retryable=True)
    refused = []
    for nproc in range(top, fewest - 1, -1):
        problem = refusal(nproc)
        if problem is None:
            said = f"{usable} usable now" if usable is not None else "no limit known"
            skipped = f"; passed over {'; '.join(refused)}" if refused else ""
            return nproc, f"{nproc} of {planned} processes per node ({said}){skipped}"
        refused.append(f"{nproc} ({problem})")
    raise StageFailed(f"no number of processes per node from {top} down to resources.min_nproc_per_node={fewest} "
                      f"fits the batch arithmetic: {'; '.join(refused)} [devices, will be retried]",
                      kind="devices", retryable=True)


def world_refusal(plan: StagePlan) -> Callable[[int], str | None]:
    """The stage's world-size rules (planning's WORLD_CHECKS) as a function of the world size: None when that
    size works, else the stage's one-line reason."""
    check = WORLD_CHECKS.get(plan.stage)
    if check is None:
        return lambda world_size: None
    cls = PipelineConfig.model_fields[get_stage(plan.stage).config_field].annotation
    with world_size_checked_later():   # checked below, for each size
        cfg = cls.model_validate(plan.config)

    def refusal(world_size: int) -> str | None:
        try:
            check(cfg, world_size)
        except ConfigError as err:
            return str(err)
        return None
    return refusal


def batch_refusal(plan: StagePlan) -> Callable[[int], str | None]:
    """`world_refusal` as a function of processes per node, on the plan's number of nodes."""
    refusal = world_refusal(plan)
    return lambda nproc: refusal(nproc * plan.resources.nnodes)


def retry_plan(plan: StagePlan) -> tuple[StagePlan, str | None]:
    """The plan of a retry: a training stage whose resources allow fewer processes gets as many as the node
    can run now; any other plan is unchanged. Also returns the line that says what was chosen (None when
    nothing was to choose)."""
    res = plan.resources
    fewest = res.min_nproc_per_node or res.nproc_per_node
    if not plan.resume_flag or not plan.distributed or fewest >= res.nproc_per_node:
        return plan, None
    usable = usable_processes(res.env, str(plan.config.get("device_type") or ""))
    nproc, why = retry_nproc(res, usable, batch_refusal(plan))
    if nproc != res.nproc_per_node:
        plan = plan.model_copy(update={"resources": res.model_copy(update={"nproc_per_node": nproc})})
    return plan, f"{plan.stage} retry on {why}"


def retry_nnodes(resources: Resources, live: list[int], usable: int | None,
                 refusal: Callable[[int], str | None]) -> tuple[list[int], int, str]:
    """(nodes, processes per node, why) for a multi-node retry: the first nodes of `live` (node numbers whose
    worker is there, node 0 among them), as many as from min(nnodes, len(live)) down to min_nnodes, whose
    world size `refusal` accepts with some number of processes per node (`retry_nproc`, given `usable`).
    Raises a retryable StageFailed (kind "devices") when no number of nodes qualifies."""
    planned = resources.nnodes
    fewest = resources.min_nnodes or planned
    live = sorted(set(live))
    assert live[:1] == [0], f"node 0 runs the flow's task, so it is there; got live nodes {live}"
    gone = [node for node in range(planned) if node not in live]
    missing = f"node{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} gone" if gone else "all there"
    top = min(planned, len(live))
    if top < fewest:
        raise StageFailed(f"only {len(live)} of the {planned} nodes are there now ({missing}), fewer than "
                          f"resources.min_nnodes={fewest} [devices, will be retried]", kind="devices", retryable=True)
    refused = []
    for nnodes in range(top, fewest - 1, -1):
        try:
            nproc, why = retry_nproc(resources, usable, lambda nproc: refusal(nproc * nnodes))
        except StageFailed as failed:
            refused.append(f"{nnodes} node{'s' if nnodes > 1 else ''} ({str(failed).split(' [devices')[0]})")
            continue
        skipped = f"; passed over {'; '.join(refused)}" if refused else ""
        return live[:nnodes], nproc, f"{nnodes} of {planned} nodes ({missing}) x {why}{skipped}"
    raise StageFailed(f"no number of nodes from {top} down to resources.min_nnodes={fewest} fits: "
                      f"{'; '.join(refused)} [devices, will be retried]", kind="devices", retryable=True)


def retry_nodes_plan(plan: StagePlan, live: list[int]) -> tuple[StagePlan, list[int], str]:
    """The plan of a multi-node retry on the nodes `live` (node numbers whose worker is there): its nnodes and
    processes per node as `retry_nnodes` chooses, the node numbers that run node ranks 0.., and the line that
    says so. A retry on one node runs standalone (no rendezvous endpoint to reach)."""
    res = plan.resources
    usable = usable_processes(res.env, str(plan.config.get("device_type") or ""))
    nodes, nproc, why = retry_nnodes(res, live, usable, world_refusal(plan))
    update = {"nnodes": len(nodes), "nproc_per_node": nproc, "min_nnodes": None}
    if len(nodes) == 1:
        update["rdzv_endpoint"] = None
    plan = plan.model_copy(update={"resources": res.model_copy(update=update)})
    ranks = "" if nodes == list(range(len(nodes))) else \
        "; " + ", ".join(f"node rank {rank} on node {node}" for rank, node in enumerate(nodes) if rank != node)
    return plan, nodes, f"{plan.stage} retry on {why}{ranks}"


# -----------------------------------------------------------------------------
# Segments: which world size trained which steps, over the launches of a stage (its attempts, and the runs
# that resumed it), for the manifest and the report card

LAUNCHES_FILE = "launches.jsonl"


def record_launch(path: Path, resources: Resources, result: LaunchResult) -> None:
    """Append one launch of a resumable stage to its artifact's `launches.jsonl`: the world size it ran with,
    the checkpoint it resumed from (and the world size that wrote it), the last step it reported."""
    resumed = last(result.records, Resumed)
    line = {"world_size": resources.nproc_per_node * resources.nnodes,
            "resumed_from": resumed.step if resumed else None,
            "written_by": resumed.written_by if resumed else None,
            "last_step": result.last_progress.get("step"), "returncode": result.returncode}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def segments(launches: list[dict], final_step: int | None) -> list[dict]:
    """[{from_step, to_step, world_size}] of the steps that made the final model: each launch trained from
    the checkpoint it resumed from (0: from scratch) until the next launch's resume point (the last one until
    `final_step`); steps a killed launch trained past its last checkpoint were trained again, and count for
    the launch that did. Neighbours of one world size merge. A first launch that resumed from a checkpoint no
    recorded launch wrote (restored from the artifact store) starts with the world size that wrote it."""
    out: list[dict] = []
    for launch in launches:
        start = launch.get("resumed_from") or 0
        out = [s for s in out if s["from_step"] < start]
        if out:
            out[-1]["to_step"] = start
        elif start > 0 and launch.get("written_by"):
            out.append({"from_step": 0, "to_step": start, "world_size": launch["written_by"]})
        out.append({"from_step": start, "to_step": launch.get("last_step"), "world_size": launch["world_size"]})
    if out:
        out[-1]["to_step"] = final_step if final_step is not None else out[-1]["to_step"]
    merged: list[dict] = []
    for segment in out:
        if merged and merged[-1]["world_size"] == segment["world_size"]:
            merged[-1]["to_step"] = segment["to_step"]
        else:
            merged.append(segment)
    return merged


def segments_of(path: Path, final_step: int | None) -> list[dict]:
    """The segments of a stage's recorded launches (none recorded: no segments)."""
    if not path.is_file():
        return []
    launches = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            launch = json.loads(line)
            if isinstance(launch, dict) and isinstance(launch.get("world_size"), int):
                launches.append(launch)
    return segments(launches, final_step if isinstance(final_step, int) else None)


def segments_line(stage: str, parts: list[dict]) -> str | None:
    """One line saying which world size trained which steps, e.g. "base_train: steps 0-6 on 2 processes, then
    steps 6-12 on 1 process"; None for a stage trained in one segment."""
    if len(parts) < 2:
        return None
    spans = [f"steps {s['from_step']}-{'?' if s['to_step'] is None else s['to_step']} on {s['world_size']} "
             f"process{'' if s['world_size'] == 1 else 'es'}" for s in parts]
    return f"{stage}: {', then '.join(spans)}"
