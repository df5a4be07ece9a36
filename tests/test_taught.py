"""The "What each stage taught" table: statistics, rows from stage metrics, markdown, report card."""

from __future__ import annotations

import math

import pytest

from flows.taught import SIGNAL_Z, Taught, taught_markdown, taught_rows, uniform_bpb
from nanopipe.stats import difference, standard_error, wilson_interval, z_score


# -----------------------------------------------------------------------------
# Statistics

def test_wilson_interval_matches_known_values():
    # 113/256: Wilson's 95% interval, computed by hand from the formula (p=0.4414, z=1.96)
    low, high = wilson_interval(113, 256)
    assert low == pytest.approx(0.3820, abs=5e-4) and high == pytest.approx(0.5026, abs=5e-4)
    # the interval is not empty at 0 and n successes, and stays inside [0, 1]
    assert wilson_interval(0, 64)[0] == 0.0 and wilson_interval(0, 64)[1] == pytest.approx(0.0565, abs=5e-4)
    assert wilson_interval(64, 64)[1] == 1.0 and wilson_interval(64, 64)[0] == pytest.approx(0.9435, abs=5e-4)
    with pytest.raises(AssertionError):
        wilson_interval(3, 0)


def test_difference_and_its_standard_error():
    gain, se = difference(0.25, 256, 0.60, 256)
    assert gain == pytest.approx(0.35)
    assert se == pytest.approx(math.sqrt(0.25 * 0.75 / 256 + 0.6 * 0.4 / 256))
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert z_score(0.1, 0.05) == pytest.approx(2.0) and z_score(0.0, 0.0) is None


# -----------------------------------------------------------------------------
# Rows from the stages' metrics

def _eval(passed: dict[str, int], total: int = 256, chance=None, **extra) -> dict:
    chance = chance or {}
    return {"tasks": {name: {"passed": p, "total": total, "accuracy": p / total,
                             "chance_accuracy": chance.get(name, 0.0), **extra.get(name, {})}
                      for name, p in passed.items()}}


METRICS = {
    "tok_eval": {"vocab_size": 2048, "val_bytes_per_token": 3.0},
    "base_train": {"initial_val_bpb": 3.4, "val_bpb": 2.1, "val_tokens": 16384},
    "mid_train": {"initial_val_bpb": 4.3, "val_bpb": 0.3, "val_tokens": 16000},
    "chat_eval_mid": _eval({"Arithmetic": 100, "MultipleChoice": 64, "SpellingBee": 80},
                           chance={"MultipleChoice": 0.25},
                           Arithmetic={"format_passed": 250}),
    "chat_eval_sft": _eval({"Arithmetic": 140, "MultipleChoice": 70, "SpellingBee": 90},
                           chance={"MultipleChoice": 0.25},
                           SpellingBee={"majority_answer": "1", "majority_answer_rate": 0.69}),
    "chat_eval_rl": _eval({"Arithmetic": 200}),
    "chat_rl": {"task": "builtin-arithmetic", "evals": [{"step": 0, "pass@1": 0.70, "problems": 256},
                                                        {"step": 30, "pass@1": 0.75, "problems": 256},
                                                        {"step": 60, "pass@1": 0.85, "problems": 256}]},
}


