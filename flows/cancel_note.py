"""
Name a cancelled run by where it stopped: state "Cancelled at base_train step 9", and a message that says
where a re-run resumes.

A run cancelled from the UI (or `prefect flow-run cancel`) ends in a state its worker writes: the worker's
runner waits for the flow process to exit, then writes "Cancelled" with its own message ("Flow run was
cancelled successfully."), over anything the flow wrote before. So the flow, as it stops, starts this small
process: it waits (at most WAIT_SECONDS) for the run's final Cancelled state, renames it (the type stays
Cancelled), watches a few seconds more in case a late write undoes it, and ends. It carries none of the
flow run's environment markers: nothing takes it for a process of the run.

    python -m flows.cancel_note FLOW_RUN_ID NAME MESSAGE
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

WAIT_SECONDS = 180.0    # the runner gives a cancelled process 30 s, then kills it; this is ample
SETTLE_SECONDS = 10.0   # after renaming, watch this long for a write that undoes it
POLL_SECONDS = 0.5
# the flow run's own markers (Prefect's run id, its control channel; nanopipe's launch markers)
DROPPED_ENV = ("PREFECT__FLOW_RUN_ID", "PREFECT__CONTROL_PORT", "PREFECT__CONTROL_TOKEN", "NANOPIPE_LAUNCH_ID",
               "NANOPIPE_NODE0_ID")


def cancel_note(stage: str, step: int | None, checkpoint_step: int | None, out_dir: str,
                recomputing: str | None = None) -> tuple[str, str]:
    """(state name, message) of a run cancelled while `stage` ran, at `step` (None: before its first step);
    `recomputing` is the artifact a recompute would have replaced (flows/recompute.py)."""
    at = f" step {step}" if step is not None else ""
    name = f"Cancelled at {stage}{at}"
    who = "a retry of this run resumes the recompute" if recomputing else "a re-run resumes"
    resume = (f"{who} from its checkpoint at step {checkpoint_step} in {out_dir}" if checkpoint_step is not None
              else f"{'a retry of this run' if recomputing else 'a re-run'} starts {stage} afresh (no checkpoint yet)")
    kept = f"; {recomputing} stays as it was (a plain re-run uses it)" if recomputing else ""
    return name, f"{stage} cancelled at{at or ' its start'} on the run's cancel{kept}; {resume}"


def start(flow_run_id: str, name: str, message: str) -> None:
    """Start the renaming process for this flow run (it ends by itself), talking to this process's API."""
    from prefect.settings import get_current_settings
    settings = get_current_settings()
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env["PREFECT_API_URL"] = str(settings.api.url or "")
    if settings.api.key is not None:
        env["PREFECT_API_KEY"] = settings.api.key.get_secret_value()
    subprocess.Popen([sys.executable, "-m", "flows.cancel_note", flow_run_id, name, message], env=env,
                     cwd=Path(__file__).resolve().parents[1], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rename_when_cancelled(flow_run_id: str, name: str, message: str) -> bool:
    """Wait for the run's final Cancelled state and rename it; False if it ended otherwise or never ended."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled
    deadline, settled_at = time.monotonic() + WAIT_SECONDS, None
    with get_client(sync_client=True) as client:
        while time.monotonic() < (settled_at or deadline):
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                if not state.is_cancelled():
                    return False   # it ended otherwise (crashed, say): that state tells its own story
                if state.name != name:
                    client.set_flow_run_state(flow_run_id, Cancelled(name=name, message=message), force=True)
                settled_at = settled_at or time.monotonic() + SETTLE_SECONDS
            time.sleep(POLL_SECONDS)
    return settled_at is not None


if __name__ == "__main__":
    flow_run_id, name, message = sys.argv[1:4]
    sys.exit(0 if rename_when_cancelled(flow_run_id, name, message) else 1)
