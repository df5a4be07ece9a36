"""The run's report card, curves, samples and regression gate (flows/report.py, flows/plots.py, flows/gate.py): the
markdown built from outcomes of real plans with realistic metrics, PNG curves from a progress history with a
resumed stage, the gate's tolerances, and publish_summary inside real flow runs against a temporary Prefect
server (artifacts, report.md, the gate reading the previous run back, a dead API)."""

import base64
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

from flows.artifacts import ArtifactRef
from flows.config import PipelineConfig
from flows.plan import plan_pipeline
from flows.plots import curve_series, markdown_image, read_progress, stage_curves
from tests.test_chat_eval import GSM8K_ROWS, checkpoint, eval_args  # noqa: F401 (a fixture: a tiny chat checkpoint)
from tests.flow_support import prefect_backend  # noqa: F401 (a fixture: the module's temporary Prefect server)
from flows.gate import KEY_METRICS_KEY, compare, key_metrics, key_metrics_table, lineage, record_from_table
from flows.report import (DEFAULT_COST_PER_GPU_HOUR, REPORT_FILE, StageOutcome, publish_summary, report_card,
                          samples_markdown)

H100S = ["NVIDIA H100 80GB HBM3"] * 8
CPU_ENV = {"commit": "0123456789ab", "dirty": True, "host": "box", "cpus": 2, "platform": "Linux-x86_64",
           "python": "3.11.7", "torch": "2.13.0+cpu", "cuda": None, "gpus": [], "prefect": "3.9.1"}
GPU_ENV = {**CPU_ENV, "dirty": False, "torch": "2.13.0+cu128", "cuda": "12.8", "gpus": H100S}

# What the stages write into metrics.json (shapes of nanopipe/stages/*.py, values of a small run)
METRICS = {
    "tok_train": {"vocab_size": 2048, "train_chars": 3_000_000, "val_bytes_per_token": 3.91},
    "tok_eval": {"vocab_size": 2048, "val_bytes_per_token": 3.87,
                 "compression": {"val": {"ours": {"bytes": 200000, "tokens": 51680, "bytes_per_token": 3.87}},
                                 "code": {"ours": {"bytes": 900, "tokens": 400, "bytes_per_token": 2.25}}}},
    "base_train": {"step": 40, "val_bpb": 1.9123, "min_val_bpb": 1.9001, "core_metric": None, "train_loss": 4.01,
                   "num_params": 1_234_567, "total_tokens": 163840, "tokens_per_sec": 2100.5, "mfu_percent": None,
                   "samples": ["The capital of Italy is the the", "Water freezes at a temperature of"]},
    "base_eval": {"step": 40, "train_bpb": 1.88, "val_bpb": 1.9011, "core_metric": 0.1812,
                  "samples": ["The capital of Italy is Rome and"], "unconditioned_samples": ["once upon a ```time"]},
    "mid_train": {"step": 92, "val_loss": 2.1, "val_bpb": 0.61, "train_loss": 2.0},
    "chat_eval_mid": {"accuracy": {"ARC-Easy": 0.3125, "GSM8K": 0.0156, "SpellingBee": 0.5, "Arithmetic": 0.25},
                      "chatcore": None, "chatcore_partial": 0.1102, "chatcore_complete": False,
                      "chatcore_tasks": ["ARC-Easy", "GSM8K", "SpellingBee", "Arithmetic"],
                      "tasks": {"ARC-Easy": {"passed": 20, "total": 64, "chance_accuracy": 0.25},
                                "GSM8K": {"passed": 1, "total": 64, "chance_accuracy": 0.0}},
                      "samples": [{"task": "GSM8K", "question": "Tom has 3 apples and buys 4. How many?",
                                   "reference": "3+4=7 #### 7", "answer": "#### 7", "correct": True},
                                  {"task": "ARC-Easy", "question": "Which gas? A | B", "reference": "B",
                                   "answer": "A", "correct": False}]},
    "chat_sft": {"step": 56, "val_loss": 1.2, "train_loss": 1.1},
    "chat_eval_sft": {"accuracy": {"ARC-Easy": 0.375, "GSM8K": 0.0469, "SpellingBee": 0.625, "Arithmetic": 0.3},
                      "chatcore": 0.1766, "chatcore_tasks": ["ARC-Easy", "GSM8K", "SpellingBee", "Arithmetic"]},
    "chat_rl": {"step": 48, "reward": 0.31, "pass@1": 0.28},
    "chat_eval_rl": {"accuracy": {"GSM8K": 0.0781, "Arithmetic": 0.4}, "chatcore": 0.2391,
                     "chatcore_tasks": ["GSM8K", "Arithmetic"]},
}


