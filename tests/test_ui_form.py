"""The Custom run form's preset picker as a person reads it, in both Prefect UIs (V2 at /v2, V1 at /): one line
per preset with its key values, and the form's help text with no part eaten by either renderer."""

import pytest

from tests.browser import browser_page
from tests.test_flows_server_support import prefect_stack

pytestmark = pytest.mark.slow   # the session's Prefect stack, and a headless browser per UI


@pytest.fixture(scope="module")
def deployment_id():
    from prefect.client.orchestration import SyncPrefectClient
    stack = prefect_stack()
    with SyncPrefectClient(stack.api_url) as client:
        return str(client.read_deployment_by_name("full-pipeline/full-pipeline").id)


def form_page(path: str, first_line: str):
    """(visible text of the page, texts of its list items) once the preset picker's first line shows."""
    with browser_page(viewport={"width": 1400, "height": 900}) as page:
        page.goto(f"{prefect_stack().ui_url}{path}", wait_until="networkidle")
        page.get_by_text(first_line.split(".")[0], exact=False).first.wait_for(state="visible")
        return page.inner_text("body"), [" ".join(t.split()) for t in page.locator("li").all_inner_texts()]


def test_v2_shows_every_presets_key_values_and_the_help_uneaten(deployment_id):
    from flows.presets import PRESETS, preset_line
    text, _ = form_page(f"/v2/deployments/deployment/{deployment_id}/run", preset_line("demo-cpu"))
    flat = " ".join(text.split())
    for name in PRESETS:   # V2 shows descriptions as plain text, lines joined
        assert " ".join(preset_line(name).split()) in flat, name
    assert "python -m nanopipe.stages.STAGE --help" in flat


def test_v1_lists_one_line_per_preset_and_the_help_uneaten(deployment_id):
    from flows.presets import PRESETS, preset_line
    text, items = form_page(f"/deployments/deployment/{deployment_id}/run", preset_line("demo-cpu"))
    for name in PRESETS:   # V1 renders descriptions as markdown: the presets are a list, an item each
        assert " ".join(preset_line(name).split()) in items, (name, items)
    assert "python -m nanopipe.stages.STAGE --help" in " ".join(text.split())
