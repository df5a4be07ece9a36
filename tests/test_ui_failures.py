"""What the Prefect UI shows of runs that did not complete, or redid a stage, in a real headless browser
(Debian's chromium driven by the playwright package): a failed run's page says why in one sentence, a run
cancelled mid-stage shows that stage Cancelled, and a run with recompute_from shows Completed, its stage run
(not Cached) and its report card saying so. The runs go through the deployment and the process worker."""

import time
from pathlib import Path

import pytest

import tests.test_prefect_server as server_tests
from flows.artifacts import read_manifest, verify
from flows.config import PipelineConfig
from flows.plan import plan_pipeline
from tests.browser import browser_page, expect
from tests.test_flows_server_support import TINY, prefect_stack, wait_for_state


@pytest.fixture(scope="module")
def stack():
    return prefect_stack()


def start_run(stack, config: dict) -> str:
    from prefect.client.orchestration import SyncPrefectClient
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("full-pipeline/full-pipeline")
        return str(client.create_flow_run_from_deployment(deployment.id, parameters={"config": config}).id)


def page_text(stack, path: str, expected: str, page=None) -> str:
    """The visible text of a UI page once `expected` shows on it (what a person reads there), in `page` or in a
    browser of its own."""
    if page is None:
        with browser_page() as page:
            return page_text(stack, path, expected, page)
    page.goto(f"{stack.ui_url}{path}", wait_until="networkidle")
    try:
        page.get_by_text(expected).first.wait_for(state="visible")
    except Exception:   # the assertion below shows what the page said instead
        pass
    return page.inner_text("body")


def test_a_failed_run_page_says_why_in_one_sentence(stack, tmp_path):
    # a value the form accepts but the stage refuses: a local data directory that does not exist
    missing = tmp_path / "no-such-shards"
    config = {**TINY, "data": {"data_source": "local", "data_dir": str(missing)}}
    flow_run_id = start_run(stack, config)
    state = wait_for_state(stack, flow_run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=300)
    assert state.type.value == "FAILED", f"{state.name}: {state.message}\n{stack.log('worker.log')}"
    assert state.message.startswith("tok_train failed: ") and str(missing) in state.message
    assert "\n" not in state.message and "encountered an exception" not in state.message

    text = page_text(stack, f"/v2/runs/flow-run/{flow_run_id}", "tok_train failed:")
    assert "tok_train failed:" in text and str(missing) in text, text[:3000]
    assert "Traceback" not in text.split("tok_train failed:")[0]
    # the class of the failure is the state's name: the run header and the runs list show it
    assert state.name == "Bad config" and "Bad config" in text, text[:3000]
    assert "Bad config" in page_text(stack, "/v2/runs", "Bad config")


def test_a_run_cancelled_mid_stage_shows_the_stage_cancelled(stack):
    config = {**TINY, "stop_after": "base_train",
              "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64,
                             "device_batch_size": 4, "total_batch_size": 256, "num_iterations": 100_000,
                             "eval_every": None, "eval_tokens": 512}}
    flow_run_id = start_run(stack, config)
    deadline = time.monotonic() + 300
    training = []
    while time.monotonic() < deadline and len(training) < 2:   # torchrun and its worker are up
        training = [p for p in server_tests.processes_of_flow_run(flow_run_id)
                    if b"nanopipe.stages.base_train" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.2)
    assert len(training) >= 2, f"base_train never started; worker log:\n{stack.log('worker.log')}"
    done = stack.prefect("flow-run", "cancel", flow_run_id)
    assert done.returncode == 0, done.stdout + done.stderr
    state = wait_for_state(stack, flow_run_id, {"CANCELLED", "CRASHED", "FAILED", "COMPLETED"}, timeout=120)
    assert state.type.value == "CANCELLED", state.name
    # named by where it stopped (flows/cancel_note.py renames the worker's "Cancelled"): header and runs list
    state = wait_for_state(stack, flow_run_id, {"CANCELLED"}, timeout=60, name="Cancelled at base_train")
    assert "Cancelled at base_train" in page_text(stack, f"/v2/runs/flow-run/{flow_run_id}", "Cancelled at base_train")
    assert "Cancelled at base_train" in page_text(stack, "/v2/runs", "Cancelled at base_train")

    stage = task_runs(stack, flow_run_id)["base_train"]
    assert stage.state.type.value == "CANCELLED", stage.state.name
    assert stage.state.message.startswith("base_train cancelled")
    text = page_text(stack, f"/v2/runs/task-run/{stage.id}", "Cancelled")
    assert "Cancelled" in text and "Crashed" not in text, text[:3000]
    assert "stage:base_train" in text and "preset:demo-cpu" in text   # the task run's tags


