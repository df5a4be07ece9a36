"""The pipeline's failures as Prefect flows on a tiny CPU config: a recompute that fails or is retried keeps
its work, settings and fields refused before any stage runs, failures told in one sentence and named by their
class, a cancelled run named by where it stopped, the regression gate. Against a temporary Prefect server."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from pydantic import ValidationError

from flows.artifacts import read_manifest, verify
from flows.config import PipelineConfig
from flows.launcher import StageFailed
from flows.pipeline import Regression, failure_name, failure_sentence, full_pipeline, stage_flow
from flows.plan import PlanError
from flows.stage_task import LOG_FILE
from tests.flow_support import (REPO, tiny, plans_of, run, server_state, result_records, launches,
                                kill_torchrun_after_checkpoint)
from tests.flow_support import prefect_backend, data_dir, shared_home, kill_home  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_a_failed_recompute_keeps_the_good_artifact(kill_home, data_dir):
    """recompute_from builds beside the artifact: one that fails leaves it in place, verified and reused; the
    next recompute (another run) discards the unfinished one and swaps its own in once it verifies."""
    from flows.recompute import staging_dir, staging_owner
    values = tiny(data_dir, stop_after="tok_eval")
    first, _, _ = run(values)
    assert first.is_completed()
    plan = plans_of(values)["tok_eval"]
    before = read_manifest(plan.artifact_dir)
    # the same artifact (resources are not in its hash), recomputed without the time to do it
    no_time = {"tok_eval": {"timeout_minutes": 0.001, "retries": 0, "env": {"OMP_NUM_THREADS": "1"}}}
    state, states, _ = run({**values, "recompute_from": "tok_eval", "stage_resources": no_time})
    assert state.is_failed() and state.name == "Timed out" and states == {"tok_train": "Cached", "tok_eval": "Failed"}
    assert verify(plan.artifact_dir, plan.hash) and read_manifest(plan.artifact_dir) == before
    assert staging_owner(plan.artifact_dir) == str(state.state_details.flow_run_id)
    assert run(values)[1] == {"tok_train": "Cached", "tok_eval": "Cached"}   # still the good one

    state, states, _ = run({**values, "recompute_from": "tok_eval"})
    assert state.is_completed() and states == {"tok_train": "Cached", "tok_eval": "Completed"}
    assert not staging_dir(plan.artifact_dir).exists() and verify(plan.artifact_dir, plan.hash)
    after = read_manifest(plan.artifact_dir)
    assert after["flow_run_id"] == str(state.state_details.flow_run_id) != before["flow_run_id"]
    assert after["config"]["out_dir"] == plan.out_dir   # where it lives now, not where it was built
    assert launches(plan.artifact_dir) == 1   # the other run's unfinished attempt was not continued


@pytest.mark.slow
def test_a_retried_recompute_continues_from_its_own_checkpoints(kill_home, data_dir):
    """A recompute killed mid-stage, then retried as the same flow run (the UI's Retry; here the flow's own
    retry): the good artifact stays until the end, and the retry resumes the recompute's checkpoints."""
    from flows.recompute import staging_dir
    values = tiny(data_dir, stop_after="base_train")
    assert run(values)[0].is_completed()
    plan = plans_of(values)["base_train"]
    before = read_manifest(plan.artifact_dir)
    staged_out = str(staging_dir(plan.artifact_dir) / Path(plan.out_dir).name)
    killer = kill_torchrun_after_checkpoint(staged_out)
    retried = full_pipeline.with_options(retries=1, retry_delay_seconds=0)
    state = retried({**values, "recompute_from": "base_train"}, return_state=True)
    killer.join()
    assert state.is_completed(), state.message
    after = read_manifest(plan.artifact_dir)
    assert after["flow_run_id"] == str(state.state_details.flow_run_id) != before["flow_run_id"]
    assert verify(plan.artifact_dir, plan.hash) and not staging_dir(plan.artifact_dir).exists()
    log = (Path(plan.artifact_dir) / LOG_FILE).read_text()
    assert launches(plan.artifact_dir) == 2 and "Resuming from step" in log, log[-2000:]


def test_bad_late_stage_setting_fails_before_any_stage_runs(home, data_dir):
    # 256 tokens per step do not split over 3 processes x 4 sequences x 64 tokens: only the dry run knows
    values = tiny(data_dir, resources={"nproc_per_node": 3})
    state, states, _ = run(values)
    assert state.is_failed()
    # the run's state message is one sentence: which stage, and why
    assert "stage base_train" in state.message and "--total_batch_size" in state.message
    assert "\n" not in state.message and not state.message.startswith("Flow run encountered")
    assert state.name == "Bad config" and server_state(state).name == "Bad config"   # the header and runs list
    assert states == {} and not (home / "artifacts").exists()
    with pytest.raises(PlanError, match="total_batch_size"):   # called without return_state, the flow raises
        full_pipeline(values)

    # a value the parameter form cannot check: the run ends at once, saying which field and why
    records_before = result_records()
    state = full_pipeline(tiny(data_dir, base_eval={"eval": "nope"}), return_state=True)
    assert state.is_failed() and state.message.startswith("invalid config (PipelineConfig): base_eval.eval: ")
    assert "nope" in state.message and "\n" not in state.message and state.name == "Bad config"
    horizons = tiny(data_dir, base_train={"target_param_data_ratio": 10})   # and num_iterations=12
    state = full_pipeline(horizons, return_state=True)
    assert state.is_failed() and state.message.startswith("invalid config (PipelineConfig): base_train: ")
    assert "training horizons" in state.message and "\n" not in state.message
    assert result_records() == records_before   # Prefect's own parameter check would pickle the error