def plans_for(tmp_path: Path, **values):
    config = PipelineConfig.model_validate({"preset": "demo-cpu", "run_rl": True, **values})
    return config, plan_pipeline(config, home=tmp_path / "home")


def completed(plan, seconds: float = 60.0, status: str = "Completed", **kw) -> StageOutcome:
    metrics = METRICS.get(plan.stage, {})
    ref = ArtifactRef(stage=plan.stage, hash=plan.hash, path=plan.artifact_dir, metrics=metrics, seconds=seconds)
    return StageOutcome(plan, status, seconds, ref=ref, metrics=metrics, **kw)


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows whose first cell is `first_cell`."""
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]   # not at "\\|"
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


# -----------------------------------------------------------------------------
# Report card

def test_a_completed_cpu_run_shows_every_section_and_one_chat_table(tmp_path):
    config, plans = plans_for(tmp_path)
    outcomes = [completed(p, status="Cached" if p.stage == "tok_train" else "Completed",
                          resumed_from=20 if p.stage == "base_train" else None) for p in plans]
    card = report_card("nanopipe pipeline (demo-cpu)", outcomes, plans, CPU_ENV, config=config)

    assert "| code commit | `0123456789ab` with uncommitted changes |" in card
    assert "| CUDA (torch build) | none (CPU build) |" in card and "| GPUs | none visible |" in card
    assert "| torch | 2.13.0+cpu |" in card and "| CPUs | 2 |" in card
    assert table_rows(card, "tok_train")[0][1] == "cached"
    assert table_rows(card, "base_train")[0][1] == "ran, resumed from step 20"
    assert table_rows(card, "chat_eval_rl")[0][1:3] == ["ran", "60.0 s"]
    assert table_rows(card, "**total**")[0][2] == f"**{len(plans) * 60 / 60:.1f} min**"
    assert "Estimated cost: CPU run: no GPU cost." in card
    assert "| val | 3.87 |" in card and "| code | 2.25 |" in card   # tokenizer compression per text
    # rounded to what they show; each bpb says on which text it was measured
    assert table_rows(card, "val bpb (base_eval)")[0][1] == "1.901" and table_rows(card, "CORE")[0][1] == "0.1812"
    assert table_rows(card, "tokens per second")[0][1] == "2,100" and table_rows(card, "parameters")[0][1] == "1,234,567"
    assert "bpb) here are on pretraining text" in card and "held-out chat conversations" in card
    from flows.report import summary_table
    summary = summary_table("run", outcomes)
    assert "mid_train's on held-out chat conversations: other text, not comparable" in summary
    assert "not comparable" not in summary_table("run", [o for o in outcomes if o.plan.stage != "mid_train"])

    assert table_rows(card, "task") == [["task", "chance", "MID", "SFT", "RL"]]   # the chat table's header
    # n, chance level and 95 % interval beside an accuracy whose counts are known
    assert table_rows(card, "ARC-Easy")[0][1:] == ["25%", "31.2% (20/64, 21.2-43.4%)", "37.5%", "-"]
    assert table_rows(card, "GSM8K")[0][1:] == ["0%", "1.6% (1/64, 0.3-8.3%)", "4.7%", "7.8%"]
    assert table_rows(card, "Arithmetic")[0][1:] == ["-", "25.0%", "30.0%", "40.0%"]   # a builtin task joins
    # rows only for tasks that ran; the others named once
    assert table_rows(card, "MMLU") == [] and table_rows(card, "HumanEval") == []
    assert "Not evaluated in this run: ARC-Challenge, MMLU, HumanEval." in card
    # nanochat's ChatCORE needs all six tasks; a mean over others is the partial one (SFT's and RL's metrics are
    # in the earlier format, a partial mean under "chatcore": read as partial too)
    assert table_rows(card, "ChatCORE")[0][1:] == ["", "-", "-", "-"]
    assert table_rows(card, "ChatCORE (partial)")[0][1:] == ["", "0.1102", "0.1766", "0.2391"]
    assert "MID: ChatCORE (partial: 3 of 6 tasks) over ARC-Easy, GSM8K, SpellingBee, Arithmetic" in card
    assert card.index("| ARC-Easy |") < card.index("| SpellingBee |") < card.index("| Arithmetic |") \
        < card.index("| ChatCORE |")
    assert "**Stage" not in card   # nothing failed


def test_failed_cancelled_and_unreached_stages_say_so_at_the_top(tmp_path):
    config, plans = plans_for(tmp_path)
    by_stage = {p.stage: p for p in plans}
    outcomes = [completed(by_stage["tok_train"], status="Cached"), completed(by_stage["tok_eval"]),
                StageOutcome(by_stage["base_train"], "Failed", 95.5, error="stage base_train failed: out of "
                             "memory | try a smaller --device_batch_size", resumed_from=None),
                StageOutcome(by_stage["base_eval"], "Cancelled", 1.0)]
    card = report_card("nanopipe pipeline (demo-cpu)", outcomes, plans, CPU_ENV, config=config)

    failed = table_rows(card, "base_train")[0]
    assert failed[1].startswith("failed: stage base_train failed: out of memory \\| try")   # the pipe escaped
    assert failed[2] == "95.5 s"
    assert table_rows(card, "base_eval")[0][1] == "cancelled"
    assert table_rows(card, "mid_train")[0][1:3] == ["not run", "0.0 s"]
    top = card.split("## Environment")[0]
    assert "**Stage base_train failed: stage base_train failed: out of memory" in top
    assert "**Stage base_eval cancelled**" in top
    assert "## Chat model" not in card   # no chat evaluation ran


def test_a_recompute_on_request_says_which_stages_it_redid_in_one_line(tmp_path):
    config, plans = plans_for(tmp_path, recompute_from="base_train", stop_after="mid_train")
    by_stage = {p.stage: p for p in plans}
    outcomes = [completed(by_stage["tok_train"], status="Cached"), completed(by_stage["tok_eval"]),
                completed(by_stage["base_train"]), completed(by_stage["base_eval"]),
                StageOutcome(by_stage["mid_train"], "Failed", 3.0, error="stage mid_train failed: no data")]
    card = report_card("nanopipe pipeline (demo-cpu)", outcomes, plans, CPU_ENV, config=config)
    # tok_eval ran too, but before the stage asked for: it was missing, not recomputed; mid_train never completed
    line = ("Recomputed on request (recompute_from=base_train): base_train, base_eval; each new artifact was "
            "swapped in for the old one (if any) only once it verified.")
    assert line in card.split("## Environment")[0].splitlines(), card[:1500]
    # a retry of the same flow run finds its own recompute done (Cached): nothing recomputed in this attempt
    again = [completed(p, status="Cached") for p in plans if p.stage != "mid_train"]
    assert "Recomputed" not in report_card("t", again, plans, CPU_ENV, config=config)
    plain, _ = plans_for(tmp_path, stop_after="mid_train")
    assert "Recomputed" not in report_card("t", outcomes, plans, CPU_ENV, config=plain)
    assert "Recomputed" not in report_card("t", outcomes, plans, CPU_ENV)


def test_gpu_stages_cost_their_gpu_hours_at_the_configured_rate(tmp_path):
    config, plans = plans_for(tmp_path, preset="d12", run_rl=False, stop_after="base_train",
                              cost_per_gpu_hour=2.5)
    outcomes = [completed(p, seconds=3600.0 if p.stage == "base_train" else 36.0,
                          status="Cached" if p.stage == "tok_train" else "Completed") for p in plans]
    card = report_card("nanopipe pipeline (d12)", outcomes, plans, GPU_ENV, config=config)
    assert "| GPUs | 8x NVIDIA H100 80GB HBM3 |" in card and "| CUDA (torch build) | 12.8 |" in card
    # base_train: 1 h on 8 GPUs; tok_eval (one process) holds its node's 8 GPUs for 36 s; tok_train cached
    assert table_rows(card, "base_train")[0][3] == "8.000" and table_rows(card, "tok_eval")[0][3] == "0.080"
    assert table_rows(card, "tok_train")[0][3] == "-"
    assert "8.080 GPU-hours x $2.50/GPU-hour = **$20.20**" in card
    # without a config the documented default rate applies; a CPU host never counts autodetected stages
    default = report_card("t", outcomes, plans, GPU_ENV)
    assert f"x ${DEFAULT_COST_PER_GPU_HOUR:.2f}/GPU-hour = **${8.08 * DEFAULT_COST_PER_GPU_HOUR:.2f}**" in default
    assert "CPU run: no GPU cost" in report_card("t", outcomes, plans, CPU_ENV, config=config)


def test_samples_of_the_base_model_and_of_a_chat_evaluation(tmp_path):
    base = samples_markdown("base_eval", METRICS["base_eval"])
    assert "The capital of Italy is Rome and" in base and "once upon a '''time" in base   # fences stay closed
    assert base.count("```text") == 2
    chat = samples_markdown("chat_eval_mid", METRICS["chat_eval_mid"])
    assert "### GSM8K: correct" in chat and "### ARC-Easy: wrong" in chat and "Tom has 3 apples" in chat
    assert samples_markdown("chat_sft", METRICS["chat_sft"]) is None


def test_samples_that_say_nothing_are_flagged():
    from flows.samples import sample_prompts
    assert "The capital of Italy is" in sample_prompts()   # read from nanopipe/sampling.py without torch
    text = samples_markdown("base_eval", {"samples": ["The capital of Italy is", "The opposite of up is down",
                                                      "Water freezes at a temperature of the the the the"],
                                          "unconditioned_samples": ["  \n"]})
    assert "2 of 3 say nothing (flagged below)." in text and "1 of 1 say nothing" in text
    assert "**empty:** the model wrote nothing after the prompt\n\n```text\nThe capital of Italy is\n```" in text
    assert "**degenerate:** one word repeated\n\n```text\nWater freezes" in text
    assert "**empty:** the model wrote nothing\n\n" in text
    assert text.count("**") == 6   # "down" is a completion: not flagged


def test_chat_eval_keeps_a_few_answered_problems(checkpoint, tmp_path, home):
    """chat_eval's metrics.json holds a few problems per task, in the order the tasks were given, each with the
    model's answer and whether it was right, scored as the evaluation scores it: multiple choice its first
    problems, generative tasks up to two right and two wrong answers their evaluation recorded."""
    from nanopipe.stages import chat_eval
    metrics = chat_eval.main(eval_args(checkpoint, tmp_path / "out", "--task=MultipleChoice,Arithmetic,GSM8K"))
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["samples"] == metrics["samples"]
    tasks = [s["task"] for s in written["samples"]]
    assert tasks == sorted(tasks, key=["MultipleChoice", "Arithmetic", "GSM8K"].index)
    assert tasks.count("MultipleChoice") == 2   # 5 spread over 3 tasks: the first task's share
    for name in ("Arithmetic", "GSM8K"):
        shown = [s for s in written["samples"] if s["task"] == name]
        assert 1 <= len(shown) <= 4 and sum(s["correct"] for s in shown) <= 2 and sum(not s["correct"] for s in shown) <= 2
        # one process saw every problem: a right answer is shown exactly when there is one
        assert any(s["correct"] for s in shown) == (written["tasks"][name]["passed"] > 0)
    for s in written["samples"]:
        assert s["question"] and isinstance(s["answer"], str) and isinstance(s["correct"], bool)
    choice = written["samples"][0]
    assert choice["answer"] in "ABCD" and choice["correct"] == (choice["answer"] == choice["reference"])
    gsm8k = written["samples"][-1]
    row = next(r for r in GSM8K_ROWS if r["question"] == gsm8k["question"])
    assert gsm8k["reference"] == row["answer"]   # calculator calls shown as GSM8K writes them
    assert chat_eval.samples_per_task(["a", "b", "c"]) == {"a": 2, "b": 2, "c": 1}


# -----------------------------------------------------------------------------
# Curves

def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]
    return struct.unpack(">II", png[16:24])


def test_curves_from_a_resumed_stage_keep_the_last_value_of_each_step(tmp_path):
    lines = [{"step": 0, "total": 40, "loss": 9.0, "t": 1.0, "attempt": 1},
             {"step": 10, "total": 40, "loss": 5.0, "attempt": 1},
             {"step": 20, "val_bpb": 2.5, "attempt": 1},
             {"step": 20, "total": 40, "loss": 4.0, "attempt": 1},
             {"step": 30, "total": 40, "loss": 3.9, "attempt": 1},   # lost with the kill after checkpoint 20
             {"step": 30, "total": 40, "loss": 3.5, "attempt": 2},   # resumed from step 20
             {"step": 40, "total": 40, "loss": 3.2, "attempt": 2},
             {"step": 40, "val_bpb": 2.1, "attempt": 2}]
    (tmp_path / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 41, "lo')
    series = curve_series(read_progress(tmp_path))
    assert series == {"loss": [(0, 9.0), (10, 5.0), (20, 4.0), (30, 3.5), (40, 3.2)],
                      "val_bpb": [(20, 2.5), (40, 2.1)]}
    png = stage_curves(tmp_path, "base_train")
    assert png_size(png) == (640, 360) and len(png) < 20_000
    assert png[25] == 3, "a palette PNG (colour type 3): a third of the bytes of matplotlib's RGBA one"
    image = markdown_image(png, "base_train curves")
    assert image.startswith("![base_train curves](data:image/png;base64,")
    assert base64.b64decode(image.split(",", 1)[1].rstrip(")")) == png


def test_a_drawing_is_kept_by_what_it_shows_and_not_drawn_twice(tmp_path, monkeypatch):
    import flows.plots as plots
    stage, cache = tmp_path / "stage", tmp_path / "cache"
    stage.mkdir()
    (stage / "progress.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    first = stage_curves(stage, "base_train (d4-1234)", cache)
    assert png_size(first) == (640, 360) and [p.suffix for p in cache.iterdir()] == [".png"]

    def no_drawing(*args):
        raise AssertionError("drawn again")
    monkeypatch.setattr(plots, "render_curves", no_drawing)
    assert stage_curves(stage, "base_train (d4-1234)", cache) == first   # a cached re-run: no matplotlib
    with pytest.raises(AssertionError, match="drawn again"):
        stage_curves(stage, "base_train (d4-5678)", cache)                # another title: another drawing
    with open(stage / "progress.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.0}\n')                            # new points: a new drawing
    with pytest.raises(AssertionError, match="drawn again"):
        stage_curves(stage, "base_train (d4-1234)", cache)


def test_kept_drawings_not_shown_for_a_month_go_when_a_new_one_is_kept(tmp_path):
    import flows.plots as plots
    cache = tmp_path / "cache"

    def draw(i: int) -> Path:
        """Draws stage i's curve through the cache; the file that holds it."""
        stage = tmp_path / f"stage{i}"
        stage.mkdir(exist_ok=True)
        (stage / "progress.jsonl").write_text(f'{{"step": 1, "loss": {3.0 + i}}}\n{{"step": 2, "loss": 2.0}}\n')
        before = set(cache.glob("*.png"))
        png = stage_curves(stage, "t", cache)
        (path,) = set(cache.glob("*.png")) - before or [p for p in cache.glob("*.png") if p.read_bytes() == png]
        return path

    stale, shown = draw(0), draw(1)
    month_ago = time.time() - (plots.CACHE_KEEP_DAYS + 1) * 86400
    for path in (stale, shown):
        os.utime(path, (month_ago, month_ago))
    assert draw(1) == shown and shown.stat().st_mtime > month_ago + 86400   # shown again: renewed
    assert stale.exists()                                                     # nothing new kept yet
    new = draw(2)                                                             # a new drawing: the stale one goes
    assert not stale.exists() and shown.exists() and new.exists()


