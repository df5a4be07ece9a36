"""
What a person sees of a pipeline run in the Prefect UI after it ends, however it ended:

    nanopipe-report        the report card: regressions first, environment, every stage's status and wall
                           time, estimated cost, what each stage taught (flows/taught.py), tokenizer, base
                           model, one table of chat metrics, curves (also written to NANOPIPE_HOME/report.md);
                           published last, to be first on the run's Artifacts tab (flows/card_first.py)
    nanopipe-summary       the stages with their key metrics and artifact paths
    nanopipe-metrics       every key metric in long format (stage, metric, value)
    nanopipe-key-metrics   the metrics the regression gate compares (and the trend's tokens per second and wall
                           time), a table the next runs read back as data
    <stage>-curves         a training stage's loss / val bpb / reward curves (e.g. base-train-curves)
    <stage>-samples        what a stage's model wrote (base-eval-samples, chat-eval-sft-samples, ...)

Keyed artifacts keep every version, so the Artifacts page shows the latest of each across runs.

`StageOutcome` is what the flow knows of each stage when the run ends. A stage's progress history (one JSON
object per progress line, appended across attempts) is `progress.jsonl` in its artifact directory.

The regression gate (flows/gate.py) compares the run's key metrics with the lineage's last Completed run; the
trend (flows/trend.py) shows them over the lineage's last 30 runs, under the gate's verdict.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import re
import socket
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

import nanopipe
from flows.artifacts import PARSE_LOCK, ArtifactRef
from flows.card_first import publish_first
from flows.gate import (CHAT_COLUMNS, KEY_METRICS_KEY, GateResult, fmt, gate_section, key_metrics,
                        key_metrics_table, lineage, number, regression_gate, run_logger, tag_lineage)
from flows.plan import StagePlan
from flows.plots import PROGRESS_FILE, markdown_image, stage_curves
from flows.samples import samples_markdown
from flows.stages import STAGE_NAMES, get_stage
from flows.taught import taught_markdown, taught_rows
from flows.trend import trend_extras, trend_section
from flows.world import segments_line
from nanopipe.common import atomic_write_text
from nanopipe.configs.chat_eval import chatcore_label, chatcore_of
from nanopipe.stats import wilson_interval

REPORT_FILE = "report.md"
DEFAULT_COST_PER_GPU_HOUR = 3.0   # USD, an 8xH100 node at ~$24/h; PipelineConfig.cost_per_gpu_hour overrides it
REPO = Path(__file__).resolve().parents[1]

__all__ = ["PROGRESS_FILE", "RunReport", "StageOutcome", "publish_summary", "samples_markdown"]


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


@dataclass
class RunReport:
    """What publish_summary built. `regressions`: one sentence per key metric worse than the last
    Completed run of the lineage beyond its tolerance (empty when none, or nothing to compare with)."""
    markdown: str                       # the report card
    regressions: list[str]
    summary: str = ""                   # the short stage table (no images): what str() gives, for the log
    key_metrics: dict[str, float] = field(default_factory=dict)
    gate: str = ""                      # what the gate compared with, or why it compared nothing

    def __str__(self) -> str:
        return self.summary


# -----------------------------------------------------------------------------
# Key metrics of a stage (the summary and the metrics table)

def _scalar(v) -> bool:
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def _key_metrics(outcome: StageOutcome) -> dict:
    """The stage's key metrics as scalars; a dict of scalars (e.g. accuracy per task) shows as `name.key`."""
    flat = {}
    for k, v in outcome.metrics.items():
        if _scalar(v):
            flat[k] = v
        elif isinstance(v, dict):
            flat.update({f"{k}.{sub}": x for sub, x in v.items() if _scalar(x)})
    keys = get_stage(outcome.plan.stage).key_metrics
    if not keys:
        return flat
    return {k: v for k, v in flat.items() if k in keys or k.split(".", 1)[0] in keys}


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# -----------------------------------------------------------------------------
# Environment, read without importing torch (seconds and memory the flow process never needs)