def test_an_unknown_field_is_refused_at_once_with_the_closest_names(home, data_dir):
    state = full_pipeline(tiny(data_dir, base_train={"depht": 3}, stage_resources={"tok_train": {"nproc": 1}}),
                          return_state=True)
    assert state.is_failed() and server_state(state).name == "Bad config"
    assert "unknown field 'depht' in base_train; did you mean 'depth'?" in state.message
    assert "unknown field 'nproc' in stage_resources.tok_train; did you mean 'nproc_per_node'" in state.message
    assert "Extra inputs" not in state.message and not (home / "artifacts").exists()   # before any stage


def test_concurrent_runs_of_one_config_produce_it_once(home, data_dir):
    values = tiny(data_dir, stop_after="tok_train")
    results = []
    threads = [threading.Thread(target=lambda: results.append(run(values))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0].is_completed() for r in results] == [True, True]
    plan = plans_of(values)["tok_train"]
    assert launches(plan.artifact_dir) == 1 and verify(plan.artifact_dir, plan.hash)


def test_a_single_stage_flow_needs_its_inputs(home, data_dir):
    values = tiny(data_dir)
    state = stage_flow("tok_eval", values, return_state=True)
    assert state.is_failed() and "tok_train" in state.message and "run those stages first" in state.message
    assert state.name == "Missing inputs"
    assert stage_flow("tok_train", values, return_state=True).is_completed()
    ref = stage_flow("tok_eval", values)
    assert ref.stage == "tok_eval" and verify(ref.path, ref.hash)


def test_the_cli_runs_the_pipeline(home, data_dir):
    from prefect.settings import PREFECT_API_URL
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    args = ["--preset=demo-cpu", f"--home={home}", f"--data.data_dir={data_dir}", "--stop_after=tok_train",
            "--tok_train.max_chars=300000", "--tok_train.vocab_size=512", "--resources.env.OMP_NUM_THREADS=1"]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "nanopipe: Completed" in out.stdout
    status = subprocess.run([sys.executable, "-m", "flows.cli", "status", *args, "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert '"state": "complete"' in status.stdout and "tok_train" in status.stdout


def test_a_failure_a_retry_cannot_fix_is_not_retried(home, data_dir, tmp_path):
    missing = tmp_path / "no-such-shards"
    values = tiny(data_dir, stop_after="tok_train", resources={"retries": 3, "retry_delay_seconds": 0},
                  data={"data_source": "local", "data_dir": str(missing)})
    state, states, _ = run(values)
    assert state.is_failed() and states == {"tok_train": "Failed"}
    assert "not retried" in state.message and str(missing) in state.message   # the stage's own reason
    assert state.message.startswith("tok_train failed: ") and "\n" not in state.message
    assert server_state(state).name == "Bad config"   # the stage refused its input: the class, as the state name
    assert "(log: " in state.message and not state.message.startswith("Flow run encountered")
    assert isinstance(state.result(raise_on_failure=False), StageFailed)   # the exception stays the data
    assert launches(plans_of(values)["tok_train"].artifact_dir) == 1


@pytest.mark.slow
def test_a_cancelled_run_is_named_by_the_stage_and_step_it_stopped_at(kill_home, data_dir):
    """The cancel a worker's runner sends (its intent on the control channel, then SIGTERM), in-process: the run
    ends Cancelled, its state named "Cancelled at base_train step N" and its message saying where a re-run
    resumes; the process that renames it ends by itself."""
    from prefect._internal import control_listener
    from flows.cancel_note import rename_when_cancelled   # noqa: F401  (the module the flow starts)
    values = tiny(data_dir, stop_after="base_train", base_train={"num_iterations": 100_000, "save_every": 2})
    out_dir = Path(plans_of(values)["base_train"].out_dir)

    def cancel_after_a_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out_dir.glob("meta_*.json")):
            time.sleep(0.05)
        control_listener._set_intent("cancel")   # what the runner says before its SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    canceller = threading.Thread(target=cancel_after_a_checkpoint, daemon=True)
    canceller.start()
    try:
        full_pipeline(values, return_state=True)
    except BaseException as exc:   # the engine re-raises the termination once the run is Cancelled
        assert type(exc).__name__ == "TerminationSignal", exc
    finally:
        control_listener.clear_intent()
        signal.signal(signal.SIGTERM, before)
    canceller.join()
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_run_filter=None, limit=1, sort="START_TIME_DESC")[0]
        deadline = time.monotonic() + 120
        while not run.state.name.startswith("Cancelled at") and time.monotonic() < deadline:
            time.sleep(0.5)
            run = client.read_flow_run(run.id)
    assert run.state.type.value == "CANCELLED", run.state
    saved = max(int(p.stem.split("_")[1]) for p in out_dir.glob("model_*.pt"))
    name = run.state.name
    # the step the stage last reported (0-based) is at or after the checkpoint's (steps done), never before it
    assert name.startswith("Cancelled at base_train step ") and int(name.rsplit(" ", 1)[1]) + 1 >= saved, name
    assert run.state.message == (f"base_train cancelled at step {name.rsplit(' ', 1)[1]} on the run's cancel; a "
                                 f"re-run resumes from its checkpoint at step {saved} in {out_dir}")


