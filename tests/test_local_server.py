"""Which Prefect server a `nanopipe` command uses: --server, else PREFECT_API_URL (environment or profile), else a
temporary one of its own (flows/local_server.py); never a server that merely listens on the machine."""

import contextlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flows.cli import UsageError, prefect_api, server_choice
from flows.local_server import ServerChoice, TemporaryServer, answers, choose_server, configured_api_url

REPO = Path(__file__).resolve().parents[1]


class _Health(http.server.BaseHTTPRequestHandler):
    """Answers every GET like a healthy Prefect API and counts the requests."""

    def do_GET(self):
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def lookalike_server():
    """A plain HTTP listener that looks like a Prefect server to a health check, on Prefect's default address
    127.0.0.1:4200 when that is free (else a free port); yields it (`.requests`, `.api_url`)."""
    try:
        server = http.server.HTTPServer(("127.0.0.1", 4200), _Health)
    except OSError:
        server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    server.requests = []
    server.api_url = f"http://127.0.0.1:{server.server_address[1]}/api"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_the_api_url_comes_from_the_environment_then_the_active_profile(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert configured_api_url() is None   # no profiles file
    assert choose_server().temporary
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.example:4200/api"\n'
        '[profiles.local]\n')
    assert configured_api_url() == "http://prefect.example:4200/api"
    assert choose_server() == ServerChoice("http://prefect.example:4200/api", "Prefect profile 'team'")
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert configured_api_url() is None and choose_server().temporary
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert choose_server() == ServerChoice("http://127.0.0.1:1/api", "PREFECT_API_URL")


