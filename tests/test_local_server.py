"""Which Prefect server a `nanopipe` command uses: PREFECT_API_URL (environment or profile), a server already
running on the machine, or a temporary one of its own (flows/local_server.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.local_server import TemporaryServer, answers, configured_api_url, local_api_url

REPO = Path(__file__).resolve().parents[1]


def test_the_api_url_comes_from_the_environment_then_the_active_profile(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert configured_api_url() is None   # no profiles file
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.example:4200/api"\n'
        '[profiles.local]\n')
    assert configured_api_url() == "http://prefect.example:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert configured_api_url() == "http://127.0.0.1:1/api"


def test_reusing_a_local_server_can_be_turned_off_or_pointed_elsewhere(monkeypatch):
    monkeypatch.delenv("NANOPIPE_LOCAL_PREFECT_URL", raising=False)
    assert local_api_url() == "http://127.0.0.1:4200/api"
    monkeypatch.setenv("NANOPIPE_LOCAL_PREFECT_URL", "off")
    assert local_api_url() is None
    monkeypatch.setenv("NANOPIPE_LOCAL_PREFECT_URL", "http://127.0.0.1:4300/api")
    assert local_api_url() == "http://127.0.0.1:4300/api"
    assert not answers("http://127.0.0.1:9/api", timeout=0.5)   # nothing listens on the discard port


def test_the_temporary_server_sends_no_telemetry_unless_asked(monkeypatch, capfd):
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    server = TemporaryServer()
    try:
        assert server.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        server.wait_ready(timeout=180)
        assert answers(server.api_url, timeout=30)
    finally:
        server.stop()
    assert "telemetry" not in capfd.readouterr().err   # offline, the telemetry service logs an error here
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")   # a person's own choice stands
    server = TemporaryServer()
    server.stop()
    assert server.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"


@pytest.mark.slow
def test_a_run_uses_the_prefect_server_already_running_on_the_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "server"))   # a database of its own: only our runs in it
    server = TemporaryServer()   # stands in for `prefect server start`
    try:
        server.wait_ready(timeout=180)
        env = {**os.environ, "NANOPIPE_LOCAL_PREFECT_URL": server.api_url, "NANOPIPE_HOME": str(tmp_path / "home"),
               "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "flows.cli", "run", "--preset=demo-cpu", "--stop_after=tok_train",
               "--tok_train.max_chars=200000", "--tok_train.vocab_size=512", "--resources.nproc_per_node=1"]
        for _ in range(2):   # produce the tokenizer, then reuse it (Cached)
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert f"using the Prefect server running at {server.api_url}" in done.stderr
            assert "temporary Prefect server" not in done.stderr
        assert "Cached" in done.stdout + done.stderr

        from prefect.client.orchestration import SyncPrefectClient
        with SyncPrefectClient(server.api_url) as client:
            runs = client.read_flow_runs()
        assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    finally:
        server.stop()
    assert server.process.poll() is not None