def test_curves_fall_back_to_the_progress_lines_of_stage_log(tmp_path):
    (tmp_path / "stage.log").write_text(
        "# 2026-12-01 10:00:00 $ torchrun ...\nstep 00001/00004 | loss 3.0\n"
        '@@nanopipe-progress {"step": 1, "total": 4, "reward": 0.1}\n'
        '@@nanopipe-progress {"step": 2, "total": 4, "reward": 0.3}\n# ... exit code 0 after 2.0 s\n')
    assert curve_series(read_progress(tmp_path)) == {"reward": [(1, 0.1), (2, 0.3)]}
    assert png_size(stage_curves(tmp_path, "chat_rl")) == (640, 360)
    (tmp_path / "stage.log").write_text('@@nanopipe-progress {"step": 1, "total": 9, "phase": "read"}\n')
    assert stage_curves(tmp_path, "tok_train") is None   # a tokenizer has no curve
    assert stage_curves(tmp_path / "absent", "x") is None


# -----------------------------------------------------------------------------
# Regression gate

def test_the_gate_flags_only_what_got_worse_beyond_its_tolerance(tmp_path):
    _, plans = plans_for(tmp_path)
    now, basis = key_metrics([completed(p) for p in plans])
    assert now == {"base val bpb": 1.9011, "CORE": 0.1812, "MID partial ChatCORE": 0.1102, "MID GSM8K": 0.0156,
                   "SFT partial ChatCORE": 0.1766, "SFT GSM8K": 0.0469, "RL partial ChatCORE": 0.2391,
                   "RL GSM8K": 0.0781}
    same = {"metrics": dict(now), "basis": dict(basis)}
    assert compare(now, basis, same).regressions == []
    within = {"metrics": {**now, "base val bpb": 1.9011 / 1.009, "CORE": 0.1812 + 0.019, "RL GSM8K": 0.0781 + 0.019},
              "basis": basis}
    assert compare(now, basis, within).regressions == []
    beyond = {"metrics": {**now, "base val bpb": 1.80, "SFT partial ChatCORE": 0.25, "RL GSM8K": 0.20, "CORE": 0.10},
              "basis": basis}
    gate = compare(now, basis, beyond, "run demo-cpu d4 (abc)")
    assert gate.regressions == [
        "base val bpb rose from 1.8000 to 1.9011 (+5.62%, tolerance +1%) since run demo-cpu d4 (abc)",
        "SFT partial ChatCORE dropped from 0.2500 to 0.1766 (-0.0734, tolerance -0.02) since run demo-cpu d4 (abc)",
        "RL GSM8K dropped from 0.2000 to 0.0781 (-0.1219, tolerance -0.02) since run demo-cpu d4 (abc)"]
    # a ChatCORE over other tasks is not the same number: reported, never a regression
    other = compare(now, basis, {"metrics": {"SFT partial ChatCORE": 0.9}, "basis": {"SFT partial ChatCORE": "GSM8K"}})
    assert other.regressions == [] and other.rows[0][-1] == "not comparable (other config or tasks)"
    assert compare(now, basis, None).note == "no earlier run of this lineage to compare with"


