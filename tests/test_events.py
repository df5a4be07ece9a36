"""The typed contract between stages and flows (nanopipe/events.py): the flow reads a stage's records, never
its human lines. The pipeline runs with every human line of every stage renamed (a `sitecustomize` on the
stages' PYTHONPATH rewrites each line they print, whatever prints it) and still resumes, reports memory, plans,
reports progress and keeps the final metrics."""

import codecs
import json
import os
import textwrap
from pathlib import Path

import pytest

from flows.artifacts import read_manifest
from flows.config import PipelineConfig
from flows.launcher import stage_reason
from flows.plan import PlanError, dry_run, model_shape, plan_pipeline, preflight
from flows.report import PROGRESS_FILE
from flows.stage_task import LOG_FILE
from nanopipe.events import (MemoryEstimate, Plan, Progress, Resumed, StageFailure, parse_progress, parse_record,
                             record_line, report_progress)

RENAMED = "renamed: "

# Imported by every Python process the stages start (torchrun's agent and workers included): each line
# written to stdout or stderr that is not a record comes out renamed (rot13, reversed), so no sentence a
# stage prints survives for a parser to find.
SITECUSTOMIZE = textwrap.dedent(f'''
    import atexit, codecs, sys

    class Renamed:
        def __init__(self, stream):
            self._stream, self._pending = stream, ""

        def write(self, text):
            self._pending += text
            *lines, self._pending = self._pending.split("\\n")
            for line in lines:
                keep = line.startswith("@@nanopipe-") or not line.strip()
                self._stream.write((line if keep else {RENAMED!r} + codecs.encode(line, "rot13")[::-1]) + "\\n")
            return len(text)

        def close_line(self):
            if self._pending:
                self.write("\\n")
            self._stream.flush()

        def __getattr__(self, name):
            return getattr(self._stream, name)

    sys.stdout, sys.stderr = Renamed(sys.stdout), Renamed(sys.stderr)
    atexit.register(sys.stdout.close_line)
    atexit.register(sys.stderr.close_line)
''')


def in_words(log: str) -> list[str]:
    """The renamed lines of a log, turned back into what the stage said (for the test's eyes only)."""
    return [codecs.decode(line[len(RENAMED):][::-1], "rot13") for line in log.splitlines() if line.startswith(RENAMED)]


@pytest.fixture
def renamed_lines(tmp_path, monkeypatch) -> None:
    """Every process launched from here on prints its human lines renamed."""
    site = tmp_path / "renamed-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


# -----------------------------------------------------------------------------
# The records

def test_every_record_reads_back_from_its_line():
    records = [Progress(step=3, total=10, loss=2.5, phase="read"), Resumed(step=40, checkpoint_dir="/ckpt"),
               MemoryEstimate.of({"total": 3 * 2**30, "weights": 2**30, "activations": 2 * 2**30}),
               Plan.of({"num_params": 1234, "num_iterations": 40, "world_size": 2, "plan_only": True,
                        "estimated_peak_memory_bytes": {"total": 2**30},
                        "model_config": {"sequence_len": 64, "vocab_size": 512}}),
               StageFailure(error="CheckpointError", message="no step 7 in /ckpt", exit_code=2)]
    for record in records:
        line = record_line(record)
        assert line.startswith(f"@@nanopipe-{record.kind} ") and "\n" not in line
        assert parse_record(line) == record
    assert records[2].peak_bytes == 3 * 2**30 and records[2].parts == {"weights": 2**30, "activations": 2 * 2**30}
    assert records[3].peak_bytes == 2**30 and records[3].model["vocab_size"] == 512
    assert records[4].reason() == "CheckpointError: no step 7 in /ckpt"
    assert StageFailure(message="--depth must be positive", exit_code=2).reason() == "--depth must be positive"


def test_lines_that_are_not_records_read_as_none(capsys):
    assert parse_record("Resuming from step 40 of /ckpt") is None                   # a human line
    assert parse_record('@@nanopipe-weather {"sunny": true}') is None               # a kind nobody knows
    assert parse_record('@@nanopipe-resumed {"step": 4') is None                    # cut short by a kill
    assert parse_record('@@nanopipe-resumed {"step": -1, "checkpoint_dir": "x"}') is None   # breaks the schema
    assert parse_record('@@nanopipe-resumed {"step": 4, "checkpoint_dir": "x", "extra": 1}') is None
    # progress keeps whatever figures a step has; a value that is not finite is null (strict JSON)
    report_progress(step=1, val_loss=float("nan"), reward=0.5, passes=[0.5, float("inf")])
    line = capsys.readouterr().out.strip()
    assert "NaN" not in line and "Infinity" not in line
    assert parse_progress(line) == {"step": 1, "val_loss": None, "reward": 0.5, "passes": [0.5, None]}
    assert parse_progress(record_line(Resumed(step=1, checkpoint_dir="x"))) is None


