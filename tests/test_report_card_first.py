"""The report card is the first card on its run's Artifacts tab: both Prefect UIs list a run's artifacts by id,
highest first (V1 the flow run's own above its task runs'), and flows/card_first.py draws ids until the card's
is the highest, keeping every other artifact as it was."""

import http.server
import threading
from collections import Counter

import httpx
import pytest

from flows.card_first import publish_first
from tests.flow_support import prefect_backend  # noqa: F401 (a fixture: the module's temporary Prefect server)


def run_with_artifacts(count: int, keyed: bool = False):
    """A flow run with `count` other artifacts (a third made by a task; some with keys, or all when `keyed`),
    then the card."""
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact, create_progress_artifact

    @task
    def progress(i: int):
        create_progress_artifact(100.0, key=f"stage-{i}-progress", description=f"stage {i}")

    @flow(name="card-first-test")
    def publish(count: int, keyed: bool):
        for i in range(count):
            if i % 3 == 0:
                progress(i)
            else:
                create_markdown_artifact(f"# card {i}", key=f"card-{i}" if keyed or i % 2 else None, description=f"card {i}")
        return publish_first("nanopipe-report", "# the report card", "report card")
    state = publish(count, keyed, return_state=True)
    return state.state_details.flow_run_id, state.result()


def listed(flow_run_id, sort: str | None):
    """The run's artifacts as a UI's Artifacts tab asks for them (V2: sort ID_DESC; V1: the server's default)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                                           type=ArtifactFilterType(not_any_=["result"])),
            **({"sort": ArtifactSort(sort)} if sort else {}))


@pytest.mark.parametrize("count", [14, 30])
def test_the_report_card_is_listed_first_and_nothing_else_is_lost(count):
    flow_run_id, card_id = run_with_artifacts(count)
    v2 = listed(flow_run_id, "ID_DESC")
    assert v2[0].key == "nanopipe-report" and v2[0].id == card_id and v2[0].data == "# the report card"
    v1 = listed(flow_run_id, None)
    assert [a.id for a in v1 if a.task_run_id is None][0] == card_id   # V1's first section: the flow run's own
    rest = Counter((a.key, a.description, str(a.data), a.task_run_id is None) for a in v2[1:])
    expected = Counter((f"stage-{i}-progress", f"stage {i}", "100", False) if i % 3 == 0 else
                       (f"card-{i}" if i % 2 else None, f"card {i}", f"# card {i}", True) for i in range(count))
    assert rest == expected
    assert len({a.id for a in v2}) == count + 1


class _FlakyDeletes(http.server.BaseHTTPRequestHandler):
    """A local HTTP server that answers each DELETE 503 (as Prefect's server does when SQLite says "database is
    locked") until it has refused `refusals` of them, then 204."""

    refusals = 2
    seen: list[str] = []

    def do_DELETE(self):
        self.seen.append(self.path)
        refused = len(self.seen) <= self.refusals
        self.send_response(503 if refused else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_503_is_tried_again_in_a_twentieth_of_a_second_by_prefects_own_client(monkeypatch):
    """Prefect's client waits 2 s before retrying a 503 that does not say when; the card's requests say
    SOONER, x4 per attempt, and Prefect's client retries as told."""
    import prefect.client.base
    from prefect.client.base import PrefectHttpxSyncClient
    from flows.card_first import SOONER, retry_sooner
    pauses = []
    monkeypatch.setattr(prefect.client.base.time, "sleep", pauses.append)
    _FlakyDeletes.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyDeletes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with PrefectHttpxSyncClient(base_url=f"http://127.0.0.1:{server.server_port}/api",
                                    event_hooks={"response": [retry_sooner]}) as client:
            response = client.delete("/artifacts/1")
    finally:
        server.shutdown()
        server.server_close()
    assert response.status_code == 204 and _FlakyDeletes.seen == ["/api/artifacts/1"] * 3
    assert len(pauses) == 2
    assert SOONER <= pauses[0] <= SOONER * 1.5 and 4 * SOONER <= pauses[1] <= 4 * SOONER * 1.5   # asked, not timed


def test_a_503_that_says_when_and_other_answers_keep_their_headers():
    from flows.card_first import retry_sooner
    request = httpx.Request("DELETE", "http://127.0.0.1/api/artifacts/1")
    told = httpx.Response(503, headers={"Retry-After": "7"}, request=request)
    retry_sooner(told)
    assert told.headers["Retry-After"] == "7"
    for status in (204, 404, 500):
        answer = httpx.Response(status, request=request)
        retry_sooner(answer)
        assert "retry-after" not in answer.headers
