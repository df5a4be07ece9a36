"""
The report card first on its run's Artifacts tab, in both Prefect UIs.

Both UIs list a flow run's artifacts by id, highest first: V1's Artifacts tab (FlowRunArtifacts in the
prefect package's server/ui/assets/index-*.js) asks `POST /artifacts/filter` with no sort, so the server's
default `ID_DESC` (server/api/artifacts.py), and shows the flow run's own artifacts above its task runs';
V2's (server/ui-v2/assets/flow-run._id-*.js) asks `sort: ID_DESC` and shows one grid. The server gives each
artifact a random uuid4 (ORMBaseModel in server/utilities/schemas/bases.py; ArtifactCreate has no `id`), so
neither the order nor the time of creation decides where a card lands, and the client cannot pick an id.

What the client can do is draw again: create the card, and while too many of the run's other artifacts
have a higher id, create it again and keep the higher of the two (deleting the other); then copy each
artifact still above the card until a copy lands below it, and delete the original. The content, key,
type, description and owner (flow run or task run) of every artifact stay as they were; only their ids
(and creation times) change. Drawing stops when the expected requests to move the rest below the card
are few, so a run pays about ten small requests on average (at most CARD_DRAWS + COPY_DRAWS per artifact).

Each request can race another write to Prefect's SQLite database (the server persisting the run's events and
log batches): a delete reads the artifact, another connection commits, and SQLite refuses the delete's write
at once ("database is locked": a busy timeout does not cover a stale read snapshot), which the server answers
503. Prefect's client retries a 503 after 2 s (then 4, 8, ...) unless the answer says when, so these
requests' 503s are read as if they said `Retry-After` SOONER seconds (growing fourfold per attempt).
"""

from __future__ import annotations

from uuid import UUID

CARD_DRAWS = 12        # cards drawn at most; the highest id is kept
COPY_DRAWS = 24        # copies drawn at most per artifact above the card
ENOUGH = 6.0           # stop drawing cards when moving the rest costs about this many requests
SOONER = 0.05          # seconds before a 503'd request is tried again; x4 per attempt (0.05, 0.2, 0.8, 3.2, 12.8)


def _share_above(artifact_id: UUID) -> float:
    """The chance that a fresh uuid4 lands below `artifact_id`."""
    return max(artifact_id.int / 2**128, 1e-9)


def _copy_of(artifact):
    from prefect.client.schemas.actions import ArtifactCreate
    return ArtifactCreate(key=artifact.key, type=artifact.type, description=artifact.description,
                          data=artifact.data, metadata_=artifact.metadata_, flow_run_id=artifact.flow_run_id,
                          task_run_id=artifact.task_run_id)


def retry_sooner(response) -> None:
    """An httpx response hook: a 503 without `Retry-After` gets one (see the module docstring), so that Prefect's
    client tries the request again in SOONER seconds, x4 for each earlier attempt of the same request."""
    if response.status_code == 503 and "retry-after" not in response.headers:
        attempts = response.request.extensions.setdefault("nanopipe_503s", [])
        response.headers["Retry-After"] = f"{SOONER * 4 ** len(attempts):g}"
        attempts.append(response.headers["Retry-After"])


def publish_first(key: str, markdown: str, description: str) -> UUID | None:
    """Create the markdown artifact `key` of the current flow run so that both UIs list it first on the run's
    Artifacts tab (see the module docstring); the card's id, or None outside a flow run (then it is created
    as any artifact is). Call it after the run's other artifacts: one created later lands anywhere."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.context import FlowRunContext
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return create_markdown_artifact(markdown, key, description)
    run_id = context.flow_run.id
    with get_client(sync_client=True, httpx_settings={"event_hooks": {"response": [retry_sooner]}}) as client:
        others = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(not_any_=["result"])))
        others = [a for a in others if a.id is not None]
        card = None
        for _ in range(CARD_DRAWS):
            drawn = client.create_artifact(ArtifactCreate(key=key, type="markdown", description=description,
                                                          data=markdown, flow_run_id=run_id))
            if card is None or drawn.id > card.id:
                card, loser = drawn, card
            else:
                loser = drawn
            if loser is not None:
                client.delete_artifact(loser.id)
            above = [a for a in others if a.id > card.id]
            if len(above) * 2 / _share_above(card.id) <= ENOUGH:
                break
        for artifact in above:
            for _ in range(COPY_DRAWS):
                copy = client.create_artifact(_copy_of(artifact))
                if copy.id < card.id:
                    client.delete_artifact(artifact.id)
                    break
                client.delete_artifact(copy.id)
    return card.id
