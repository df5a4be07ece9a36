"""
The nanopipe pipeline as Prefect flows: tokenizer -> base -> mid -> SFT -> optional RL, with evaluations.

    nanopipe run --preset demo-cpu                      # the whole pipeline, in-process (embedded server)
    nanopipe stage base_train --preset demo-cpu         # one stage as its own flow
    python -c "from flows.pipeline import full_pipeline; full_pipeline({'preset': 'demo-cpu'})"

Each step is the `run_stage` task over a plan (flows/plan.py). A step whose artifact verifies comes back
Cached; a re-run after a failure therefore executes only the failed step onward, and the failed step
resumes from its checkpoints. `recompute_from` forces a step and everything after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.artifacts import ArtifactRef, artifact_lock, discard
from flows.config import PipelineConfig, StageName
from flows.plan import PlanError, StagePlan, is_complete, plan_pipeline, preflight, produced_by, steps_from
from flows.stages import get_step
from flows.tasks import result_storage, run_stage


@dataclass
class StepOutcome:
    plan: StagePlan
    status: str                         # Cached, Completed, Failed, Interrupted, Not run
    seconds: float = 0.0                # wall time in this flow run
    ref: ArtifactRef | None = None
    error: str = ""
    metrics: dict = field(default_factory=dict)
    exception: BaseException | None = None


def execute(plan: StagePlan, *, force: bool, storage, logger) -> StepOutcome:
    """Run one step's task; a cache hit counts only if the artifact on disk still verifies."""
    if force:
        logger.info(f"{plan.step}: recomputing as asked (recompute_from); discarding {plan.artifact_dir}")
        with artifact_lock(plan.artifact_dir, on_wait=logger.info):
            discard(plan.artifact_dir)
    complete = not force and is_complete(plan)
    stage_task = run_stage.with_options(
        name=plan.step, retries=plan.resources.retries, retry_delay_seconds=plan.resources.retry_delay_seconds,
        result_storage=storage, refresh_cache=not complete)
    started = time.monotonic()
    state = stage_task(plan=plan, return_state=True)
    seconds = time.monotonic() - started
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:   # reported in the summary, then re-raised by the caller
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            return StepOutcome(plan, state.name or "Failed", seconds, error=first_line, exception=exc)
        return StepOutcome(plan, state.name or "Failed", seconds, error="no result")
    ref = state.result()
    return StepOutcome(plan, state.name, seconds, ref=ref, metrics=ref.metrics)


def _key_metrics(outcome: StepOutcome) -> dict:
    keys = get_step(outcome.plan.step).key_metrics
    scalars = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return {k: scalars[k] for k in keys if k in scalars} if keys else scalars


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def publish_summary(outcomes: list[StepOutcome], plans: list[StagePlan], title: str) -> str:
    """Markdown artifact (stages, cached or run, durations, metrics, paths) and a table artifact of metrics."""
    done = {o.plan.step: o for o in outcomes}
    lines = [f"# {title}", "", "| stage | status | wall time | produced in | key metrics | artifact |",
             "|---|---|---|---|---|---|"]
    table = []
    for plan in plans:
        o = done.get(plan.step, StepOutcome(plan, "Not run"))
        metrics = _key_metrics(o)
        produced = f"{o.ref.seconds:.1f} s" if o.ref else ""
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()) or o.error
        lines.append(f"| {plan.step} | {o.status} | {o.seconds:.1f} s | {produced} | {shown} | "
                     f"`{plan.artifact_dir}` |")
        table.append({"stage": plan.step, "status": o.status, "seconds": round(o.seconds, 2),
                      **{k: v for k, v in metrics.items()}})
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="nanopipe-summary", description=title)
    create_table_artifact(table, key="nanopipe-metrics", description=f"{title}: metrics per stage")
    return markdown


def run_steps(plans: list[StagePlan], config: PipelineConfig, title: str) -> dict[str, ArtifactRef]:
    """Preflight what will run, then run the steps in order, publishing a summary however it ends."""
    logger = get_run_logger()
    recompute = steps_from(plans, config.recompute_from)
    this_run = flow_run.id
    # a flow-run retry must not recompute what this very run already recomputed
    force = {p.step for p in plans if p.step in recompute and produced_by(p) != this_run}
    pending = [p for p in plans if p.step in force or not is_complete(p)]
    for p in plans:
        state = "recompute" if p.step in force else ("run" if p in pending else "cached")
        logger.info(f"plan: {p.step:<10} {state:<9} {p.artifact_dir}")
    preflight(pending, log=logger.info)
    storage = result_storage(config.result_storage)
    outcomes: list[StepOutcome] = []
    try:
        for plan in plans:
            started = time.monotonic()
            try:
                outcome = execute(plan, force=plan.step in force, storage=storage, logger=logger)
            except BaseException:   # cancelled or killed mid-stage: say so in the summary, then go on unwinding
                outcomes.append(StepOutcome(plan, "Interrupted", time.monotonic() - started))
                raise
            outcomes.append(outcome)
            if outcome.exception is not None:
                raise outcome.exception
            if outcome.ref is None:
                raise RuntimeError(f"stage {plan.step} ended {outcome.status}: {outcome.error}")
    finally:
        try:
            print(publish_summary(outcomes, plans, title))
        except Exception as err:   # never let the report hide why the run ended
            logger.warning(f"could not publish the run summary: {type(err).__name__}: {err}")
    return {o.plan.step: o.ref for o in outcomes}


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, ArtifactRef]:
    """The whole pipeline: validate and dry-run every stage first, then run (or reuse) each in order."""
    plans = plan_pipeline(config)
    return run_steps(plans, config, title=f"nanopipe pipeline ({config.preset or 'custom'})")


@flow(name="stage", flow_run_name="{stage}", log_prints=True)
def stage_flow(stage: StageName, config: PipelineConfig) -> ArtifactRef:
    """One stage as its own flow. Its inputs must already exist (run the upstream stages first)."""
    step = get_step(stage)
    config = config.model_copy(update={"stop_after": None, **({step.when: True} if step.when else {})})
    plans = {p.step: p for p in plan_pipeline(config)}
    plan = plans[stage]
    missing = [f"{up['step']} ({up['path']})" for up in plan.upstream.values() if not is_complete(plans[up["step"]])]
    if missing:
        raise PlanError(f"stage {stage} needs the artifacts of {', '.join(missing)}: run those stages first "
                        f"(nanopipe stage <name> with the same config) or the full pipeline")
    return run_steps([plan], config, title=f"nanopipe stage {stage} ({config.preset or 'custom'})")[stage]


if __name__ == "__main__":
    full_pipeline(PipelineConfig(preset="demo-cpu"))
