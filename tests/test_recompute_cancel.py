"""A recompute cancelled mid-stage never loses work: the good artifact stays in place, verified, and the next
run reuses it (flows/recompute.py). The cancel is the one a worker's runner sends, in-process, against a
temporary Prefect server; the tiny CPU config of tests/flow_support.py."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flows.artifacts import read_manifest, verify
from flows.pipeline import full_pipeline
from tests.flow_support import plans_of, run, tiny
from tests.flow_support import prefect_backend, data_dir, shared_home, kill_home  # noqa: F401 (fixtures)


def cancel_after_a_checkpoint_in(out_dir: Path) -> threading.Thread:
    """A thread that, once `out_dir` holds a checkpoint, says "cancel" as a worker's runner does (its intent on
    the control channel, then SIGTERM to this process)."""
    from prefect._internal import control_listener

    def cancel():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list(out_dir.glob("meta_*.json")):
            time.sleep(0.05)
        control_listener._set_intent("cancel")
        os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_cancelled_recompute_keeps_the_good_artifact_for_the_next_run(kill_home, data_dir):
    from prefect._internal import control_listener
    from flows.recompute import staging_dir
    values = tiny(data_dir, stop_after="base_train", base_train={"save_every": 2})
    assert run(values)[0].is_completed()
    plan = plans_of(values)["base_train"]
    before = read_manifest(plan.artifact_dir)
    staged_out = staging_dir(plan.artifact_dir) / Path(plan.out_dir).name
    # the same artifact again, cancelled at its recompute's first checkpoint (a checkpoint every 2 steps)
    canceller = cancel_after_a_checkpoint_in(staged_out)
    previous, cancelled = signal.getsignal(signal.SIGTERM), False
    try:
        state = full_pipeline({**values, "recompute_from": "base_train"}, return_state=True)
        cancelled = state.is_cancelled()
    except BaseException as exc:   # the engine re-raises the termination once the run is Cancelled
        assert type(exc).__name__ == "TerminationSignal", exc
        cancelled = True
    finally:
        control_listener.clear_intent()
        signal.signal(signal.SIGTERM, previous)
    canceller.join()
    assert cancelled, f"the recompute ended {state.name} before the cancel came"
    assert list(staged_out.glob("meta_*.json")), "the recompute was cancelled before its first checkpoint"
    # the good artifact is where it was, unchanged and verified
    assert verify(plan.artifact_dir, plan.hash) and read_manifest(plan.artifact_dir) == before
    state, states, _ = run(values)
    assert state.is_completed() and states["base_train"] == "Cached", states
    assert read_manifest(plan.artifact_dir) == before
