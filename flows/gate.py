"""
The regression gate: this run's key metrics against those of the last Completed run of the same deployment
(or, without one, of the same flow outside deployments) and the same lineage (preset and model depth).
`TOLERANCES` says how much worse a metric may get before the run counts as regressed; metrics measured on
other configs (or, for ChatCORE, other tasks) are shown as not comparable instead.

Each run publishes its record (the `nanopipe-key-metrics` table artifact: one row per metric with its value,
basis and lineage, which people read in the UI and the next run's gate reads back as data through the
Prefect API; nothing is parsed out of text). flows/report.py puts the
gate's table on the report card; flows/pipeline.py ends the run Failed when something regressed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from datetime import timezone
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, ValidationError

from flows.plan import StagePlan
from nanopipe.configs.base import model_tag_for_depth
from nanopipe.configs.chat_eval import chatcore_of

if TYPE_CHECKING:
    from flows.report import StageOutcome

KEY_METRICS_KEY = "nanopipe-key-metrics"
TREND_RUNS = 30   # how many runs of a lineage the report card's trend shows (flows/trend.py), this one included
NO_EARLIER_RUN = "no earlier run of this lineage to compare with"
# How the chat evaluations are named in metric names and in the report's chat table ("SFT GSM8K")
CHAT_COLUMNS = {"chat_eval_mid": "MID", "chat_eval_sft": "SFT", "chat_eval_rl": "RL"}


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger inside a run (its lines reach the UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def number(value) -> float | None:
    """A finite int or float as float; None for anything else (missing, NaN, bool, text)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def fmt(value, digits: int = 4) -> str:
    """A metric for a table: floats to `digits` significant digits, None as "-"."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Tolerance:
    """How much worse a metric may get before the run counts as regressed.

    val bpb may rise 1% relative: reruns of one config differ by well under that (same seed, same data
    order), and a real loss of quality, e.g. a broken learning-rate schedule, costs several percent.
    CORE, ChatCORE and GSM8K accuracy may drop 0.02 absolute: nanochat's d20 scores CORE ~0.22, GSM8K
    ~0.05-0.1 after RL, and 0.02 is about two binomial standard errors of GSM8K's 1319 problems at those
    accuracies, so noise stays inside and a halved score does not."""
    higher_is_better: bool
    relative: float = 0.0
    absolute: float = 0.0

    def limit(self, previous: float) -> float:
        """The worst value still accepted."""
        allowed = self.absolute + self.relative * abs(previous)
        return previous - allowed if self.higher_is_better else previous + allowed

    def describe(self) -> str:
        sign = "-" if self.higher_is_better else "+"
        return f"{sign}{100 * self.relative:g}%" if self.relative else f"{sign}{self.absolute:g}"


# by the last word of the key metric's name ("SFT GSM8K" -> GSM8K)
TOLERANCES = {"bpb": Tolerance(False, relative=0.01), "CORE": Tolerance(True, absolute=0.02),
              "ChatCORE": Tolerance(True, absolute=0.02), "GSM8K": Tolerance(True, absolute=0.02)}


def config_digest_upto(plans: list[StagePlan], stage: str) -> str:
    """A digest of the configs (the hashed fields, as given: no code version, no upstream hash) of `stage` and
    every stage before it. Two runs compare on a metric only when this matches: a run that trains for
    fewer steps on purpose is another experiment, not a regression; a code change keeps the digest."""
    names = [p.stage for p in plans]
    upto = plans[:names.index(stage) + 1] if stage in names else plans
    text = json.dumps({p.stage: p.semantic_config for p in upto}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_metrics(outcomes: list[StageOutcome]) -> tuple[dict[str, float], dict[str, str]]:
    """The gate's metrics ({"base val bpb": 1.9, "CORE": .., "SFT ChatCORE": .., "SFT GSM8K": ..}, those
    present) and what each was measured on: the configs that produced it (config_digest_upto) and, for
    ChatCORE, its tasks."""
    m = {o.plan.stage: o.metrics for o in outcomes if o.metrics}
    plans = [o.plan for o in outcomes]
    base, train = m.get("base_eval", {}), m.get("base_train", {})
    values = {"base val bpb": _first(base.get("val_bpb"), train.get("val_bpb")),
              "CORE": _first(base.get("core_metric"), train.get("core_metric"))}
    base_stage = "base_eval" if base else "base_train"
    basis = {"base val bpb": config_digest_upto(plans, base_stage), "CORE": config_digest_upto(plans, base_stage)}
    for stage, label in CHAT_COLUMNS.items():
        chat = m.get(stage, {})
        # nanochat's ChatCORE (all six tasks) and the partial one (other tasks) are different metrics
        values[f"{label} ChatCORE"], values[f"{label} partial ChatCORE"] = map(number, chatcore_of(chat))
        values[f"{label} GSM8K"] = number((chat.get("accuracy") or {}).get("GSM8K"))
        digest = config_digest_upto(plans, stage)
        basis[f"{label} GSM8K"] = digest
        basis[f"{label} ChatCORE"] = basis[f"{label} partial ChatCORE"] = digest + (
            f" on {','.join(chat['chatcore_tasks'])}" if chat.get("chatcore_tasks") else "")
    values = {k: v for k, v in values.items() if v is not None}
    return values, {k: v for k, v in basis.items() if k in values}


def _first(*values) -> float | None:
    return next((v for v in map(number, values) if v is not None), None)


def lineage(config, plans: list[StagePlan]) -> str:
    """What makes two runs comparable: preset and model depth, e.g. 'demo-cpu-d4'."""
    base = next((p for p in plans if p.stage == "base_train"), None)
    depth = base.config.get("depth") if base else getattr(getattr(config, "base_train", None), "depth", None)
    model = model_tag_for_depth(depth) if depth is not None else "d?"   # no base model in sight
    return f"{getattr(config, 'preset', None) or 'custom'}-{model}"


@dataclass
class GateResult:
    regressions: list[str]
    rows: list[tuple[str, float | None, float, str, str]]   # metric, previous, now, tolerance, verdict
    note: str                                               # compared with what, or why nothing
    # the lineage's earlier Completed runs, newest first (at most TREND_RUNS - 1): {"run", "id", "ended",
    # "metrics"} each, for the report card's trend (flows/trend.py)
    history: list[dict] = field(default_factory=list)


def compare(current: dict[str, float], current_basis: dict[str, str], previous: dict | None,
            against: str = "the last completed run") -> GateResult:
    """Each key metric against the previous record ({"metrics": ..., "basis": ...}) and its tolerance."""
    if previous is None:
        return GateResult([], [], NO_EARLIER_RUN)
    before, before_basis = previous.get("metrics") or {}, previous.get("basis") or {}
    regressions, rows = [], []
    for name, now in current.items():
        tolerance = TOLERANCES.get(name.split()[-1])
        old = number(before.get(name))
        if tolerance is None or old is None:
            continue
        if before_basis.get(name) != current_basis.get(name):
            rows.append((name, old, now, tolerance.describe(), "not comparable (other config or tasks)"))
            continue
        worse = now < tolerance.limit(old) if tolerance.higher_is_better else now > tolerance.limit(old)
        rows.append((name, old, now, tolerance.describe(), "regressed" if worse else "ok"))
        if worse:
            change = (f"{100 * (now - old) / old:+.2f}%" if tolerance.relative and old else f"{now - old:+.4f}")
            verb = "dropped" if tolerance.higher_is_better else "rose"
            regressions.append(f"{name} {verb} from {old:.4f} to {now:.4f} ({change}, tolerance "
                               f"{tolerance.describe()}) since {against}")
    note = f"Compared with {against}" if rows else f"No key metric in common with {against}"
    return GateResult(regressions, rows, note)


def gate_section(gate: GateResult) -> list[str]:
    lines = ["## Regression gate", "", gate.note[:1].upper() + gate.note[1:] + ".", ""]
    if gate.rows:
        lines += ["| metric | previous | now | tolerance | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {fmt(old, 5)} | {fmt(now, 5)} | {tol} | {v} |" for n, old, now, tol, v in gate.rows]
        lines.append("")
    return lines


class KeyMetricRow(BaseModel):
    """One row of the key-metrics record: a metric of this run, what it was measured on, its lineage."""

    lineage: str = Field(description="preset and model depth, e.g. demo-cpu-d4")
    metric: str = Field(description="e.g. 'SFT ChatCORE'")
    value: float
    basis: str | None = Field(None, description="the configs (and tasks) it was measured on")


def key_metrics_table(record: dict) -> list[dict]:
    """The record ({"lineage", "metrics", "basis"}) as the rows of a table artifact."""
    return [KeyMetricRow(lineage=record["lineage"], metric=name, value=value,
                         basis=record["basis"].get(name)).model_dump() for name, value in record["metrics"].items()]


def record_from_table(data: str | None) -> dict | None:
    """The record a key-metrics table artifact holds ({"lineage", "metrics", "basis"}); None when it holds
    none (no rows, or rows of another shape)."""
    try:
        rows = [KeyMetricRow.model_validate(row) for row in json.loads(data or "null") or []]
    except (json.JSONDecodeError, TypeError, ValidationError):
        return None
    if not rows or len({r.lineage for r in rows}) != 1:
        return None
    return {"lineage": rows[0].lineage, "metrics": {r.metric: r.value for r in rows},
            "basis": {r.metric: r.basis for r in rows if r.basis is not None}}


def lineage_history(lineage_name: str, flow_run_id, deployment_id, flow_name: str,
                    limit: int = TREND_RUNS - 1) -> list[dict]:
    """The key-metrics records of the newest `limit` Completed earlier runs of the same deployment (or of the
    same flow outside deployments) and lineage, newest first, read through the Prefect API: {"run": its name,
    "id", "ended": "2026-12-05 03:00 UTC", "lineage", "metrics", "basis"} each; [] when there is none."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                                DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterId,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
                                id=FlowRunFilterId(not_any_=[flow_run_id]) if flow_run_id else None,
                                deployment_id=None if deployment_id else FlowRunFilterDeploymentId(is_null_=True))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=runs_filter, sort=FlowRunSort.END_TIME_DESC, limit=100,
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])) if deployment_id else None,
            flow_filter=None if deployment_id else FlowFilter(name=FlowFilterName(any_=[flow_name])))
        if not runs:
            return []
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[KEY_METRICS_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))
    records = {a.flow_run_id: record_from_table(a.data if isinstance(a.data, str) else None) for a in artifacts}
    history = []
    for run in runs:   # newest first
        record = records.get(run.id)
        if record and record.get("lineage") == lineage_name:
            ended = run.end_time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if run.end_time else ""
            history.append({"run": run.name, "id": str(run.id), "ended": ended, **record})
    return history[:limit]