def test_a_regression_ends_the_run_failed_and_keeps_the_artifacts(home, data_dir, monkeypatch):
    """The summary's regression gate (publish_summary returning `.markdown` and `.regressions`) fails a run
    whose stages all completed, naming each regression; the artifacts stay valid and are reused."""
    import flows.pipeline
    from flows.report import publish_summary

    class Gated:
        def __init__(self, report):
            self.markdown, self.regressions = report.markdown, ["tok_train val_bytes_per_token 3.1 < 3.2 (last good)"]
            self.summary = str(report)

        def __str__(self):
            return self.summary

    values = tiny(data_dir, stop_after="tok_train")
    with monkeypatch.context() as patch:
        patch.setattr(flows.pipeline, "publish_summary", lambda *a, **k: Gated(publish_summary(*a, **k)))
        state, states, _ = run(values)
    assert state.is_failed() and states == {"tok_train": "Completed"}
    assert state.message == "regression: tok_train val_bytes_per_token 3.1 < 3.2 (last good)"
    assert server_state(state).name == "Regression"
    state, states, _ = run(values)
    assert state.is_completed() and states == {"tok_train": "Cached"}


def test_a_failure_is_told_in_one_sentence():
    """The run's state message: the first line of our own errors (preflight's names each failed stage and its
    reason, tests/test_events.py); a pydantic error names each field; anything else keeps its type."""
    preflight = PlanError("preflight failed before any stage ran: stage base_train: dry run failed (exit code 2): "
                          "BaseTrainConfig: --depth must be positive\n\nstage base_train: dry run failed (exit code "
                          "2): BaseTrainConfig: --depth must be positive\nthe end of its output")
    assert failure_sentence(preflight) == (
        "preflight failed before any stage ran: stage base_train: dry run failed (exit code 2): BaseTrainConfig: "
        "--depth must be positive")
    with pytest.raises(ValidationError) as invalid:
        PipelineConfig.model_validate({"preset": "demo-cpu", "base_eval": {"eval": "nope"}})
    sentence = failure_sentence(invalid.value)
    assert sentence.startswith("invalid config (PipelineConfig): base_eval.eval: ") and "nope" in sentence
    assert failure_sentence(KeyError("model_config")) == "KeyError: model_config"   # not str()'s quotes
    assert len(failure_sentence(RuntimeError("x" * 5000))) <= 600


@pytest.mark.parametrize("exc, name", [
    (StageFailed("base_train failed: out of memory [oom, not retried]", kind="oom"), "Out of memory"),
    (StageFailed("base_train failed: exit code 2 [config, not retried]", kind="config"), "Bad config"),
    (StageFailed("base_train failed: the loss became NaN [nan, not retried]", kind="nan"), "Loss diverged"),
    (StageFailed("base_train failed: a collective ... [network, will be retried]", kind="network"), "Node lost"),
    (StageFailed("base_train failed: killed by signal SIGKILL: node 1 (flow run base_train-node-1) ended Crashed "
                 "without a result: boom [killed, will be retried]", kind="killed"), "Node lost"),
    (StageFailed("base_train failed: exit code 1: node 2 never started: no worker [error, not retried]"), "Node lost"),
    (StageFailed("base_train failed: killed by signal SIGKILL [killed, will be retried]", kind="killed"), "Killed"),
    (StageFailed("base_train failed: exit code 1 [error, not retried]"), "Stage error"),
    (PlanError("preflight failed before any stage ran: stage base_train: dry run failed"), "Preflight failed"),
    (PlanError("stage base_train on 2 process(es): --total_batch_size=5000 ..."), "Bad config"),
    (Regression("regression: base_eval core 0.1 < 0.2"), "Regression"),
    (RuntimeError("something else"), "Failed"),
])
def test_a_failure_is_named_by_its_class(exc, name):
    assert failure_name(exc) == name
