"""Trigger the full-pipeline deployment from the Prefect UI in a real headless browser (Debian's chromium
driven by the playwright package), check through the API that the worker ran it to completion, and check
what that run's artifacts show a person in the UI: the report card's tables, its curve image, every column
of the metrics table."""

import time

import pytest

from tests.browser import browser_page, expect
from tests.test_flows_server_support import TINY, prefect_stack, wait_for_state


# The Quick run: the test stack's tiny config through a depth-2 base model trained 12 steps (seconds), so the
# run has a training curve, base metrics and a resumable stage, not just a tokenizer
UI_CONFIG = {**TINY, "stop_after": "base_train", "tok_eval": {"val_chars": 20_000},
             "base_train": {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64, "device_batch_size": 4,
                            "total_batch_size": 256, "num_iterations": 12, "eval_every": 6, "eval_tokens": 512,
                            "save_every": 6}}


@pytest.fixture(scope="module")
def stack():
    return prefect_stack()


def deployment_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.state.name != "Scheduled" or r.expected_start_time is None
            or r.expected_start_time.timestamp() < time.time() + 60]


def runs_created(stack, deployment_id, before: set, patience_seconds: float = 60.0) -> list:
    """The deployment's flow runs whose ids are not in `before`, once at least one shows up in the API."""
    from prefect.client.orchestration import SyncPrefectClient
    deadline = time.monotonic() + patience_seconds
    new = []
    with SyncPrefectClient(stack.api_url) as client:
        while time.monotonic() < deadline and not new:
            new = [r for r in deployment_runs(client, deployment_id) if r.id not in before]
            time.sleep(0.5)
    return new


def click_until_created(page, click, patience_seconds: float = 120.0):
    """Click, and return the server's answer to the UI's create_flow_run request. A 503 is Prefect's
    "retry me": its SQLite database was locked, e.g. while the server's background services write the
    events and logs of the run before, which on a loaded 2-core machine can take tens of seconds. The UI
    shows an error toast, a person clicks again a little later, and so does this, for up to two minutes.
    Any other answer is returned as it is."""
    deadline = time.monotonic() + patience_seconds
    pause = 2.0
    while True:
        with page.expect_response(lambda r: "create_flow_run" in r.url) as created:
            click()
        if created.value.status != 503 or time.monotonic() + pause > deadline:
            return created.value
        time.sleep(pause)
        pause = min(2 * pause, 15.0)


@pytest.fixture(scope="module")
def quick_run(stack):
    """Quick run of the deployment from its page, to its final state: (flow run, state). Quick run uses the
    deployment's own parameters, made UI_CONFIG first."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import DeploymentUpdate
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("full-pipeline/full-pipeline")
        client.update_deployment(deployment.id, DeploymentUpdate(parameters={"config": UI_CONFIG}))
        before = {r.id for r in deployment_runs(client, deployment.id)}

    with browser_page() as page:
        page.goto(f"{stack.ui_url}/v2/deployments/deployment/{deployment.id}", wait_until="networkidle")
        def click_quick_run():
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Quick run").click()
        created = click_until_created(page, click_quick_run)
        assert created.status == 201, created.text()

    new = runs_created(stack, deployment.id, before)
    assert len(new) == 1, f"the Quick run click created {len(new)} flow runs"
    state = wait_for_state(stack, str(new[0].id), {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=600)
    return new[0], state


def test_quick_run_from_the_ui_completes(stack, quick_run):
    flow_run, state = quick_run
    assert flow_run.parameters == {"config": UI_CONFIG}
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}\n{stack.log('worker.log')}"


def run_artifacts(stack, flow_run_id) -> dict:
    """{key: newest artifact of that key} of one flow run, through the API."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    with SyncPrefectClient(stack.api_url) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in sorted(found, key=lambda a: a.created) if a.key}


def test_the_run_shows_its_report_card_curves_and_metrics_table(stack, quick_run):
    """The completed run's Artifacts tab lists the report card; its page shows the stage table and the
    base_train curve as a rendered image; the metrics table's page shows every column (stage, metric, value)."""
    flow_run, state = quick_run
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}"
    artifacts = run_artifacts(stack, flow_run.id)
    assert {"nanopipe-report", "nanopipe-metrics", "base-train-curves"} <= set(artifacts), sorted(artifacts)

    with browser_page(viewport={"width": 1400, "height": 1000}) as page:
        page.goto(f"{stack.ui_url}/v2/runs/flow-run/{flow_run.id}", wait_until="networkidle")
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("nanopipe-report", exact=True).first.click()   # the card opens the artifact page
        page.wait_for_url(f"**/artifacts/artifact/{artifacts['nanopipe-report'].id}**")

        # expect() waits for what it asserts (up to 60 s) and on failure prints what it found instead:
        # the artifact page may render the card again while it settles, and on a loaded machine a one-off
        # look (is_visible) can land between two renders
        card = page.get_by_test_id("markdown-display")
        stages = card.locator("table").filter(has_text="GPU-hours")
        row = stages.locator("tr").filter(has=page.get_by_role("cell", name="base_train", exact=True))
        expect(row.get_by_role("cell").nth(1)).to_have_text("ran")   # columns: stage, status, wall time, ...
        expect(card.get_by_text("Estimated cost: CPU run: no GPU cost.")).to_be_visible()
        image = card.locator('img[src^="data:image/png;base64,"]').first
        # hover() scrolls the image into view and, like every pointer action, starts again on the new element
        # when a re-render replaces it; scroll_into_view_if_needed() fails at once ("not attached to the DOM")
        image.hover()
        expect(image).to_be_visible()
        expect(image).to_have_js_property("complete", True)
        expect(image).to_have_js_property("naturalWidth", 640)   # decoded, not a broken icon

        page.goto(f"{stack.ui_url}/v2/artifacts/artifact/{artifacts['nanopipe-metrics'].id}",
                  wait_until="networkidle")
        table = page.get_by_test_id("table-display")
        for column in ("stage", "metric", "value"):
            expect(table.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
        table.get_by_placeholder("Search").fill("val_bpb")   # the table pages its rows; find the metric
        row = table.locator("tr").filter(has=page.get_by_role("cell", name="val_bpb", exact=True))
        expect(row.first.get_by_role("cell", name="base_train", exact=True)).to_be_visible()


def test_an_untouched_custom_run_form_runs_the_deployment_config(stack):
    """The form leaves fields it has no value for out of the parameters, so the preset still fills them."""
    from prefect.client.orchestration import SyncPrefectClient
    from flows.config import PipelineConfig
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("full-pipeline/full-pipeline")
        before = {r.id for r in deployment_runs(client, deployment.id)}
    with browser_page() as page:
        page.goto(f"{stack.ui_url}/v2/deployments/deployment/{deployment.id}", wait_until="networkidle")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Custom run").click()
        page.wait_for_url("**/run**")
        page.wait_for_load_state("networkidle")   # the form is built from the deployment's schema
        created = click_until_created(page, lambda: page.get_by_role("button", name="Submit").click())
        assert created.status == 201, created.text()
        new = runs_created(stack, deployment.id, before)
    assert len(new) == 1, "submitting the Custom run form created no flow run"
    submitted = PipelineConfig.model_validate(new[0].parameters["config"])
    assert submitted == PipelineConfig.model_validate(deployment.parameters["config"])
    state = wait_for_state(stack, str(new[0].id), {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=300)
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}"
