"""
"What each stage taught": per stage, the metric it exists to improve, before -> after, on held-out data,
with n, the chance level, a 95 % interval and the gain in standard errors, so that a reader sees at a glance
whether a gain is signal. Pure and torch-free: the report card and bench/bench_stage_gains.py both build
their table here from the stages' metrics.json contents.

    rows = taught_rows({"base_train": {...}, "mid_train": {...}, "chat_eval_mid": {...}, ...})
    print("\\n".join(taught_markdown(rows)))

Where each figure comes from:
- base_train: validation bits per byte on the pinned val shard, at step 0 (random weights) and at the end.
- mid_train: loss on held-out chat conversations (the mixture's test split), the base model's (mid's step 0)
  and mid's; and, from chat_eval_mid, how often mid's arithmetic answers use the calculator format and end
  on a `#### N` line.
- chat_sft and chat_rl: held-out task accuracy (greedy) of the model before (chat_eval_mid, chat_eval_sft) and
  after (chat_eval_sft, chat_eval_rl), for every task both evaluated; for chat_rl also its own evaluation at
  its first and last step: pass@1 of one answer sampled at the training temperature, which is what RL
  optimises (when chat_rl evaluates at step 0, i.e. eval_every divides its steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanopipe.stats import difference, wilson_interval, z_score

SIGNAL_Z = 3.0   # a gain of at least this many standard errors is called signal

# which evaluation measures the model before and after each chat training stage
CHAT_GAINS = {"chat_sft": ("chat_eval_mid", "chat_eval_sft"), "chat_rl": ("chat_eval_sft", "chat_eval_rl")}
FORMAT_TASKS = ("Arithmetic", "GSM8K")   # answers in GSM8K's format: calculator calls and a '#### N' line


@dataclass(frozen=True)
class Taught:
    """One row: `stage` moved `metric` from `before` to `after` (None where not measured)."""

    stage: str
    metric: str
    measured_on: str
    before: float | None
    after: float | None
    n: int | None = None                # problems (accuracies) or target tokens (losses)
    chance: float | None = None
    interval: tuple[float, float] | None = None   # 95 % Wilson interval of `after` (accuracies)
    gain_se: float | None = None        # standard error of after - before (accuracies)
    lower_is_better: bool = False
    baseline: str | None = None         # a further reference point, in words

    @property
    def gain(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.before - self.after if self.lower_is_better else self.after - self.before

    @property
    def z(self) -> float | None:
        return None if self.gain is None or self.gain_se is None else z_score(self.gain, self.gain_se)

    @property
    def verdict(self) -> str:
        if self.gain is None:
            return "-"
        if self.gain_se is None:  # losses on thousands of tokens: the size of the change is the evidence
            return "learned" if self.gain > 0 else "no gain"
        z = self.z
        if z is None:
            return "no change"
        return "signal" if z >= SIGNAL_Z else ("no gain" if self.gain <= 0 else "within noise")


def _finite(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def uniform_bpb(tokenizer_metrics: dict) -> float | None:
    """Bits per byte of a model that guesses uniformly over the vocabulary: log2(V) / bytes per token."""
    vocab = _finite(tokenizer_metrics.get("vocab_size"))
    bytes_per_token = _finite(tokenizer_metrics.get("val_bytes_per_token"))
    if not vocab or not bytes_per_token:
        return None
    return math.log2(vocab) / bytes_per_token


def base_rows(metrics: dict[str, dict]) -> list[Taught]:
    train = metrics.get("base_train") or {}
    before, after = _finite(train.get("initial_val_bpb")), _finite(train.get("val_bpb"))
    if after is None:
        return []
    tok = {**(metrics.get("tok_train") or {}), **(metrics.get("tok_eval") or {})}
    return [Taught("base_train", "val bits per byte", "pinned validation shard", before, after,
                   n=train.get("val_tokens"), chance=uniform_bpb(tok), lower_is_better=True)]


def mid_rows(metrics: dict[str, dict]) -> list[Taught]:
    mid, evaluation = metrics.get("mid_train") or {}, metrics.get("chat_eval_mid") or {}
    rows = []
    if _finite(mid.get("val_bpb")) is not None:
        rows.append(Taught("mid_train", "chat-format val bits per byte", "held-out conversations (test split)",
                           _finite(mid.get("initial_val_bpb")), _finite(mid.get("val_bpb")),
                           n=mid.get("val_tokens"), lower_is_better=True,
                           baseline="before = the base model on the same conversations"))
    for task in FORMAT_TASKS:
        result = (evaluation.get("tasks") or {}).get(task) or {}
        passed, total = result.get("format_passed"), result.get("total")
        if isinstance(passed, int) and isinstance(total, int) and total > 0:
            rows.append(Taught("mid_train", f"{task}: calculator call + '#### N' line", f"{task} (held out)",
                               None, passed / total, n=total, interval=wilson_interval(passed, total)))
    return rows


def accuracy_rows(stage: str, before_eval: dict, after_eval: dict) -> list[Taught]:
    """A row per task both evaluations scored: accuracy before -> after, with the gain's standard error."""
    rows = []
    before_tasks, after_tasks = before_eval.get("tasks") or {}, after_eval.get("tasks") or {}
    for task, after in after_tasks.items():
        before = before_tasks.get(task)
        if not _scored(after):
            continue
        p_after = after["passed"] / after["total"]
        row = dict(stage=stage, metric=f"{task} accuracy", measured_on=f"{task} (held out)", before=None,
                   after=p_after, n=after["total"], chance=_finite(after.get("chance_accuracy")),
                   interval=wilson_interval(after["passed"], after["total"]),
                   baseline=_majority_text(after))
        if _scored(before):
            p_before = before["passed"] / before["total"]
            _, se = difference(p_before, before["total"], p_after, after["total"])
            row.update(before=p_before, gain_se=se)
        rows.append(Taught(**row))
    return rows


