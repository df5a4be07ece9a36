"""
The Prefect task that runs one stage, `run_stage`, whose body is the list of a stage's steps, each one
function of this module, in order:

    check_upstream       plan: the inputs given are the artifacts the plan expects
    locked               lock: the artifact directory here, its name in the store across machines
    produced_meanwhile   ...unless a concurrent run finished it while we waited
    restored_from_store  restore: the whole artifact from the store, when it has it
    prepare              a clean directory (checkpoints kept for a resume), this attempt's layout
    checkpoints_kept     restore the store's last checkpoint; upload each new one while the stage trains
    launch_attempt       launch: torchrun (or node 0 of a multi-node stage) with logs and progress
    record               record: the launch, then the manifest, written last
    keep_in_store        upload: the verified artifact goes to the store, its manifest last

The task takes the upstream stages' references as a parameter (`upstream`, the upstream task runs' states),
so Prefect records a real edge from each upstream task run, whether it ran or came back Cached: the run's
graph shows what was reused and what ran again.

The cache is the artifact itself: its directory is named by the content hash and it counts only while its
manifest verifies. When the flow has verified it in this run, the task ends at once in a `Cached` state
whose message names the hash. No task result is ever persisted: Prefect's result records are pickles, and
a planted or stale record would run code or hide a damaged artifact, while the manifest is plain JSON that
is checked file by file. Retries happen only for failures a retry can fix, and a retry of a checkpointing
stage resumes from its last checkpoint.

What the run's page shows of a stage: its human lines in the logs (its records, nanopipe/events.py, go to
stage.log only: progress to the progress artifact and `progress.jsonl`, the resumed step, the memory
estimate and the world size of each segment of training (`launches.jsonl`, flows/world.py) to the manifest),
the cache key and code version in the final state's message, and, when the run is cancelled from the UI, a
Cancelled task run. Nothing here reads a human line.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run, task_run
from prefect.states import Cancelled, Completed

from flows.artifacts import (ArtifactRef, artifact_lock, discard, read_manifest, ref_from_manifest, verify,
                             write_manifest)
from flows.launcher import LaunchResult, StageFailed, failure_from, launch
from flows.store import (CheckpointUploader, artifact_name, checkpoints_name, restore_artifact, restore_checkpoints,
                         store_has, upload_artifact)
from flows.store_lock import store_lock
from flows.multinode import launch_across_nodes, node_command, retry_layout, with_endpoint
from flows.plan import StagePlan
from flows.recompute import SUFFIX as STAGING_SUFFIX
from flows.report import PROGRESS_FILE, artifact_key
from flows.world import LAUNCHES_FILE, record_launch, segments_of
from nanopipe.events import MemoryEstimate, Resumed, last, read_metrics

LOG_FILE = "stage.log"


def cache_key(plan: StagePlan) -> str:
    """What the stage is cached under: the stage and its artifact's content hash."""
    return f"nanopipe-{plan.stage}-{plan.hash}"


def cache_note(plan: StagePlan) -> str:
    """The cache key and code version, for the task run's state message. (Prefect 3.9 never fills the task
    run's own "Cache Key" field: the engine creates task runs without one and the API cannot set it later,
    even with a custom CachePolicy, which would moreover require persisted (pickled) results. The state
    message is the one place of the task run page we control.)"""
    return f"cache key {cache_key(plan)}, code version {plan.code_version}"


def cancel_requested() -> bool:
    """Is the SIGTERM being handled the runner's cancel of this flow run (UI, `prefect flow-run cancel`)?
    Prefect's worker says so over its control channel before it signals the flow process; the flow engine
    reads the same flag to end the run Cancelled rather than Crashed. Any other SIGTERM is a crash."""
    try:
        from prefect._internal.control_listener import get_intent
    except ImportError:   # a Prefect without the control channel: every SIGTERM is a crash, as before
        return False
    return get_intent() == "cancel"