def test_rows_cover_every_stage_with_before_and_after():
    rows = {(r.stage, r.metric): r for r in taught_rows(METRICS)}
    base = rows["base_train", "val bits per byte"]
    assert (base.before, base.after, base.n) == (3.4, 2.1, 16384)
    assert base.gain == pytest.approx(1.3) and base.verdict == "learned"
    assert base.chance == pytest.approx(11 / 3.0)   # log2(2048) bits per token over 3 bytes per token
    mid = rows["mid_train", "chat-format val bits per byte"]
    assert mid.gain == pytest.approx(4.0) and mid.verdict == "learned"
    fmt = rows["mid_train", "Arithmetic: calculator call + '#### N' line"]
    assert fmt.after == pytest.approx(250 / 256) and fmt.before is None and fmt.verdict == "-"

    arithmetic = rows["chat_sft", "Arithmetic accuracy"]
    assert (arithmetic.before, arithmetic.after, arithmetic.n) == (100 / 256, 140 / 256, 256)
    gain, se = difference(100 / 256, 256, 140 / 256, 256)
    assert arithmetic.gain == pytest.approx(gain) and arithmetic.z == pytest.approx(gain / se)
    assert arithmetic.z > SIGNAL_Z and arithmetic.verdict == "signal"
    assert arithmetic.interval == wilson_interval(140, 256)
    # +6 of 256 on multiple choice is noise, not signal
    assert rows["chat_sft", "MultipleChoice accuracy"].verdict == "within noise"
    assert rows["chat_sft", "MultipleChoice accuracy"].chance == 0.25
    rl = rows["chat_rl", "Arithmetic accuracy"]
    assert rl.before == 140 / 256 and rl.after == 200 / 256 and rl.verdict == "signal"
    # RL was evaluated on Arithmetic only: no RL row for the other tasks
    assert ("chat_rl", "MultipleChoice accuracy") not in rows
    sampled = rows["chat_rl", "Arithmetic pass@1, one sampled answer"]
    assert (sampled.before, sampled.after, sampled.n) == (0.70, 0.85, 256)   # step 0 and the last step
    assert sampled.z == pytest.approx(0.15 / math.hypot(math.sqrt(.7 * .3 / 256), math.sqrt(.85 * .15 / 256)))
    # no step-0 evaluation, no row
    late = {"chat_rl": {"evals": [{"step": 30, "pass@1": 0.7, "problems": 8}, {"step": 60, "pass@1": 0.9,
                                                                                 "problems": 8}]}}
    assert taught_rows(late) == []


def test_a_drop_is_called_no_gain_and_missing_stages_give_no_rows():
    metrics = {"chat_eval_mid": _eval({"Arithmetic": 150}), "chat_eval_sft": _eval({"Arithmetic": 100})}
    (row,) = taught_rows(metrics)
    assert row.gain < 0 and row.verdict == "no gain"
    assert taught_rows({}) == [] and taught_markdown([]) == []
    # an evaluation with no "before" still shows its score, with no gain
    (alone,) = taught_rows({"chat_eval_sft": _eval({"Arithmetic": 100})})
    assert alone.before is None and alone.gain is None and alone.verdict == "-"


def test_uniform_bpb_needs_vocabulary_and_compression():
    assert uniform_bpb({"vocab_size": 1024, "val_bytes_per_token": 2.5}) == pytest.approx(10 / 2.5)
    assert uniform_bpb({"vocab_size": 1024}) is None


def test_markdown_shows_n_chance_interval_gain_and_baseline():
    text = "\n".join(taught_markdown(taught_rows(METRICS)))
    assert text.startswith("## What each stage taught")
    sft_row = next(line for line in text.splitlines() if line.startswith("| chat_sft | Arithmetic accuracy"))
    cells = [c.strip() for c in sft_row.strip("|").split("|")]
    low, high = wilson_interval(140, 256)
    assert cells[3:8] == ["256", "0.0%", "39.1%", "54.7%", f"{100 * low:.1f}-{100 * high:.1f}%"]
    assert cells[8] == "+15.6 pts" and cells[10] == "signal"
    base_row = next(line for line in text.splitlines() if line.startswith("| base_train"))
    assert "| 3.400 | 2.100 |" in base_row and "-1.300" in base_row
    assert "always answering 1 scores 69.0%" in text


def test_report_card_carries_the_table_between_stages_and_tokenizer(tmp_path):
    from flows.artifacts import ArtifactRef
    from flows.config import PipelineConfig
    from flows.plan import plan_pipeline
    from flows.report import StageOutcome, report_card

    config = PipelineConfig.model_validate({"preset": "demo-cpu", "run_rl": True})
    plans = plan_pipeline(config, home=tmp_path / "home")
    outcomes = [StageOutcome(p, "Completed", 1.0, metrics=METRICS.get(p.stage, {}),
                             ref=ArtifactRef(stage=p.stage, hash=p.hash, path=p.artifact_dir,
                                             metrics=METRICS.get(p.stage, {}), seconds=1.0)) for p in plans]
    card = report_card("demo", outcomes, plans, {"gpus": []}, config=config)
    assert card.index("## Stages") < card.index("## What each stage taught") < card.index("## Tokenizer")
    assert "| chat_rl | Arithmetic accuracy | Arithmetic (held out) | 256 |" in card
    # no metrics, no table
    empty = [StageOutcome(p, "Completed", 1.0) for p in plans]
    assert "What each stage taught" not in report_card("demo", empty, plans, {"gpus": []}, config=config)
