"""
The nanopipe pipeline as Prefect flows: tokenizer -> base -> mid -> SFT -> optional RL, with evaluations.

    nanopipe run --preset demo-cpu                      # the whole pipeline, in-process (embedded server)
    nanopipe stage base_train --preset demo-cpu         # one stage as its own flow
    python -c "from flows.pipeline import full_pipeline; full_pipeline({'preset': 'demo-cpu'})"

Each stage is the `run_stage` task over a plan (flows/plan.py), given its upstream stages' task-run states,
so Prefect's graph links every stage to what it reads. Read top-down, one stage's run goes:

    full_pipeline, stage_flow       the flows (each a body wrapped by `ended`, which names a failure)
    full_pipeline_body              config -> plans (flows/plan.py)
    run_plans_in_order              the flow's loop: what runs, preflight, one call per stage, the summary
    call_stage_task                 one stage: tags and retries, a recompute staged beside its artifact
    run_stage                       the task (flows/stage_task.py): lock, restore, launch, record, upload

A stage whose artifact verifies comes back Cached; a re-run after a failure therefore executes only the
failed stage onward, and the failed stage resumes from its checkpoints. `recompute_from` recomputes a stage
and everything after it, each built beside the artifact it replaces and swapped in once it verifies
(flows/recompute.py): a failed or cancelled recompute loses nothing, and a retry of the same flow run
continues it from its checkpoints.

How a run ends, as the UI shows it: a failure ends the flow run Failed, its state named by the failure's
class ("Bad config", "Out of memory", "Node lost", "Regression", ...: what the run header and the runs list
show) with one sentence as its state message (the stage and why, in the stage's own words; the traceback
stays in the log); an unknown parameter is refused before any stage runs, with the closest field names; a
cancel from the UI ends the running stage and the flow run Cancelled, named by where it stopped ("Cancelled at
base_train step 9", flows/cancel_note.py).
"""

from __future__ import annotations

import difflib
import re
import signal
import time
import types
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Failed
from pydantic import BaseModel, ValidationError

from flows.artifacts import ArtifactRef, read_manifest, ref_from_manifest, verify
from flows.cancel_note import cancel_note, start as start_cancel_note
from flows.config import PipelineConfig, StageName, resolved_config_markdown
from flows.launcher import StageFailed
from flows.plan import PlanError, StagePlan, model_shape, plan_pipeline, preflight
from flows.recompute import stage_beside, staging_dir, swap_in
from flows.report import StageOutcome, publish_summary
from flows.stage_task import run_stage
from flows.stages import STAGE_NAMES, get_stage
from nanopipe.configs import ConfigError
from nanopipe.configs.base import model_tag_for_depth


# -----------------------------------------------------------------------------
# The flows: config -> plans -> the loop

def pipeline_run_name() -> str:
    """What a run is, in its name: "demo-cpu d4 2026-11-29 02:00" instead of Prefect's random words."""
    try:
        config = flow_run.parameters.get("config") or {}
        config = config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
        what = f"{config.preset or 'custom'} {model_tag_for_depth(config.base_train.depth)}" + (
            " +rl" if config.run_rl else "")
    except Exception:   # a name must never fail the run; the parameters are validated where it matters
        what = "pipeline"
    return f"{what} {datetime.now(timezone.utc):%Y-%m-%d %H:%M}"


@flow(name="full-pipeline", flow_run_name=pipeline_run_name, log_prints=True, validate_parameters=False)
def full_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, ArtifactRef]:
    """The whole pipeline: validate and dry-run every stage first, then run (or reuse) each in order."""
    return ended(lambda: full_pipeline_body(config))


def full_pipeline_body(config: PipelineConfig | dict) -> dict[str, ArtifactRef]:
    config = as_config(config)
    publish_config(config)
    return run_plans_in_order(plan_pipeline(config), config,
                              title=f"nanopipe pipeline ({config.preset or 'custom'})")


@flow(name="stage", flow_run_name="{stage}", log_prints=True, validate_parameters=False)
def stage_flow(stage: StageName, config: PipelineConfig) -> ArtifactRef:
    """One stage as its own flow. Its inputs must already exist (run the upstream stages first)."""
    return ended(lambda: stage_flow_body(stage, config))


def stage_flow_body(stage: StageName, config: PipelineConfig | dict) -> ArtifactRef:
    config = as_config(config)
    publish_config(config)
    row = get_stage(stage)
    config = config.model_copy(update={"stop_after": None, **({row.when: True} if row.when else {})})
    plans = {p.stage: p for p in plan_pipeline(config)}
    plan = plans[stage]
    inputs = {up["stage"] for up in plan.upstream.values()}
    missing = [f"{name} ({plans[name].artifact_dir})" for name in sorted(inputs) if not verifies(plans[name])]
    if missing:
        raise PlanError(f"stage {stage} needs the artifacts of {', '.join(missing)}: run those stages first "
                        f"(nanopipe stage <name> with the same config) or the full pipeline")
    refs = {name: ref_from_manifest(plans[name].artifact_dir) for name in inputs}
    return run_plans_in_order([plan], config, title=f"nanopipe stage {stage} ({config.preset or 'custom'})",
                              upstream_states=refs)[stage]