def test_the_gate_compares_only_runs_of_the_same_configs_whatever_the_code(tmp_path):
    _, plans = plans_for(tmp_path)
    now, basis = key_metrics([completed(p) for p in plans])
    worse = {"metrics": {**now, "base val bpb": 1.5, "SFT GSM8K": 0.5}, "basis": basis}
    assert len(compare(now, basis, worse).regressions) == 2
    # the same preset and depth trained for fewer steps on purpose: another experiment, not a regression
    shorter = [p.model_copy(update={"semantic_config": {**p.semantic_config, "num_iterations": 7}})
               if p.stage == "base_train" else p for p in plans]
    _, shorter_basis = key_metrics([completed(p) for p in shorter])
    gate = compare(now, basis, {"metrics": worse["metrics"], "basis": shorter_basis})
    assert gate.regressions == [] and {r[-1] for r in gate.rows} == {"not comparable (other config or tasks)"}
    # the code version is not part of it: a code change is exactly what the gate is for
    recoded = [p.model_copy(update={"code_version": "0" * 16, "hash": "f" * 16}) for p in plans]
    assert key_metrics([completed(p) for p in recoded])[1] == basis


def test_the_key_metrics_record_reads_back_and_names_its_lineage(tmp_path):
    config, plans = plans_for(tmp_path)
    assert lineage(config, plans) == "demo-cpu-d4" and lineage(None, plans) == "custom-d4"
    record = {"lineage": "demo-cpu-d4", "metrics": {"CORE": 0.18, "SFT ChatCORE": 0.25},
              "basis": {"CORE": "abc", "SFT ChatCORE": "def on ARC-Easy"}}
    # published as a table artifact (Prefect stores its rows as JSON) and read back as data
    assert record_from_table(json.dumps(key_metrics_table(record))) == record
    assert record_from_table(json.dumps([])) is None and record_from_table(None) is None
    assert record_from_table("# Key metrics\n| CORE | 0.18 |") is None