def task_runs(stack, flow_run_id: str) -> dict:
    """{name: task run} of one flow run, through the API."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    with SyncPrefectClient(stack.api_url) as client:
        return {r.name: r for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}


def test_a_recomputed_run_shows_completed_and_its_card_says_what_it_redid(stack):
    """recompute_from=tok_train over a verified tok_train artifact: the stage runs again beside it and the new
    artifact replaces it (flows/recompute.py); the cheapest stage, so one extra run of seconds."""
    plan = plan_pipeline(PipelineConfig.model_validate(TINY), home=stack.nanopipe_home)[0]
    artifact = Path(plan.artifact_dir)
    if not verify(artifact, plan.hash):   # the artifact to replace: the cancelled run's tok_train made it already
        done = start_run(stack, TINY)     # when the module runs in order; run alone, a completed run makes it
        state = wait_for_state(stack, done, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=300)
        assert state.type.value == "COMPLETED", f"{state.name}: {state.message}\n{stack.log('worker.log')}"
    before = read_manifest(artifact)["flow_run_id"]

    flow_run_id = start_run(stack, {**TINY, "recompute_from": "tok_train"})
    state = wait_for_state(stack, flow_run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=300)
    assert state.type.value == "COMPLETED" and state.name == "Completed", f"{state.name}: {state.message}"
    stage = task_runs(stack, flow_run_id)["tok_train"]
    assert stage.state.name == "Completed", f"{stage.state.name}: {stage.state.message}"
    # the artifact in its place is now the recompute's, and nothing is left beside it
    assert read_manifest(artifact)["flow_run_id"] == flow_run_id != before
    leftovers = [d.name for d in artifact.parent.iterdir() if d.is_dir() and artifact.name in d.name]
    assert leftovers == [artifact.name], leftovers   # no <artifact>.recompute, no .<artifact>.replaced-...

    with browser_page(viewport={"width": 1400, "height": 1000}) as page:   # one browser: a launch costs seconds
        header = page_text(stack, f"/v2/runs/flow-run/{flow_run_id}", "Completed", page).split("\nDetails\n")[0]
        assert "Completed" in header and "Cached" not in header, header[-1500:]
        text = page_text(stack, f"/v2/runs/task-run/{stage.id}", "Completed", page)
        assert "Completed" in text and "Cached" not in text, text[:3000]
        page.goto(f"{stack.ui_url}/v2/runs", wait_until="networkidle")   # the run's card in the runs list
        card = page.locator('[data-slot="card"]').filter(has=page.locator(f'a[href$="/flow-run/{flow_run_id}"]'))
        expect(card).to_contain_text("Completed")

        page.goto(f"{stack.ui_url}/v2/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("nanopipe-report", exact=True).first.click()   # the report card's own page
        report = page.get_by_test_id("markdown-display")
        expect(report).to_contain_text("Recomputed on request (recompute_from=tok_train): tok_train; each new "
                                       "artifact was swapped in for the old one (if any) only once it verified.")
        row = report.locator("tr").filter(has=page.get_by_role("cell", name="tok_train", exact=True))
        expect(row.get_by_role("cell").nth(1)).to_have_text("ran")   # columns: stage, status, ...