def test_an_explicit_server_overrides_the_configured_one(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://configured.example/api")
    assert choose_server("https://other.example/api") == ServerChoice("https://other.example/api", "--server")
    assert choose_server("temporary").temporary and choose_server("Temporary").reason == "--server temporary"
    with pytest.raises(UsageError, match="--server takes a Prefect API URL"):
        server_choice({"server": "localhost:4200"})


def test_without_a_configured_api_a_run_starts_its_own_server_and_ignores_one_listening(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("NANOPIPE_LOCAL_PREFECT_URL", "http://127.0.0.1:4200/api")   # meant something once
    with lookalike_server() as other:
        choice = server_choice({})
        assert choice.temporary
        with prefect_api(choice) as ready:
            ready()
            used = os.environ["PREFECT_API_URL"]
            assert used != other.api_url and answers(used, timeout=30)
        assert other.requests == [], "the command must not talk to a server it was not pointed at"
    assert "PREFECT_API_URL" not in os.environ   # restored
    assert "starting a temporary Prefect server" in capsys.readouterr().err


def test_a_configured_api_is_used_without_starting_a_server(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with prefect_api(server_choice({"server": "http://127.0.0.1:8/api"})) as ready:
        ready()
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:8/api"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert capsys.readouterr().err.strip() == "nanopipe: using the Prefect API at http://127.0.0.1:8/api (--server)"


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
def test_a_run_uses_the_configured_server_or_the_one_named_by_server(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "server"))   # a database of its own: only our runs in it
    server = TemporaryServer()   # stands in for `prefect server start`
    try:
        server.wait_ready(timeout=180)
        env = {**os.environ, "NANOPIPE_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
               "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "flows.cli", "run", "--preset=demo-cpu", "--stop_after=tok_train",
               "--tok_train.max_chars=200000", "--tok_train.vocab_size=512", "--resources.nproc_per_node=1"]
        # produce the tokenizer with the API configured in the environment, then reuse it (Cached) with --server
        for extra, key in (({"PREFECT_API_URL": server.api_url}, "PREFECT_API_URL"), ({}, "--server")):
            argv = cmd + ([f"--server={server.api_url}"] if key == "--server" else [])
            done = subprocess.run(argv, cwd=REPO, env={**env, **extra}, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert f"using the Prefect API at {server.api_url} ({key})" in done.stderr
            assert "temporary Prefect server" not in done.stderr
        assert "Cached" in done.stdout + done.stderr

        from prefect.client.orchestration import SyncPrefectClient
        with SyncPrefectClient(server.api_url) as client:
            runs = client.read_flow_runs()
        assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    finally:
        server.stop()
    assert server.process.poll() is not None


class _FakeServer:
    """Stands in for TemporaryServer: records that it was started and stopped."""

    started: list["_FakeServer"] = []

    def __init__(self):
        self.stopped = False
        _FakeServer.started.append(self)

    def stop(self):
        self.stopped = True


def test_the_explicit_server_is_read_from_the_command_line_before_parsing_it():
    from flows.cli import _explicit_server
    assert _explicit_server(["--preset=demo-cpu"]) is None
    assert _explicit_server(["--server=temporary", "--x=1"]) == "temporary"
    assert _explicit_server(["--server", "http://h:4200/api"]) == "http://h:4200/api"
    assert _explicit_server(["--server=temporary", "--server", "http://h:4200/api"]) == "http://h:4200/api"


def test_a_temporary_server_starts_before_the_parse_and_stops_when_the_command_line_is_bad(monkeypatch, tmp_path):
    from flows import cli
    monkeypatch.setattr("flows.local_server.TemporaryServer", _FakeServer)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path / "home"))
    _FakeServer.started.clear()
    with pytest.raises(UsageError, match="depht"):
        cli.cmd_run(["--preset=demo-cpu", "--base_train.depht=3"])
    assert len(_FakeServer.started) == 1 and _FakeServer.started[0].stopped
    # a URL (on the command line or configured) starts nothing
    for argv, env in ((["--server=http://127.0.0.1:9/api"], {}), ([], {"PREFECT_API_URL": "http://127.0.0.1:9/api"})):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with cli.early_server(argv) as server:
                assert server is None
    assert len(_FakeServer.started) == 1
    # nor does one whose database could not be written (check_outputs says so, as before)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    with cli.early_server([]) as server:
        assert server is None


def test_the_temporary_server_dies_with_the_command_even_on_sigkill(tmp_path):
    """The command SIGKILLed (nothing of it runs on): the parent-death signal stops its server."""
    import signal
    import time
    pid_file = tmp_path / "server.pid"
    code = ("import time\nfrom flows.local_server import TemporaryServer\nserver = TemporaryServer()\n"
            f"open({str(pid_file)!r}, 'w').write(str(server.process.pid))\ntime.sleep(600)\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    server_pid = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        server_pid = int(pid_file.read_text())
        os.kill(server_pid, 0)   # it runs
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the temporary server outlived the command"
    finally:
        parent.kill()
        if server_pid and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Is `pid` a live process (not a zombie: the server's parent is gone, so init reaps it)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _server_settings(server: TemporaryServer) -> dict:
    """The settings the running server itself reports (Prefect's /admin/settings)."""
    import json
    import urllib.request
    with urllib.request.urlopen(f"{server.api_url}/admin/settings", timeout=30) as response:
        return json.loads(response.read())


def test_the_temporary_server_runs_without_telemetry_or_automations_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    for name in TemporaryServer.DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    server = TemporaryServer()
    try:
        server.wait_ready(timeout=180)
        seen = _server_settings(server)["server"]
    finally:
        server.stop()
    assert seen["services"]["triggers"]["enabled"] is False and seen["analytics_enabled"] is False, seen
    # a person's own choice stands
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "true")
    server = TemporaryServer()
    server.stop()
    assert server.env["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "true"


def test_a_run_on_the_temporary_server_leaves_its_runs_logs_and_events_in_the_database(tmp_path):
    """What the UI shows later: a command's flow run, task run, log lines and events, read back after its
    temporary server stopped (by the next command's server, on the same database)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    for name in (*TemporaryServer.DEFAULTS, "PREFECT_API_URL"):
        env.pop(name, None)
    code = ("from flows.cli import prefect_api\nfrom flows.local_server import choose_server\n"
            "with prefect_api(choose_server('temporary')) as ready:\n"
            "    from prefect import flow, get_run_logger, task\n"
            "    @task\n    def double(x):\n        get_run_logger().info('doubling %s', x)\n        return 2 * x\n"
            "    @flow(name='records-check')\n    def check():\n        return double(21)\n"
            "    ready()\n    assert check() == 42\n"
            "from flows.cli import _exit_without_teardown\n_exit_without_teardown(0)\n")   # as `nanopipe run` ends
    for _ in range(2):   # two commands, two temporary servers on one database
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json
    import urllib.request
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PREFECT_HOME", env["PREFECT_HOME"])
        server = TemporaryServer()
    try:
        server.wait_ready(timeout=180)
        def post(path: str, body: dict):
            request = urllib.request.Request(f"{server.api_url}{path}", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        flow_runs = post("/flow_runs/filter", {})
        task_runs = post("/task_runs/filter", {})
        logs = post("/logs/filter", {})
        events = post("/events/filter", {"filter": {"event": {"name": ["prefect.flow-run.Completed",
                                                                         "prefect.task-run.Completed"]}},
                                          "limit": 50})["events"]
    finally:
        server.stop()
    assert sorted(r["state_type"] for r in flow_runs) == ["COMPLETED", "COMPLETED"]
    assert sorted(r["state_type"] for r in task_runs) == ["COMPLETED", "COMPLETED"]
    assert sum("doubling 21" in line["message"] for line in logs) == 2
    names = [e["event"] for e in events]
    assert names.count("prefect.flow-run.Completed") == 2 and names.count("prefect.task-run.Completed") == 2