def as_config(config: PipelineConfig | dict) -> PipelineConfig:
    """The flows validate their parameters themselves (validate_parameters=False): a config error, cross-field
    checks included, then ends the run like any other failure, with one sentence as its state message,
    instead of Prefect's parameter error (which Prefect also pickles into its result storage)."""
    return config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)


def publish_config(config: PipelineConfig) -> None:
    """The config after its preset, as the run's first artifact: what the form's empty fields became."""
    try:
        create_markdown_artifact(resolved_config_markdown(config), key="nanopipe-config",
                                 description=f"resolved config ({config.preset or 'custom'})")
    except Exception as err:   # never let a report keep a run from starting
        get_run_logger().warning(f"could not publish the resolved config: {type(err).__name__}: {err}")


# -----------------------------------------------------------------------------
# The flow's loop: what runs, preflight, each stage in order, the summary

def run_plans_in_order(plans: list[StagePlan], config: PipelineConfig, title: str,
                       upstream_states: dict[str, Any] | None = None) -> dict[str, ArtifactRef]:
    """The flow's loop: say what runs, preflight it, then run the stages in order, publishing a summary however
    it ends. `upstream_states` holds states of stages outside `plans` that they read from (a single-stage flow)."""
    logger = get_run_logger()
    this_run = flow_run.id
    recompute, verified = what_runs(plans, config.recompute_from, this_run)
    for p in plans:
        state = "recompute" if p.stage in recompute else ("cached" if verified[p.stage] else "run")
        logger.info(f"plan: {p.stage:<10} {state:<9} {p.artifact_dir}")
    preflight([p for p in plans if not verified[p.stage]], shape=model_shape(plans), log=logger.info)
    states = dict(upstream_states or {})
    outcomes: list[StageOutcome] = []
    try:
        for plan in plans:
            started = time.monotonic()
            upstream = {role: states[up["stage"]] for role, up in plan.upstream.items() if up["stage"] in states}
            try:
                outcome = call_stage_task(plan, recompute=plan.stage in recompute, verified=verified[plan.stage],
                                          upstream=upstream, logger=logger, preset=config.preset or "custom",
                                          store=config.store_url(), run_id=str(this_run))
            except BaseException:   # killed or interrupted mid-stage: say so in the summary, then go on unwinding
                outcomes.append(StageOutcome(plan, "Interrupted", time.monotonic() - started))
                raise
            outcomes.append(outcome)
            states[plan.stage] = outcome.state
            if outcome.status == "Cancelled":
                # the stage stopped on the runner's cancel: let the flow engine end the run Cancelled, then
                # name that state by the stage and step it stopped at (flows/cancel_note.py)
                _note_cancel(plan, outcome, logger, recomputing=plan.stage in recompute)
                raise TerminationSignal(signal.SIGTERM)
            if outcome.exception is not None:
                raise outcome.exception
            if outcome.ref is None:
                raise RuntimeError(f"stage {plan.stage} ended {outcome.status}: {outcome.error}")
    finally:
        regressions = _publish(outcomes, plans, title, config, logger)
    if regressions:   # every stage completed (a failure raised above): the artifacts stay, cached next time
        raise Regression("regression: " + "; ".join(regressions))
    return {o.plan.stage: o.ref for o in outcomes}


def what_runs(plans: list[StagePlan], recompute_from: str | None,
              this_run: str | None) -> tuple[set[str], dict[str, bool]]:
    """The stages this run recomputes, and this run's verdict on each artifact on disk (verified once per run).
    A recompute covers `recompute_from` and every planned stage after it, except what this very flow run already
    recomputed (its retry must not start that over); an artifact to recompute never counts as verified."""
    asked = stages_from(plans, recompute_from)
    recompute = {p.stage for p in plans if p.stage in asked and produced_by(p) != this_run}
    verified = {p.stage: p.stage not in recompute and verifies(p) for p in plans}
    return recompute, verified


def stages_from(plans: list[StagePlan], name: str | None) -> set[str]:
    """The planned stages at or after `name` in pipeline order (none for None)."""
    if name is None:
        return set()
    get_stage(name)   # a clear error for an unknown name
    first = STAGE_NAMES.index(name)
    return {p.stage for p in plans if STAGE_NAMES.index(p.stage) >= first}