def regression_gate(current: dict[str, float], basis: dict[str, str], lineage_name: str) -> GateResult:
    """compare() against the previous record of the lineage; never raises (a Prefect API error or a run
    outside Prefect is a note in the report, not a failure of the run)."""
    from prefect.runtime import deployment, flow_run
    if not current:
        return GateResult([], [], "no key metric in this run (base val bpb, CORE, ChatCORE, GSM8K) to compare")
    if not flow_run.id:
        return GateResult([], [], "not inside a flow run: no earlier run to look up")
    try:
        history = lineage_history(lineage_name, flow_run.id, deployment.id, flow_run.flow_name)
    except Exception as err:   # the API is down or answers nonsense: the report still goes out
        run_logger().warning(f"regression gate: could not read earlier runs: {type(err).__name__}: {err}")
        return GateResult([], [], f"could not read earlier runs from the Prefect API ({type(err).__name__}: {err})")
    previous = history[0] if history else None
    against = f"run {previous['run']} ({previous['id']})" if previous else ""
    return replace(compare(current, basis, previous, against), history=history)


def tag_lineage(lineage_name: str) -> None:
    """Tag the flow run `lineage:<preset>-d<depth>`, so the UI's filters find a lineage's runs."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    if not flow_run.id:
        return
    tag = f"lineage:{lineage_name}"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        if tag not in (run.tags or []):
            client.update_flow_run(flow_run.id, tags=[*(run.tags or []), tag])