def retry_if_retryable(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only a StageFailed that says a retry can help."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as err:  # the state's own exception, re-raised to be inspected
            exc = err
    return isinstance(exc, StageFailed) and exc.retryable


# -----------------------------------------------------------------------------

class _Progress:
    """Each progress line of the stage: appended to its history (`progress.jsonl`, flushed per line, with
    the attempt and the wall-clock time), and mirrored into a Prefect progress artifact at most every few
    seconds. The artifact's last description keeps the last step's figures."""

    def __init__(self, stage: str, history: Path, attempt: int, every_seconds: float = 3.0):
        self.stage, self.attempt, self.every, self.last = stage, attempt, every_seconds, 0.0
        self.history = history
        self.latest: dict = {}   # the last step, with the last value of every figure reported so far
        if history.is_file():   # a resumed stage: its figures so far (the resumed steps may not repeat all)
            for line in history.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    self.latest.update({k: v for k, v in record.items() if k not in ("attempt", "t")})
        # keyed, so the Artifacts tab titles the card by its stage
        self.artifact_id = create_progress_artifact(0.0, key=artifact_key(stage, "progress"),
                                                    description=f"{stage} progress")

    def __call__(self, progress: dict) -> None:
        with open(self.history, "a", encoding="utf-8") as f:
            f.write(json.dumps({**progress, "attempt": self.attempt, "t": round(time.time(), 3)}) + "\n")
        if progress.get("total") is None:
            return
        self.latest = {**self.latest, **progress}
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        update_progress_artifact(self.artifact_id, self.percent(), description=self.describe())

    def percent(self) -> float:
        step, total = self.latest.get("step") or 0, self.latest.get("total")
        return min(100.0, 100.0 * step / total) if total else 0.0

    def describe(self, ending: str = "") -> str:
        """"base_train: 40/40 loss=3.1 val_bpb=1.9 (done)": the last step's figures, and how it ended."""
        if not self.latest:
            return f"{self.stage}: {ending or 'started'}"
        figures = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in self.latest.items() if k not in ("step", "total"))
        step = self.latest["total"] if ending == "done" else self.latest.get("step", "?")   # done: N/N
        text = f"{self.stage}: {step}/{self.latest['total']} {figures}".strip()
        return f"{text} ({ending})" if ending else text

    def finish(self, ending: str = "done") -> None:
        update_progress_artifact(self.artifact_id, 100.0 if ending == "done" else self.percent(),
                                 description=self.describe(ending))


# -----------------------------------------------------------------------------
# The steps of a stage's life, in the order run_stage takes them

def check_upstream(plan: StagePlan, upstream: dict[str, ArtifactRef] | None) -> None:
    """Plan: each input the task was given is the artifact its plan expects (by hash)."""
    for role, ref in (upstream or {}).items():
        expected = plan.upstream.get(role, {}).get("hash")
        if ref.hash != expected:
            raise StageFailed(f"stage {plan.stage}: input {role} is {ref.path} (hash {ref.hash}), but the plan "
                              f"expects hash {expected}", kind="plan", retryable=False)


@contextlib.contextmanager
def locked(plan: StagePlan, store: str | None, logger):
    """Lock: the artifact directory on this machine, and its name in the store across machines."""
    directory = Path(plan.artifact_dir)
    across_machines = (store_lock(store, artifact_name(directory), on_wait=logger.info) if store
                       else contextlib.nullcontext())
    with across_machines, artifact_lock(directory, on_wait=logger.info):
        yield


def produced_meanwhile(plan: StagePlan, store: str | None, logger) -> Completed | None:
    """Did a concurrent run finish this artifact while we waited for its lock? (Verified only when a
    manifest with our hash appeared, so the usual path costs no second checksum pass.)"""
    directory = Path(plan.artifact_dir)
    manifest = read_manifest(directory)
    if not (manifest and manifest.get("hash") == plan.hash and verify(directory, plan.hash)):
        return None
    logger.info(f"{plan.stage}: {directory} already verifies (produced by another run)")
    keep_in_store(plan, store, logger)
    return Completed(data=ref_from_manifest(directory),
                     message=f"{directory.name} was produced by another run meanwhile ({cache_note(plan)})")


def restored_from_store(plan: StagePlan, store: str | None, logger) -> Completed | None:
    """Restore: the whole verified artifact from the store, when the store has it."""
    if not store:
        return None
    directory = Path(plan.artifact_dir)
    name = artifact_name(directory)
    restored = restore_artifact(store, name, directory, plan.hash)
    if not restored:
        return None
    logger.info(f"{plan.stage}: restored {name} from {store} ({restored.bytes:,} bytes in "
                f"{restored.seconds:.1f} s)")
    return Completed(name="Cached", data=ref_from_manifest(directory),
                     message=f"restored {name} from the artifact store ({cache_note(plan)})")