def produced_by(plan: StagePlan) -> str | None:
    """Flow run id recorded in the artifact's manifest (None when absent)."""
    manifest = read_manifest(plan.artifact_dir) or {}
    return manifest.get("flow_run_id")


def verifies(plan: StagePlan) -> bool:
    """Is the plan's artifact on disk, its manifest verifying file by file?"""
    return bool(verify(plan.artifact_dir, plan.hash))


# -----------------------------------------------------------------------------
# One stage: the call of its task, and what the flow does around it

def call_stage_task(plan: StagePlan, *, recompute: bool, verified: bool, upstream: dict[str, Any], logger,
                    preset: str = "custom", store: str | None = None, run_id: str | None = None) -> StageOutcome:
    """Run one stage's task and say how it ended. `verified` is this run's verdict on the artifact on disk (a
    cache hit counts only if it verifies); `upstream` maps input fields to the upstream task runs' states.
    `recompute` (recompute_from) builds the artifact beside the one it replaces and swaps it in once it
    verifies (flows/recompute.py); the store gets it then, under its own name."""
    launched = plan
    if recompute:
        logger.info(f"{plan.stage}: recomputing as asked (recompute_from) beside {plan.artifact_dir}, which stays "
                    "until the new one verifies")
        launched = stage_beside(plan, str(run_id), logger.info)
    # The tags (for filters and tag concurrency limits) go on task runs that may do work. A verified artifact's
    # task run only reports it Cached: tagged, it would still ask the server for concurrency slots, a request
    # that Prefect's SQLite database sometimes refuses ("database is locked") and the client retries 2 s later.
    tags = [] if verified else [f"stage:{plan.stage}", f"preset:{preset}", f"artifact:{plan.hash}"]
    stage_task = run_stage.with_options(
        name=plan.stage, retries=plan.resources.retries, retry_delay_seconds=plan.resources.retry_delay_seconds,
        tags=tags)
    started = time.monotonic()
    state = stage_task(plan=launched, upstream=upstream, verified=verified, store=None if recompute else store,
                       recompute=recompute, return_state=True)
    seconds = time.monotonic() - started
    if state.is_cancelled():
        return StageOutcome(plan, "Cancelled", seconds, error=state.message or "cancelled", state=state)
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:   # reported in the summary, then re-raised by the caller
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            return StageOutcome(plan, state.name or "Failed", seconds, error=first_line, exception=exc, state=state)
        return StageOutcome(plan, state.name or "Failed", seconds, error="no result", state=state)
    ref = state.result()
    if recompute:
        ref = swap_in(plan, ref, logger.info)
        _keep_recomputed(plan, store, logger)
    return StageOutcome(plan, state.name, seconds, ref=ref, metrics=ref.metrics, state=state,
                        resumed_from=ref.resumed_from)


def _keep_recomputed(plan: StagePlan, store: str | None, logger) -> None:
    """Replace the store's copy of a recomputed artifact (a store that cannot be written costs a warning)."""
    if not store:
        return
    from flows.store import artifact_name, upload_artifact
    try:
        upload_artifact(plan.artifact_dir, store, artifact_name(plan.artifact_dir))
    except Exception as err:
        logger.warning(f"{plan.stage}: could not upload the recomputed artifact to {store}: "
                       f"{type(err).__name__}: {err}")


def _note_cancel(plan: StagePlan, outcome: StageOutcome, logger, recomputing: bool = False) -> None:
    """Rename the run's Cancelled state "Cancelled at <stage> step <n>", once its worker has written it. (A
    recompute's checkpoints are beside the artifact, which stays as it was.)"""
    step = re.search(r"at step (\d+)", outcome.error or "")
    out = staging_dir(plan.artifact_dir) / Path(plan.out_dir).name if recomputing else Path(plan.out_dir)
    checkpoints = sorted(out.glob(plan.checkpoint_glob)) if plan.resume_flag and out.is_dir() else []
    saved = re.search(r"(\d+)", checkpoints[-1].name) if checkpoints else None
    name, message = cancel_note(plan.stage, int(step.group(1)) if step else None,
                                int(saved.group(1)) if saved else None, str(out),
                                recomputing=plan.artifact_dir if recomputing else None)
    logger.warning(f"{name}: {message}")
    try:
        start_cancel_note(str(flow_run.id), name, message)
    except Exception as err:   # the run is Cancelled either way; only its name would be Prefect's
        logger.warning(f"could not name the cancelled run: {type(err).__name__}: {err}")


def _publish(outcomes: list[StageOutcome], plans: list[StagePlan], title: str, config: PipelineConfig,
             logger) -> list[str]:
    """Publish the run summary however the run ended and print its stage table into the log (the report's
    str(): the report card's images have no place in a log); return the regressions it found."""
    try:
        report = publish_summary(outcomes, plans, title, config=config)
    except Exception as err:   # never let the report hide why the run ended
        logger.warning(f"could not publish the run summary: {type(err).__name__}: {err}")
        return []
    print(str(report) or report.markdown)
    return list(report.regressions)


