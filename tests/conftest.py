"""Shared pytest fixtures: the `../shared` data folder beside the repo, and a throwaway NANOPIPE_HOME."""

from pathlib import Path

import atexit
import os
import shutil
import tempfile

import pytest

# `nanopipe run` uses the configured Prefect API (PREFECT_API_URL, or the active profile's) when there is one
# (flows/local_server.py): the tests (and the commands they start) see neither, so a server a developer has
# configured is never written to by them; a test that wants a server names its own.
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
# Prefect's profiles and its local result storage (where it pickles, e.g., the exception of a run whose parameters
# fail validation) are this test process's own: tests that check a run persisted nothing there must not see another
# pytest-xdist worker's records, nor the user's ~/.prefect/storage
_PREFECT_DIR = tempfile.mkdtemp(prefix="nanopipe-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_DIR, ignore_errors=True)
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(_PREFECT_DIR, "profiles.toml")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_DIR, "storage")

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
