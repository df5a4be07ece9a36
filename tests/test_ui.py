"""Trigger the full-pipeline deployment from the Prefect UI in a real headless browser (Debian's chromium
driven by the playwright package) and check, through the API, that the worker ran it to completion."""

import os
import time
from pathlib import Path

import pytest

from tests.test_flows_server_support import TINY, prefect_stack, wait_for_state

CHROMIUM = Path(os.environ.get("NANOPIPE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

sync_playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                      "(pip install -e '.[dev]')").sync_playwright
if not CHROMIUM.is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: install it with `bash scripts/install_browser.sh` (apt, as root) "
                f"or point NANOPIPE_CHROMIUM at one", allow_module_level=True)


@pytest.fixture(scope="module")
def stack():
    return prefect_stack()


def deployment_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.state.name != "Scheduled" or r.expected_start_time is None
            or r.expected_start_time.timestamp() < time.time() + 60]


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


def test_quick_run_from_the_ui_completes(stack):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import DeploymentUpdate
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("full-pipeline/full-pipeline")
        # Quick run uses the deployment's own parameters: make them the CPU-test size first
        client.update_deployment(deployment.id, DeploymentUpdate(parameters={"config": TINY}))
        before = {r.id for r in deployment_runs(client, deployment.id)}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{stack.ui_url}/v2/deployments/deployment/{deployment.id}", wait_until="networkidle")
            def quick_run():
                page.get_by_role("button", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Quick run").click()
            created = click_until_created(page, quick_run)
            assert created.status == 201, created.text()
        finally:
            browser.close()

    with SyncPrefectClient(stack.api_url) as client:
        deadline = time.monotonic() + 60
        new = []
        while time.monotonic() < deadline and not new:
            new = [r for r in deployment_runs(client, deployment.id) if r.id not in before]
            time.sleep(0.5)
    assert len(new) == 1, f"the Quick run click created {len(new)} flow runs"
    assert new[0].parameters == {"config": TINY}
    state = wait_for_state(stack, str(new[0].id), {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=300)
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}\n{stack.log('worker.log')}"


def test_an_untouched_custom_run_form_runs_the_deployment_config(stack):
    """The form leaves fields it has no value for out of the parameters, so the preset still fills them."""
    from prefect.client.orchestration import SyncPrefectClient
    from flows.config import PipelineConfig
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("full-pipeline/full-pipeline")
        before = {r.id for r in deployment_runs(client, deployment.id)}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{stack.ui_url}/v2/deployments/deployment/{deployment.id}", wait_until="networkidle")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Custom run").click()
            page.wait_for_url("**/run**")
            page.wait_for_load_state("networkidle")   # the form is built from the deployment's schema
            created = click_until_created(page, lambda: page.get_by_role("button", name="Submit").click())
            assert created.status == 201, created.text()
            with SyncPrefectClient(stack.api_url) as client:
                deadline = time.monotonic() + 60
                new = []
                while time.monotonic() < deadline and not new:
                    new = [r for r in deployment_runs(client, deployment.id) if r.id not in before]
                    time.sleep(0.5)
        finally:
            browser.close()
    assert len(new) == 1, "submitting the Custom run form created no flow run"
    submitted = PipelineConfig.model_validate(new[0].parameters["config"])
    assert submitted == PipelineConfig.model_validate(deployment.parameters["config"])
    state = wait_for_state(stack, str(new[0].id), {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout=300)
    assert state.type.value == "COMPLETED", f"{state.name}: {state.message}"
