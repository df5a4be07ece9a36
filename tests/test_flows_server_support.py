"""A real Prefect server on loopback, set up as deployments/README.md's setup block says (the server, its API in
PREFECT_API_URL, `nanopipe deploy` for the pools and the deployments, a worker on the `nanopipe` pool):
started once per test session and shared by the server, UI and work-pool tests (tests/test_deploy.py runs
the block itself, line by line, as written).

(No tests here; the module name only keeps it among the orchestration test files.)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = "nanopipe"

# The config the deployed flows run in these tests: demo-cpu shrunk to seconds, on one shared corpus.
TINY = {"preset": "demo-cpu", "stop_after": "tok_train",
        "tok_train": {"max_chars": 300_000, "vocab_size": 512},
        "resources": {"nproc_per_node": 1, "retries": 0, "env": {"OMP_NUM_THREADS": "1"}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectStack:
    root: Path
    port: int
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nanopipe_home(self) -> Path:
        return Path(self.env["NANOPIPE_HOME"])

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prefect", *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def spawn(self, *args: str, log_name: str) -> subprocess.Popen:
        log = open(self.root / log_name, "w")
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], env=self.env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)  # a failure has already quoted the logs it needs


def _wait_healthy(stack: PrefectStack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(stack.api_url + "/health", timeout=2) as response:
                if json.loads(response.read()) is True:
                    return
        except OSError:
            pass
        if stack.processes[0].poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"prefect server did not come up on {stack.api_url}:\n{stack.log('server.log')}")


def _start() -> PrefectStack:
    root = Path(tempfile.mkdtemp(prefix="nanopipe-prefect-"))
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # SQLite under a busy 2-core machine: a write can wait for the lock longer than the defaults
        # (10 s / 5 s), and the server then answers 503 to the UI's create_flow_run
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
        "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
        "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",  # say in server.log why a request got a 503
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "NANOPIPE_HOME": str(root / "nanopipe-home"),
        "PYTHONUNBUFFERED": "1",
    }
    stack = PrefectStack(root, port, env)
    stack.spawn("server", "start", "--host", "127.0.0.1", "--port", str(port), log_name="server.log")
    try:
        _wait_healthy(stack, timeout=180)
        # the README's `nanopipe deploy` (its pools, then `prefect deploy --all`), at the API in PREFECT_API_URL
        done = subprocess.run([str(Path(sys.executable).parent / "nanopipe"), "deploy"], env=stack.env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"nanopipe deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        stack.spawn("worker", "start", "--pool", POOL, "--limit", "2", log_name="worker.log")
    except BaseException:
        stack.stop()
        raise
    return stack


_STACK: PrefectStack | None = None


def prefect_stack() -> PrefectStack:
    """The session's server + deployments + worker (started on first use, stopped at exit)."""
    global _STACK
    if _STACK is None:
        _STACK = _start()
        atexit.register(_STACK.stop)
    return _STACK


def flow_run_state(stack: PrefectStack, flow_run_id: str):
    from prefect.client.orchestration import SyncPrefectClient
    with SyncPrefectClient(stack.api_url) as client:
        return client.read_flow_run(flow_run_id).state


def wait_for_state(stack: PrefectStack, flow_run_id: str, final: set[str], timeout: float, name: str = ""):
    """The run's state once its type is one of `final` (and, with `name`, its name starts with that)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = flow_run_state(stack, flow_run_id)
        if state.type.value in final and state.name.startswith(name):
            return state
        time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} still {state and state.name} after {timeout} s; worker log:\n"
                         f"{stack.log('worker.log')}")
