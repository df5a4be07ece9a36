"""The report card is the first card on a finished run's Artifacts tab, as a person sees it in both Prefect UIs
(V1 at /, V2 at /v2) in a headless browser: flows/card_first.py against the UIs' own ordering."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.local_server import answers
from tests.browser import browser_page
from tests.test_flows_server_support import free_port
from tests.test_report_card_first import run_with_artifacts

pytestmark = pytest.mark.slow   # a Prefect server with its UIs, and a headless browser per UI

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """(UI address) of a `prefect server start` with both UIs; this process's flows run on it meanwhile."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-ui")),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 300
        while not answers(api, timeout=1):
            assert proc.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: api}):
            yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def keys_in_order(url: str) -> list[str]:
    """The artifact keys on a run's Artifacts tab, top to bottom, once the report card shows."""
    with browser_page(viewport={"width": 1400, "height": 900}) as page:
        page.goto(url, wait_until="networkidle")
        page.get_by_text("Artifacts", exact=True).first.click()
        try:
            page.get_by_text("nanopipe-report").first.wait_for(state="visible")
        except Exception:   # the assertion shows what the page said instead
            pass
        text = page.inner_text("body")
    return re.findall(r"\b(nanopipe-report|card-\d+|stage-\d+-progress)\b", text)


@pytest.mark.parametrize("ui", ["v1", "v2"])
def test_the_report_card_is_the_first_card_on_the_artifacts_tab(ui_server, ui):
    flow_run_id, _ = run_with_artifacts(14, keyed=True)
    prefix = "/v2" if ui == "v2" else ""
    keys = keys_in_order(f"{ui_server}{prefix}/runs/flow-run/{flow_run_id}")
    assert keys[0] == "nanopipe-report", keys
    assert {f"card-{i}" for i in range(14) if i % 3} <= set(keys), keys   # the markdown cards all still there
