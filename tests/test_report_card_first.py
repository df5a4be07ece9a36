"""The report card is the first card on its run's Artifacts tab: both Prefect UIs list a run's artifacts by id,
highest first (V1 the flow run's own above its task runs'), and flows/card_first.py draws ids until the card's
is the highest, keeping every other artifact as it was."""

from collections import Counter

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
