"""Shared pytest fixtures: the `../shared` data folder beside the repo, and a throwaway NANOPIPE_HOME."""

from pathlib import Path

import os

import pytest

# `nanopipe run` reuses a Prefect server already running on this machine (flows/local_server.py): the tests
# (and the commands they start) never do, so a server a developer has open is never written to by them.
os.environ["NANOPIPE_LOCAL_PREFECT_URL"] = "off"

# The workspace keeps real test data (tinyshakespeare, GSM8K, ...) in a `shared` folder next to the repo.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `../shared` folder (it holds `data/`); tests that need it skip cleanly where it is absent."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"shared test data not found: expected a 'shared/data' folder beside the repo at {SHARED_DIR}")
    return SHARED_DIR


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