# -----------------------------------------------------------------------------
# How a run ends: a failure's class and sentence as the flow run's state

SENTENCE_CHARS = 600   # a state message is a header line in the UI, not a log


class Regression(Exception):
    """Every stage completed, but the summary found metrics worse than the gate allows."""


# The class of a failure, as the flow run's state name: what the run header and the runs list show
FAILURE_NAMES = {"config": "Bad config", "oom": "Out of memory", "nan": "Loss diverged", "killed": "Killed",
                 "network": "Node lost", "timeout": "Timed out", "plan": "Wrong input", "incomplete": "No metrics",
                 "devices": "Devices lost", "error": "Stage error"}
# A node of a multi-node stage that never started, or whose run ended without a result (flows/multinode.py)
_NODE_LOST = re.compile(r"\bnode \d+ (never started|\(flow run [^)]*\) ended \w+ without a result)")


def failure_name(exc: BaseException) -> str:
    """The class of a failure in a few words ("Out of memory", "Bad config", "Regression"): the state name of
    the run it ended, so the run header and the runs list say what kind of failure it was."""
    if isinstance(exc, StageFailed):
        if _NODE_LOST.search(str(exc).split("\n", 1)[0]):
            return "Node lost"
        return FAILURE_NAMES.get(exc.kind, "Stage error")
    if isinstance(exc, Regression):
        return "Regression"
    if isinstance(exc, PlanError):
        if str(exc).startswith("preflight failed"):
            return "Preflight failed"
        return "Missing inputs" if "run those stages first" in str(exc) else "Bad config"
    if isinstance(exc, (ValidationError, ConfigError)):
        return "Bad config"
    return "Failed"


def failure_sentence(exc: BaseException) -> str:
    """Why a run failed, in one line: the first line of our own errors, which name the stage (and, for a
    stage that failed, its own reason); a pydantic error lists each field and what is wrong with it (an
    unknown field with the closest known names)."""
    if isinstance(exc, ValidationError):
        fields = "; ".join(_field_error(exc.title, e) for e in exc.errors())
        return _clip(f"invalid config ({exc.title}): {fields}")
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)   # str() quotes a KeyError
    lines = str(text).strip().splitlines()
    head = lines[0].strip() if lines else type(exc).__name__
    if isinstance(exc, ConfigError):
        head = f"invalid config: {head}"
    elif not isinstance(exc, (StageFailed, PlanError, Regression)):
        head = f"{type(exc).__name__}: {head}"
    return _clip(head)


def _field_error(title: str, error: dict) -> str:
    """One field's error: "base_eval.eval: Input should be ...", or for a field no model has, "unknown field
    'depht' in base_train; did you mean 'depth'?" (pydantic says only "Extra inputs are not permitted")."""
    where = ".".join(map(str, error["loc"]))
    if error["type"] != "extra_forbidden":
        return f"{where or 'config'}: {error['msg'].removeprefix('Value error, ')}"
    *section, name = map(str, error["loc"])
    place = f" in {'.'.join(section)}" if section else ""
    model = _model_at(PipelineConfig, section) if title == PipelineConfig.__name__ else None
    known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6) or [k for k in known if name in k][:3]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else (
        f"; its fields: {', '.join(known)}" if 0 < len(known) <= 12 else "")
    return f"unknown field {name!r}{place}{hint}"


def _model_at(model: Any, loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model that holds the fields at `loc` under `model` (through dicts and optional values)."""
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part)
            if field is None:
                return None
            model = field.annotation
        elif typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]   # `part` is a key of the dict
        else:
            return None
        if typing.get_origin(model) in (typing.Union, types.UnionType):   # Optional[X]: X
            model = next((a for a in typing.get_args(model) if a is not type(None)), None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _clip(text: str) -> str:
    return text if len(text) <= SENTENCE_CHARS else text[:SENTENCE_CHARS - 3] + "..."


def ended(run: Callable[[], Any]) -> Any:
    """The flow's body, with a failure turned into a Failed state whose message is its one sentence. (A flow
    that raises gets "Flow run encountered an exception: <Type>: <whole message>" from Prefect instead.)
    The exception stays the state's data: in-process callers still get it raised by `state.result()`, or by
    the flow call itself without return_state. Cancellation and interrupts (BaseException) pass through."""
    try:
        return run()
    except Exception as exc:
        sentence = failure_sentence(exc)
        if not isinstance(exc, Regression):
            get_run_logger().error(f"{sentence}\n(the full error follows)", exc_info=exc)
        return Failed(name=failure_name(exc), message=sentence, data=exc)


if __name__ == "__main__":
    full_pipeline(PipelineConfig(preset="demo-cpu"))