def _scored(result) -> bool:
    return (isinstance(result, dict) and isinstance(result.get("passed"), int)
            and isinstance(result.get("total"), int) and result["total"] > 0)


def _majority_text(result: dict) -> str | None:
    """Generative tasks: how often the most common reference answer is right (a constant guess)."""
    rate, answer = _finite(result.get("majority_answer_rate")), result.get("majority_answer")
    if rate is None:
        return None
    return f"always answering {answer} scores {100 * rate:.1f}%"


def rl_rows(metrics: dict[str, dict]) -> list[Taught]:
    """chat_rl's own evaluation at its first step (the SFT model) and its last: pass@1 of one sampled answer
    at the training temperature on the same held-out questions, what RL optimises."""
    rl = metrics.get("chat_rl") or {}
    evals = [e for e in rl.get("evals") or [] if isinstance(e, dict) and isinstance(e.get("problems"), int)]
    if len(evals) < 2 or evals[0].get("step") != 0 or evals[0]["problems"] != evals[-1]["problems"]:
        return []
    before, after, n = _finite(evals[0].get("pass@1")), _finite(evals[-1].get("pass@1")), evals[-1]["problems"]
    if before is None or after is None or n <= 0:
        return []
    _, se = difference(before, n, after, n)
    task = {"builtin-arithmetic": "Arithmetic"}.get(rl.get("task"), rl.get("task") or "?")
    return [Taught("chat_rl", f"{task} pass@1, one sampled answer", f"{task} (held out)", before, after, n=n,
                   interval=wilson_interval(round(after * n), n), gain_se=se,
                   baseline=f"chat_rl's evaluation at step 0 (the SFT model) and at step {evals[-1].get('step')}")]


def taught_rows(metrics: dict[str, dict]) -> list[Taught]:
    """Every row the stages' metrics allow, in pipeline order."""
    rows = base_rows(metrics) + mid_rows(metrics)
    for stage, (before, after) in CHAT_GAINS.items():
        if stage == "chat_rl":
            rows += rl_rows(metrics)
        if metrics.get(after):
            rows += accuracy_rows(stage, metrics.get(before) or {}, metrics[after])
    return rows


# -----------------------------------------------------------------------------
# As markdown

def _value(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def taught_markdown(rows: list[Taught]) -> list[str]:
    """The table with a heading and a line on how to read it ([] when there are no rows)."""
    if not rows:
        return []
    lines = ["## What each stage taught", "",
             f"Held-out data only. Accuracies: 95 % Wilson interval; gain in standard errors (z) of the difference "
             f"of two independent accuracies; 'signal' means z >= {SIGNAL_Z:g}. Losses are in bits per byte "
             "(lower is better) over n target tokens.", "",
             "| stage | metric | measured on | n | chance | before | after | 95 % interval | gain | z | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        percent = not row.lower_is_better
        interval = (f"{100 * row.interval[0]:.1f}-{100 * row.interval[1]:.1f}%" if row.interval else "-")
        gain = row.gain
        gain_text = "-" if gain is None else (f"{100 * gain:+.1f} pts" if percent else f"{-gain:+.3f}")
        z = row.z
        n = f"{row.n:,}" if isinstance(row.n, int) else "-"
        lines.append(f"| {row.stage} | {row.metric} | {row.measured_on} | {n} | {_value(row.chance, percent)} | "
                     f"{_value(row.before, percent)} | {_value(row.after, percent)} | {interval} | {gain_text} | "
                     f"{'-' if z is None else f'{z:.1f}'} | {row.verdict} |")
    notes = [f"{row.stage} {row.metric}: {row.baseline}" for row in rows if row.baseline]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return lines + [""]