def prepare(plan: StagePlan, logger) -> tuple[StagePlan, list[int] | None]:
    """Make the artifact directory ready to (re)run into, and choose where this attempt runs: the plan of this
    attempt and the node that runs each node rank of a multi-node stage (None: node k runs rank k). A stage
    with no checkpoint to resume from starts from scratch, and its progress history starts afresh too."""
    directory, out = Path(plan.artifact_dir), Path(plan.out_dir)
    if read_manifest(directory) is not None:
        # a manifest that does not verify: the directory is damaged, nothing in it can be trusted
        logger.warning(f"{directory}: {verify(directory, plan.hash).reason}; recomputing from scratch")
        discard(directory)
    directory.mkdir(parents=True, exist_ok=True)
    resumable = False
    if plan.resume_flag:
        checkpoints = sorted(out.glob(plan.checkpoint_glob)) if out.is_dir() else []
        if checkpoints:
            logger.info(f"{plan.stage} will resume from its checkpoints in {out} (last: {checkpoints[-1].name})")
            resumable = True
    elif out.exists():   # leftovers of an interrupted run of a stage that cannot resume
        shutil.rmtree(out)
    if not resumable:
        (directory / PROGRESS_FILE).unlink(missing_ok=True)
        (directory / LAUNCHES_FILE).unlink(missing_ok=True)
    nodes = None
    if task_run.run_count > 1:   # a lost device or node need not stop a retry (flows/world.py)
        plan, nodes, layout = retry_layout(plan)
        if layout:
            logger.info(layout)
    return plan, nodes


@contextlib.contextmanager
def checkpoints_kept(plan: StagePlan, store: str | None, recompute: bool, logger):
    """Restore and upload a resumable stage's checkpoints: the store's last one comes back before the stage
    starts (not for a recompute), and each new one goes up while it trains. Yields the uploader (None: no
    store, or a stage without checkpoints); the last checkpoint goes up even when the stage fails, so that a
    retry elsewhere resumes from it."""
    if not (store and plan.resume_flag):
        yield None
        return
    checkpoints = checkpoints_name(plan.artifact_dir, plan.out_dir)
    if not recompute:
        restored = restore_checkpoints(store, checkpoints, plan.out_dir)
        if restored:
            logger.info(f"{plan.stage}: restored checkpoint step {restored.step} from {store} "
                        f"({restored.bytes:,} bytes in {restored.seconds:.1f} s): it resumes from there")
    uploader = CheckpointUploader(plan.out_dir, store, checkpoints, log_line=logger.info).start()
    try:
        yield uploader
    finally:
        uploader.stop()


@dataclass
class Attempt:
    """One launch of the stage: the plan and command it ran, when it started, its progress, and its result
    (None: cancelled from the UI)."""
    plan: StagePlan
    command: list[str]
    started: float
    progress: _Progress
    result: LaunchResult | None = None


def launch_attempt(plan: StagePlan, nodes: list[int] | None, logger) -> Attempt:
    """Launch: the stage's command here (torchrun for a distributed stage), or node 0 of a multi-node stage
    here and the other nodes through their node-agent runs (flows/multinode.py); its lines go to the log, its
    progress to the progress artifact. A cancel from the UI ends the attempt without a result."""
    directory = Path(plan.artifact_dir)
    multinode = plan.resources.nnodes > 1
    if multinode:
        plan = with_endpoint(plan)
    cmd = node_command(plan, 0) if multinode else plan.command()
    logger.info(f"{plan.stage} attempt {task_run.run_count}: {' '.join(cmd)}")
    attempt = Attempt(plan, cmd, started=time.time(),
                      progress=_Progress(plan.stage, directory / PROGRESS_FILE, attempt=task_run.run_count))
    timeout = plan.resources.timeout_minutes * 60 if plan.resources.timeout_minutes else None
    try:
        if multinode:
            attempt.result = launch_across_nodes(plan, log_path=directory / LOG_FILE, on_line=logger.info,
                                                 on_progress=attempt.progress, timeout_seconds=timeout, nodes=nodes)
        else:
            attempt.result = launch(cmd, log_path=directory / LOG_FILE, env=plan.resources.env, on_line=logger.info,
                                    on_progress=attempt.progress, timeout_seconds=timeout)
    except TerminationSignal:
        # the launch has already stopped the stage's process tree on its way out
        if not cancel_requested():
            raise   # a real termination: Prefect marks the task run Crashed
        attempt.progress.finish("cancelled")
        logger.warning(f"{plan.stage}: cancelled; the stage's processes were stopped")
    return attempt


def cancelled(attempt: Attempt) -> Cancelled:
    """The task run's state after a cancel: "<stage> cancelled at step <n>" (flows/pipeline.py names the run)."""
    step = attempt.progress.latest.get("step")
    return Cancelled(message=f"{attempt.plan.stage} cancelled" + (f" at step {step}" if step is not None else ""))