def _command(*cmd: str) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _torch_build(name: str) -> str | None:
    """A value of torch/version.py (e.g. `cuda` = "12.8", None for a CPU build), read as text."""
    try:
        spec = importlib.util.find_spec("torch")   # a top-level package: found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        with PARSE_LOCK:   # see flows.artifacts.PARSE_LOCK
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Constant):
            return node.value.value
    return None


def environment(repo: Path = REPO) -> dict[str, Any]:
    """Where and with what this run ran: code commit, host, CPUs, Python, torch, CUDA, GPUs."""
    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    commit = _command("git", "-C", str(repo), "rev-parse", "--short=12", "HEAD")
    dirty = _command("git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no")
    gpus = _command("nvidia-smi", "--query-gpu=name", "--format=csv,noheader")
    return {
        "commit": commit, "dirty": bool(dirty) if commit else None,
        "host": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": installed("torch"), "cuda": _torch_build("cuda"),
        "gpus": [line.strip() for line in (gpus or "").splitlines() if line.strip()],
        "prefect": installed("prefect"),
    }


def environment_section(env: dict[str, Any], plans: list[StagePlan]) -> list[str]:
    if env.get("commit"):
        code = f"`{env['commit']}`" + (" with uncommitted changes" if env.get("dirty") else "")
    else:
        code = "unknown (not a git checkout)"
    gpus = env.get("gpus") or []
    gpu_text = (", ".join(f"{n}x {name}" for name, n in Counter(gpus).items()) if gpus else "none visible")
    rows = [("code commit", code), ("nanopipe", nanopipe.__version__),
            ("host", env.get("host")), ("CPUs", env.get("cpus")), ("platform", env.get("platform")),
            ("Python", env.get("python")), ("torch", env.get("torch")),
            ("CUDA (torch build)", env.get("cuda") or "none (CPU build)"), ("GPUs", gpu_text),
            ("Prefect", env.get("prefect"))]
    return ["## Environment", "", "| | |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in rows], ""]


# -----------------------------------------------------------------------------
# Stages: status, wall time, cost

def status_text(o: StageOutcome) -> str:
    """How the stage ended in this run, in words a person reads in a table."""
    if o.status == "Completed":
        return f"ran, resumed from step {o.resumed_from}" if o.resumed_from is not None else "ran"
    if o.status in ("Failed", "Crashed", "TimedOut"):
        return f"{o.status.lower()}: {o.error}" if o.error else o.status.lower()
    return {"Cached": "cached", "Not run": "not run"}.get(o.status, o.status.lower() + (f": {o.error}" if o.error else ""))


def ran_on_gpu(o: StageOutcome, gpus: list[str]) -> bool:
    """Did the stage run on CUDA? Its metrics' or config's device_type when set; autodetect ('') picks
    CUDA when this host shows GPUs and the stage's environment does not hide them."""
    device = o.metrics.get("device_type") or o.plan.config.get("device_type") or ""
    if device:
        return device == "cuda"
    return bool(gpus) and o.plan.resources.env.get("CUDA_VISIBLE_DEVICES", "0") != ""


def gpu_hours(o: StageOutcome) -> float:
    """Wall time x the GPUs the stage held: every process of a torchrun launch on every node; a plain
    (non-distributed) stage holds one node's GPUs while it runs."""
    res = o.plan.resources
    gpus = res.nproc_per_node * (res.nnodes if o.plan.distributed else 1)
    return o.seconds * gpus / 3600


def _outcomes(outcomes: list[StageOutcome], plans: list[StagePlan]) -> list[StageOutcome]:
    """One outcome per planned stage, in plan order ("Not run" for a stage the run never reached)."""
    done = {o.plan.stage: o for o in outcomes}
    return [done.get(p.stage, StageOutcome(p, "Not run")) for p in plans]


def stages_section(rows: list[StageOutcome], gpus: list[str], rate: float) -> list[str]:
    lines = ["## Stages", "", "| stage | status | wall time | GPU-hours |", "|---|---|---|---|"]
    total_seconds = total_hours = 0.0
    for o in rows:
        spent = o.status not in ("Cached", "Not run") and ran_on_gpu(o, gpus)
        hours = gpu_hours(o) if spent else 0.0
        total_seconds, total_hours = total_seconds + o.seconds, total_hours + hours
        lines.append(f"| {o.plan.stage} | {_cell(status_text(o))} | {_duration(o.seconds)} | "
                     f"{f'{hours:.3f}' if spent else '-'} |")
    lines.append(f"| **total** | | **{_duration(total_seconds)}** | {total_hours:.3f} |")
    lines.append("")
    if total_hours > 0:
        lines.append(f"Estimated cost: {total_hours:.3f} GPU-hours x ${rate:.2f}/GPU-hour = "
                     f"**${total_hours * rate:.2f}** (stages that ran on CUDA in this run; cached stages cost "
                     f"nothing)")
    else:
        lines.append("Estimated cost: CPU run: no GPU cost.")
    shifts = [line for o in rows if o.status == "Completed" and o.ref is not None
              and (line := segments_line(o.plan.stage, o.ref.segments))]
    if shifts:   # a retry resumed on another number of processes (flows/world.py)
        lines += ["", "Resumed on another number of processes:", "", *(f"- {line}" for line in shifts)]
    return lines + [""]


def recomputed_line(rows: list[StageOutcome], recompute_from: str | None) -> list[str]:
    """One line naming the stages this run recomputed on request: those at or after `recompute_from` that ran
    to completion here (a recompute is swapped in before its stage counts as completed, flows/recompute.py)."""
    first = STAGE_NAMES.index(recompute_from) if recompute_from else len(STAGE_NAMES)
    redone = [o.plan.stage for o in rows if o.status == "Completed" and STAGE_NAMES.index(o.plan.stage) >= first]
    if not redone:
        return []
    return [f"Recomputed on request (recompute_from={recompute_from}): {', '.join(redone)}; each new artifact "
            "was swapped in for the old one (if any) only once it verified.", ""]


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


# -----------------------------------------------------------------------------
# Results: tokenizer, base model, chat

CHAT_ROWS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")


def tokenizer_section(metrics: dict[str, dict]) -> list[str]:
    train, evaluation = metrics.get("tok_train", {}), metrics.get("tok_eval", {})
    if not train and not evaluation:
        return []
    lines = ["## Tokenizer", "", f"Vocabulary {fmt(evaluation.get('vocab_size') or train.get('vocab_size'))}; "
             f"validation compression {fmt(evaluation.get('val_bytes_per_token') or train.get('val_bytes_per_token'))}"
             f" bytes per token.", ""]
    compression = evaluation.get("compression") or {}
    encoders = list(dict.fromkeys(name for per_text in compression.values() for name in per_text))
    if compression:
        lines += ["| text (bytes per token) | " + " | ".join(encoders) + " |", "|---" * (len(encoders) + 1) + "|"]
        for text, per_encoder in compression.items():
            cells = [fmt((per_encoder.get(e) or {}).get("bytes_per_token")) for e in encoders]
            lines.append(f"| {text} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def base_section(metrics: dict[str, dict]) -> list[str]:
    train, evaluation = metrics.get("base_train", {}), metrics.get("base_eval", {})
    if not train and not evaluation:
        return []
    rows = [("parameters", train.get("num_params")), ("training tokens", train.get("total_tokens")),
            ("steps", train.get("step")), ("final train loss", train.get("train_loss")),
            ("val bpb (end of training)", train.get("val_bpb")), ("min val bpb", train.get("min_val_bpb")),
            ("train bpb (base_eval)", evaluation.get("train_bpb")), ("val bpb (base_eval)", evaluation.get("val_bpb")),
            ("CORE", evaluation.get("core_metric", train.get("core_metric"))),
            ("tokens per second", train.get("tokens_per_sec")), ("MFU %", train.get("mfu_percent"))]
    lines = ["## Base model", "", "Bits per byte (bpb) here are on pretraining text: val on the pinned validation "
             "shard, train on the training shards. (Mid-training's val bpb, in the table above, is on held-out "
             "chat conversations: other text, not comparable.)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_rounded(name, value)} |" for name, value in rows if value is not None]
    return lines + [""]


def _rounded(name: str, value) -> str:
    """A base-model figure rounded to what it can show: counts and rates as integers, the rest to 4 digits."""
    if isinstance(value, int) or name in ("tokens per second",):
        return f"{value:,.0f}"
    return fmt(value, 4) if isinstance(value, float) else str(value)


def chat_section(metrics: dict[str, dict]) -> list[str]:
    """One table: a row per task that ran (the standard six first), its chance level, and a column per chat
    model (MID, SFT, RL) with each accuracy's n and 95 % interval; the tasks no model was evaluated on are
    named once, below."""
    columns = {label: metrics.get(stage, {}) for stage, label in CHAT_COLUMNS.items()}
    if not any(columns.values()):
        return []
    seen = [t for m in columns.values() for t, v in (m.get("accuracy") or {}).items() if number(v) is not None]
    rows = [t for t in CHAT_ROWS if t in seen] + sorted(set(seen) - set(CHAT_ROWS))
    lines = ["## Chat model", "", "Accuracy on held-out problems: passed/n and the 95 % Wilson interval.", "",
             "| task | chance | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for task in rows:
        chance = next((number(((m.get("tasks") or {}).get(task) or {}).get("chance_accuracy"))
                       for m in columns.values() if ((m.get("tasks") or {}).get(task) or {}).get("chance_accuracy")
                       is not None), None)
        cells = [_accuracy_cell(m, task) for m in columns.values()]
        lines.append(f"| {task} | {'-' if chance is None else f'{100 * chance:.0f}%'} | " + " | ".join(cells) + " |")
    cores = {label: tuple(map(number, chatcore_of(m))) for label, m in columns.items()}
    lines.append("| ChatCORE | | " + " | ".join(fmt(full) for full, _ in cores.values()) + " |")
    if any(partial is not None for _, partial in cores.values()):
        lines.append("| ChatCORE (partial) | | " + " | ".join(fmt(partial) for _, partial in cores.values()) + " |")
        notes = [f"{label}: {chatcore_label(m['chatcore_tasks'])} over {', '.join(m['chatcore_tasks'])}"
                 for label, m in columns.items() if cores[label][1] is not None and m.get("chatcore_tasks")]
        lines += ["", "ChatCORE is nanochat's: the mean centred accuracy over all six of its tasks, given only where "
                  "all six were evaluated. ChatCORE (partial) is that mean over the tasks evaluated instead ("
                  + "; ".join(notes) + "): another number, not comparable with it."]
    unevaluated = [t for t in CHAT_ROWS if t not in rows]
    if unevaluated:
        lines += ["", f"Not evaluated in this run: {', '.join(unevaluated)}."]
    return lines + [""]


def _accuracy_cell(metrics: dict, task: str) -> str:
    """"31.2% (20/64, 20.9-43.9%)": the accuracy, with its n and 95 % interval where the counts are known."""
    accuracy = number((metrics.get("accuracy") or {}).get(task))
    if accuracy is None:
        return "-"
    counts = (metrics.get("tasks") or {}).get(task) or {}
    passed, total = counts.get("passed"), counts.get("total")
    if not (isinstance(passed, int) and isinstance(total, int) and total > 0):
        return f"{100 * accuracy:.1f}%"
    low, high = wilson_interval(passed, total)
    return f"{100 * accuracy:.1f}% ({passed}/{total}, {100 * low:.1f}-{100 * high:.1f}%)"


# -----------------------------------------------------------------------------
# The report card

def report_card(title: str, outcomes: list[StageOutcome], plans: list[StagePlan], env: dict[str, Any],
                config=None, gate: "GateResult | None" = None, curves: dict[str, bytes] | None = None,
                trend: list[str] | None = None) -> str:
    """The run's report card as markdown (pure: everything it shows comes in as arguments; `trend` is the
    lineage's trend section, flows/trend.py)."""
    rows = _outcomes(outcomes, plans)
    rate = getattr(config, "cost_per_gpu_hour", None)
    rate = DEFAULT_COST_PER_GPU_HOUR if rate is None else rate
    metrics = {o.plan.stage: o.metrics for o in rows if o.metrics}
    lines = [f"# {title}", ""]
    if gate is not None and gate.regressions:
        lines += ["**Regressions since the last completed run of this lineage:**", "",
                  *[f"- {sentence}" for sentence in gate.regressions], ""]
    ended = [o for o in rows if o.status not in ("Completed", "Cached", "Not run")]
    if ended:
        lines += [f"**Stage {o.plan.stage} {status_text(o)}**" for o in ended] + [""]
    lines += recomputed_line(rows, getattr(config, "recompute_from", None))
    lines += environment_section(env, plans)
    lines += stages_section(rows, env.get("gpus") or [], rate)
    lines += taught_markdown(taught_rows(metrics))
    lines += tokenizer_section(metrics) + base_section(metrics) + chat_section(metrics)
    if gate is not None:
        lines += gate_section(gate)
    lines += trend or []
    if curves:
        lines += ["## Training curves", ""]
        lines += [markdown_image(png, f"{stage} curves") + "\n" for stage, png in curves.items()]
    return "\n".join(lines).rstrip() + "\n"


def summary_table(title: str, rows: list[StageOutcome]) -> str:
    """Stages, cached or run, durations, key metrics, artifact paths."""
    lines = [f"# {title}", "", "| stage | status | wall time | produced in | key metrics | artifact |",
             "|---|---|---|---|---|---|"]
    for o in rows:
        metrics = _key_metrics(o)
        produced = f"{o.ref.seconds:.1f} s" if o.ref else ""
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in metrics.items()) or o.error
        lines.append(f"| {o.plan.stage} | {o.status} | {o.seconds:.1f} s | {produced} | {_cell(shown)} | "
                     f"`{o.plan.artifact_dir}` |")
    if any("bpb" in k for o in rows if o.plan.stage == "mid_train" for k in _key_metrics(o)):
        lines += ["", "bpb: base_train's and base_eval's on pretraining text (the validation shard), mid_train's on "
                  "held-out chat conversations: other text, not comparable."]
    return "\n".join(lines) + "\n"


def metrics_table(rows: list[StageOutcome]) -> list[dict]:
    """Long format (stage, metric, value): the UI takes a table's columns from its first row, so one row
    per stage with each stage's own columns would hide every metric the first stage lacks."""
    table = []
    for o in rows:
        table.append({"stage": o.plan.stage, "metric": "status", "value": o.status})
        table.append({"stage": o.plan.stage, "metric": "seconds", "value": round(o.seconds, 2)})
        table += [{"stage": o.plan.stage, "metric": k, "value": float(f"{v:.4g}") if isinstance(v, float) else v}
                  for k, v in _key_metrics(o).items()]   # 6345.087024328551 -> 6345.0
    return table


def artifact_key(stage: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes), e.g. base-train-curves."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"{stage}-{kind}".lower()).strip("-")
    assert key, f"no artifact key from {stage!r}, {kind!r}"
    return key


# -----------------------------------------------------------------------------
# Publishing

def report_home(plans: list[StagePlan]) -> Path:
    """The NANOPIPE_HOME the plans were made for (artifacts/<stage>/<dir> under it)."""
    if plans:
        return Path(plans[0].artifact_dir).parents[2]
    from nanopipe.common import get_base_dir
    return get_base_dir()


def _try(what: str, fn, *args, default=None):
    """Run one optional part of the report; a failure is logged and the rest still goes out."""
    try:
        return fn(*args)
    except Exception as err:   # never let a part of the report hide why the run ended
        run_logger().warning(f"report: could not {what}: {type(err).__name__}: {err}")
        return default


CURVES_CACHE = Path("cache") / "curves"   # under NANOPIPE_HOME: drawings by the hash of what they show


def stage_curves_all(rows: list[StageOutcome]) -> dict[str, bytes]:
    curves = {}
    cache_dir = report_home([o.plan for o in rows]) / CURVES_CACHE
    for o in rows:
        if o.status != "Not run":   # a stage this run never reached may have leftovers of another run
            png = _try(f"draw the curves of {o.plan.stage}", stage_curves, o.plan.artifact_dir,
                       f"{o.plan.stage} ({o.plan.tag}-{o.plan.hash[:8]})", cache_dir)
            if png:
                curves[o.plan.stage] = png
    return curves


def publish_summary(outcomes: list[StageOutcome], plans: list[StagePlan], title: str,
                    config=None) -> RunReport:
    """Publish the run's artifacts (see the module docstring) and write NANOPIPE_HOME/report.md.
    `config` is the run's PipelineConfig (cost rate, lineage); the result's `regressions` are for the
    caller to end the run with."""
    rows = _outcomes(outcomes, plans)
    summary = summary_table(title, rows)
    env = _try("read the environment", environment, default={})
    curves = stage_curves_all(rows)
    current, basis = key_metrics(rows)
    name = lineage(config, plans)
    gate = regression_gate(current, basis, name)
    # tokens/s and wall time: in the record for the trend, not compared by the gate (a run with no key metric
    # still records none, so the gate looks past it)
    extras = trend_extras({o.plan.stage: o.metrics for o in rows}, sum(o.seconds for o in rows))
    recorded = {**current, **extras} if current else {}
    trend = _try("draw the lineage's trend", trend_section, gate, recorded, name, report_home(plans), default=[])
    markdown = report_card(title, outcomes, plans, env, config=config, gate=gate, curves=curves, trend=trend)
    _try("write report.md", atomic_write_text, report_home(plans) / REPORT_FILE, markdown)

    # each artifact on its own: one the API refuses never keeps the others (or the gate's answer) back; the
    # report card last, drawn to be first on the run's Artifacts tab (flows/card_first.py)
    markdowns = [("nanopipe-summary", summary, title)]
    markdowns += [(artifact_key(stage, "curves"), f"# {stage} curves\n\n{markdown_image(png, stage + ' curves')}\n",
                   f"{title}: {stage} training curves") for stage, png in curves.items()]
    markdowns += [(artifact_key(o.plan.stage, "samples"), text, f"{title}: {o.plan.stage} samples")
                  for o in rows if (text := samples_markdown(o.plan.stage, o.metrics))]
    for key, text, description in markdowns:
        _try(f"publish {key}", create_markdown_artifact, text, key, description)
    _try("publish nanopipe-metrics", create_table_artifact, metrics_table(rows), "nanopipe-metrics",
         f"{title}: metrics per stage")
    _try(f"publish {KEY_METRICS_KEY}", create_table_artifact,
         key_metrics_table({"lineage": name, "metrics": recorded, "basis": basis}), KEY_METRICS_KEY,
         f"{title}: key metrics for the regression gate")
    _try("publish nanopipe-report", publish_first, "nanopipe-report", markdown, f"{title}: report card")
    _try("tag the run with its lineage", tag_lineage, name)
    return RunReport(markdown, gate.regressions, summary=summary, key_metrics=current, gate=gate.note)