# -----------------------------------------------------------------------------
# publish_summary inside real flow runs (the module's temporary Prefect server)

def publish_flow(name: str = "report-test"):
    """A flow that publishes a report card; the gate compares the runs of one flow name and lineage."""
    from prefect import flow

    @flow(name=name)
    def publish(home: str, scale: float, depth: int = 4):
        config, plans = plans_for(Path(home), base_train={"depth": depth})
        by_stage = {p.stage: p for p in plans}
        Path(by_stage["base_train"].artifact_dir).mkdir(parents=True, exist_ok=True)
        Path(by_stage["base_train"].artifact_dir, "progress.jsonl").write_text(
            "".join(json.dumps({"step": s, "total": 40, "loss": 5 - s / 20}) + "\n" for s in range(0, 41, 10)))
        outcomes = [completed(p) for p in plans]
        for o in outcomes:   # scale the chat scores: < 1 makes this run worse than the one before
            o.metrics = {**o.metrics, **{k: o.metrics[k] * scale for k in ("chatcore", "chatcore_partial")
                                         if o.metrics.get(k) is not None}}
        return publish_summary(outcomes, plans, "nanopipe pipeline (demo-cpu)", config=config)
    return publish


def artifacts_of(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
        tags = client.read_flow_run(flow_run_id).tags
    return {a.key: a for a in found}, tags


def test_publish_summary_publishes_the_card_and_gates_on_the_previous_run(tmp_path):
    publish = publish_flow()
    first = publish(str(tmp_path), 1.0, return_state=True)
    report = first.result()
    assert report.regressions == [] and report.gate == "no earlier run of this lineage to compare with"
    keys, tags = artifacts_of(first.state_details.flow_run_id)
    assert {"nanopipe-report", "nanopipe-summary", "nanopipe-metrics", KEY_METRICS_KEY, "base-train-curves",
            "base-eval-samples", "base-train-samples", "chat-eval-mid-samples"} <= set(keys)
    assert "lineage:demo-cpu-d4" in tags
    assert "data:image/png;base64," in keys["base-train-curves"].data
    card = keys["nanopipe-report"].data
    assert "## Training curves" in card and "data:image/png;base64," in card and "| ChatCORE |" in card
    assert (tmp_path / "home" / REPORT_FILE).read_text() == card == report.markdown
    assert "data:image" not in str(report)   # what the flow prints into its log stays small

    better = publish(str(tmp_path), 1.05).regressions   # better than the last completed run: passes
    assert better == []
    worse = publish(str(tmp_path), 0.5)                 # half the ChatCORE of the last completed run
    assert [s.split(" dropped")[0] for s in worse.regressions] == ["MID partial ChatCORE", "SFT partial ChatCORE",
                                                                   "RL partial ChatCORE"]
    assert "since run " in worse.regressions[0]
    assert worse.markdown.index("**Regressions since") < worse.markdown.index("## Environment")
    # another lineage (a different depth) has no earlier run to compare with
    deeper = publish(str(tmp_path), 0.5, depth=6)
    assert deeper.regressions == [] and deeper.gate == "no earlier run of this lineage to compare with"


def test_a_dead_prefect_api_never_fails_the_report(tmp_path):
    """The API gone mid-run: the gate says it could not look, report.md is still written, nothing raises."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    @flow(name="report-test-dead-api")
    def publish_with_dead_api(home: str):
        config, plans = plans_for(Path(home))
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
            return publish_summary([completed(p) for p in plans], plans, "nanopipe pipeline (demo-cpu)",
                                   config=config)
    report = publish_with_dead_api(str(tmp_path))
    assert report.regressions == [] and report.gate.startswith("could not read earlier runs from the Prefect API")
    assert (tmp_path / "home" / REPORT_FILE).read_text() == report.markdown
    assert "| ChatCORE (partial) | | 0.1102 | 0.1766 | 0.2391 |" in report.markdown