def record(attempt: Attempt) -> ArtifactRef:
    """Record: the launch (a resumable stage's segments of training), then, if the stage succeeded and wrote
    its metrics, the manifest, written last; raise StageFailed otherwise."""
    plan, result = attempt.plan, attempt.result
    directory = Path(plan.artifact_dir)
    if plan.resume_flag:
        record_launch(directory / LAUNCHES_FILE, plan.resources, result)
    if result.returncode != 0 or result.timed_out:
        attempt.progress.finish("failed")
        raise failure_from(result, plan.stage)
    metrics = read_metrics(plan.out_dir)
    if metrics is None:
        raise StageFailed(f"stage {plan.stage} exited 0 but wrote no metrics in {plan.out_dir}; log: "
                          f"{result.log_path}", kind="incomplete", retryable=False)
    # the stage's own word on where it resumed is exact (a damaged newest checkpoint is skipped, for one)
    resumed = last(result.records, Resumed)
    resumed_from = resumed.step if resumed else None
    memory = last(result.records, MemoryEstimate)
    timings = {"started": attempt.started, "finished": time.time(), "seconds": round(result.seconds, 3),
               "attempt": task_run.run_count, "resumed_from": resumed_from}
    segments = segments_of(directory / LAUNCHES_FILE, metrics.get("step"))
    write_manifest(directory, stage=plan.stage, digest=plan.hash, config=plan.config, upstream=plan.upstream,
                   metrics=metrics, timings=timings,
                   extra={"command": attempt.command, "code_version": plan.code_version, "code": plan.code,
                          "semantic_config": plan.semantic_config, "data": plan.data,
                          "memory_estimate": memory.model_dump() if memory else None,
                          "segments": segments,
                          "flow_run_id": flow_run.id,
                          "task_run_id": task_run.id})
    attempt.progress.finish()
    return ArtifactRef(stage=plan.stage, hash=plan.hash, path=str(directory), metrics=metrics,
                       seconds=round(result.seconds, 3), resumed_from=resumed_from, segments=segments)


def keep_in_store(plan: StagePlan, store: str | None, logger, already_uploaded=None) -> None:
    """Upload: make sure the store holds this verified artifact (uploaded with its manifest last). A store
    that cannot be written costs a warning, not the stage: the artifact is verified here, and the next run
    that finds it will try the upload again."""
    if not store:
        return
    directory = Path(plan.artifact_dir)
    name = artifact_name(directory)
    try:
        if store_has(store, name, plan.hash):
            return
        sent = upload_artifact(directory, store, name, already_uploaded=already_uploaded)
        logger.info(f"{plan.stage}: uploaded {name} to {store} ({sent.files} file(s), {sent.bytes:,} bytes in "
                    f"{sent.seconds:.1f} s)")
    except Exception as err:
        logger.warning(f"{plan.stage}: could not upload {name} to {store}: {type(err).__name__}: {err}")


# -----------------------------------------------------------------------------
# The task

@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_if_retryable,
      task_run_name="{plan.stage}")
def run_stage(plan: StagePlan, upstream: dict[str, ArtifactRef] | None = None, verified: bool = False,
              store: str | None = None, recompute: bool = False):
    """Produce one stage's artifact (or find it already produced by a concurrent run, or in the store).

    `upstream` maps each input field to the reference its upstream stage returned; `verified` says the
    flow already checked this artifact on disk in this run (then a cache miss only re-reads its manifest).
    `store` (an fsspec URL, flows/store.py) keeps artifacts and checkpoints beyond this node: a missing
    artifact is restored from it, a resumable stage's checkpoints are restored before it starts and uploaded
    while it trains, and a finished artifact goes up with its manifest last. `recompute` (recompute_from)
    never restores anything."""
    logger = get_run_logger()
    directory = Path(plan.artifact_dir)
    check_upstream(plan, upstream)
    if verified:
        keep_in_store(plan, store, logger)
        return Completed(name="Cached", data=ref_from_manifest(directory),
                         message=f"reused {directory.name}: its manifest verified ({cache_note(plan)})")
    with locked(plan, store, logger):
        if (found := produced_meanwhile(plan, store, logger)) is not None:
            return found
        if not recompute and (restored := restored_from_store(plan, store, logger)) is not None:
            return restored
        plan, nodes = prepare(plan, logger)
        with checkpoints_kept(plan, store, recompute, logger) as uploader:
            attempt = launch_attempt(plan, nodes, logger)
        if attempt.result is None:
            return cancelled(attempt)
        ref = record(attempt)
        keep_in_store(plan, store, logger, uploader.uploaded if uploader else None)
        resumed = f", resumed from step {ref.resumed_from}" if ref.resumed_from is not None else ""
        logger.info(f"{plan.stage}: done in {attempt.result.seconds:.1f} s{resumed} -> {directory}")
        if recompute:   # built beside the old artifact (flows/recompute.py); the flow swaps it in once it verifies
            name = directory.name.removesuffix(STAGING_SUFFIX)
            return Completed(data=ref, message=f"recomputed {name}{resumed}, built beside the old one and swapped "
                                               f"in once it verifies ({cache_note(plan)})")
        return Completed(data=ref, message=f"produced {directory.name}{resumed} ({cache_note(plan)})")