def test_records_are_printed_on_rank_0_only(capsys, monkeypatch):
    from nanopipe.events import emit
    monkeypatch.setenv("RANK", "1")
    emit(Resumed(step=4, checkpoint_dir="x"))
    assert capsys.readouterr().out == ""


def test_a_stage_s_reason_is_its_error_record_else_its_traceback():
    said = StageFailure(error="ConfigError", message="--num_iterations is negative", exit_code=2)
    lines = ["python -m nanopipe.stages.chat_sft: whatever the human line says", record_line(said)]
    assert stage_reason(lines) == "ConfigError: --num_iterations is negative"
    assert stage_reason(["human words"], [said]) == "ConfigError: --num_iterations is negative"
    assert stage_reason(["Traceback (most recent call last):", "KeyError: 'model_config'"]) == "KeyError: 'model_config'"


# -----------------------------------------------------------------------------
# Planning runs with their human lines renamed

def tiny_plans(home: Path, **values) -> list:
    config = PipelineConfig.model_validate({
        "preset": "demo-cpu", "tok_train": {"vocab_size": 512}, "stop_after": "base_train",
        "resources": {"nproc_per_node": 1, "env": {"OMP_NUM_THREADS": "1"}},
        "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64, "device_batch_size": 4,
                       "total_batch_size": 256, "num_iterations": 12}, **values})
    return plan_pipeline(config, home=home)


def test_a_planning_run_is_read_from_its_records(tmp_path, renamed_lines):
    plans = tiny_plans(tmp_path)
    base = next(p for p in plans if p.stage == "base_train")
    planned = dry_run(base, model_shape(plans), timeout_seconds=300)
    assert (planned.model["sequence_len"], planned.model["vocab_size"]) == (64, 512)
    assert planned.num_iterations == 12 and planned.world_size == 1 and planned.num_params > 0
    assert planned.peak_bytes > 0
    said = []
    preflight([base], model_shape(plans), log=said.append)
    assert said and said[0].startswith("preflight base_train: ok (") and "context 64, vocab 512" in said[0]

    # a stage that exits 0 without planning (here: it printed its help) has no plan record: not a pass
    helped = base.model_copy(update={"args": [*base.args, "--help"]})
    with pytest.raises(PlanError, match="exit code 0 without a plan record: --plan_only planned nothing"):
        dry_run(helped, timeout_seconds=300)

    # a flag the stage rejects: its reason comes from its error record, its human lines say nothing readable
    broken = base.model_copy(update={"args": [*base.args, "--depth=0"]})
    with pytest.raises(PlanError) as err:
        preflight([broken], log=said.append)
    first, *rest = str(err.value).splitlines()
    assert first.startswith("preflight failed before any stage ran: stage base_train: dry run failed (exit code 2): ")
    assert "--depth" in first
    assert any(line.startswith(RENAMED) for line in rest)        # the end of its output, for people
    assert not any("error:" in line for line in rest)


# -----------------------------------------------------------------------------
# The pipeline with every human line renamed: planning, progress, memory, metrics, resume

@pytest.fixture(scope="module")
def prefect_backend():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_the_pipeline_runs_and_resumes_on_records_alone(prefect_backend, home, tmp_path, renamed_lines):
    from flows.pipeline import full_pipeline
    from tests.flow_support import tiny
    values = tiny(tmp_path / "data" / "builtin", stop_after="base_train")
    base = next(p for p in plan_pipeline(PipelineConfig.model_validate(values)) if p.stage == "base_train")
    state = full_pipeline(values, return_state=True)
    assert state.is_completed(), state.message
    log = (Path(base.artifact_dir) / LOG_FILE).read_text()
    assert "Estimated peak memory" not in log and "step 00011" not in log   # the stage's words are renamed
    assert any(line.startswith("Estimated peak memory") for line in in_words(log))
    manifest = read_manifest(base.artifact_dir)
    assert manifest["metrics"]["step"] == 12 and manifest["timings"]["resumed_from"] is None
    assert manifest["memory_estimate"]["peak_bytes"] > 0 and manifest["memory_estimate"]["parts"]
    progress = [json.loads(line) for line in (Path(base.artifact_dir) / PROGRESS_FILE).read_text().splitlines()]
    assert progress[-1]["step"] == 12 and all(p["total"] == 12 for p in progress)
    assert [p["step"] for p in progress if "loss" in p] == list(range(12))

    # an interrupted run: no manifest, and its last checkpoint never written; the next run resumes at step 6
    (Path(base.artifact_dir) / "manifest.json").unlink()
    for path in Path(base.out_dir).glob("*_000012*"):
        path.unlink()
    state = full_pipeline(values, return_state=True)
    assert state.is_completed(), state.message
    ref = state.result()["base_train"]
    assert ref.resumed_from == 6 and read_manifest(base.artifact_dir)["timings"]["resumed_from"] == 6
    assert ref.metrics["step"] == 12
    log = (Path(base.artifact_dir) / LOG_FILE).read_text()
    assert "Resuming from step" not in log and any(line.startswith("Resuming from step 6 ") for line in in_words(log))
