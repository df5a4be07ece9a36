"""
What a person sees of a pipeline run in the Prefect UI after it ends: the summary of every stage and the
metrics table (and, built on them, the report card).

`StageOutcome` is what the flow knows of each stage when the run ends, however it ended. A stage's
progress history (one JSON object per progress line, appended across attempts so a resumed stage keeps
the steps before its resume) is `progress.jsonl` in its artifact directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import ArtifactRef
from flows.plan import StagePlan
from flows.stages import get_stage

PROGRESS_FILE = "progress.jsonl"


@dataclass
class StageOutcome:
    plan: StagePlan
    status: str                         # Cached, Completed, Failed, Cancelled, Interrupted, Not run
    seconds: float = 0.0                # wall time in this flow run
    ref: ArtifactRef | None = None
    error: str = ""
    metrics: dict = field(default_factory=dict)
    exception: BaseException | None = None
    state: Any = None                   # the task run's final state: downstream stages link to it
    resumed_from: int | None = None     # the checkpoint step a (re)run of the stage resumed from



def _key_metrics(outcome: StageOutcome) -> dict:
    """The stage's key metrics as scalars; a dict of scalars (e.g. accuracy per task) shows as `name.key`."""
    def scalar(v):
        return isinstance(v, (int, float, str)) and not isinstance(v, bool)
    flat = {}
    for k, v in outcome.metrics.items():
        if scalar(v):
            flat[k] = v
        elif isinstance(v, dict):
            flat.update({f"{k}.{sub}": x for sub, x in v.items() if scalar(x)})
    keys = get_stage(outcome.plan.stage).key_metrics
    if not keys:
        return flat
    return {k: v for k, v in flat.items() if k in keys or k.split(".", 1)[0] in keys}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def publish_summary(outcomes: list[StageOutcome], plans: list[StagePlan], title: str, config=None) -> str:
    """Markdown artifact (stages, cached or run, durations, metrics, paths) and a table artifact of metrics."""
    done = {o.plan.stage: o for o in outcomes}
    lines = [f"# {title}", "", "| stage | status | wall time | produced in | key metrics | artifact |",
             "|---|---|---|---|---|---|"]
    table = []
    for plan in plans:
        o = done.get(plan.stage, StageOutcome(plan, "Not run"))
        metrics = _key_metrics(o)
        produced = f"{o.ref.seconds:.1f} s" if o.ref else ""
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()) or o.error
        lines.append(f"| {plan.stage} | {o.status} | {o.seconds:.1f} s | {produced} | {shown} | "
                     f"`{plan.artifact_dir}` |")
        # long format (stage, metric, value): the UI takes a table's columns from its first row, so one
        # row per stage with each stage's own columns would hide every metric the first stage lacks
        table.append({"stage": plan.stage, "metric": "status", "value": o.status})
        table.append({"stage": plan.stage, "metric": "seconds", "value": round(o.seconds, 2)})
        table += [{"stage": plan.stage, "metric": k, "value": v} for k, v in metrics.items()]
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="nanopipe-summary", description=title)
    create_table_artifact(table, key="nanopipe-metrics", description=f"{title}: metrics per stage")
    return markdown
