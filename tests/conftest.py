"""Shared pytest fixtures: the `../shared` data folder beside the repo, a throwaway NANOPIPE_HOME, and the
session's temporary Prefect server for the tests that run flows in this process."""

from pathlib import Path

import os
import socket
import tempfile

import pytest

# `nanopipe run` uses the configured Prefect API (PREFECT_API_URL, or the active profile's) when there is one
# (flows/local_server.py): the tests (and the commands they start) see neither, so a server a developer has
# configured is never written to by them; a test that wants a server names its own.
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(tempfile.mkdtemp(prefix="nanopipe-test-profiles-"), "profiles.toml")

# The workspace keeps real test data (tinyshakespeare, GSM8K, ...) in a `shared` folder next to the repo.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `../shared` folder (it holds `data/`); tests that need it skip cleanly where it is absent."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"shared test data not found: expected a 'shared/data' folder beside the repo at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> tuple[str, str]:
    """(API URL, database URL) of one temporary Prefect server on SQLite, started on first use and shared by every
    module that runs flows in this process (tests/flow_support.py's `prefect_backend` points a module at it):
    starting one costs ~10 s of CPU. Runs are told apart by their ids, never by what else the server holds."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    database = "sqlite+aiosqlite:///" + str(tmp_path_factory.mktemp("prefect-server") / "prefect.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: database}):   # passed on to the server
        server = SubprocessASGIServer(port=port)
        server.start(timeout=180)
    try:
        yield server.api_url, database
    finally:
        server.stop()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point NANOPIPE_HOME at this test's tmp_path, so nothing touches the user's real home."""
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core machine: one intra-op torch thread is much faster than two fighting
    (a millisecond forward pass can otherwise take seconds). Modules that want it for every test say
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
