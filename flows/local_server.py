"""
Which Prefect API a `nanopipe` command talks to, and the temporary server it starts when there is none.

As Prefect itself decides: `--server URL` or `--server temporary` when given; else PREFECT_API_URL from the
environment or the active Prefect profile; else a temporary server of our own, for this one command. A
server that merely happens to listen on this machine (say `prefect server start` on 127.0.0.1:4200, maybe
another user's) is never joined: point PREFECT_API_URL (or a profile, or --server) at it to use it.

The temporary server is Prefect's own API app under uvicorn, the way Prefect starts its ephemeral server,
with three differences that matter to us:
- it is spawned first, before the command line is parsed and the flow code imported, so its start-up (~4 s
  of CPU, nearly all of it importing the server app and building it) overlaps all of ours instead of
  following it; Prefect's helper for this imports the whole server app into the client process first
  (~3.5 s here) and only then spawns it;
- it runs in its own session, so a Ctrl-C or SIGTERM meant for the run never reaches it (the run still
  needs it to record how it ended);
- it dies with this process even on SIGKILL (parent-death signal, flows/parent_death.py);
- what it has no use for is off (TemporaryServer.DEFAULTS): telemetry and automations. Every record of the run
  is written as before.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flows.parent_death import die_with_parent

TEMPORARY = "temporary"


def answers(api_url: str, timeout: float = 0.5) -> bool:
    """Does a Prefect API answer its health check at `api_url` within `timeout` seconds?"""
    import urllib.request   # not before the server is spawned: this module is imported on the way to it
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200 and json.loads(response.read() or b"false") is True
    except (OSError, ValueError):
        return False


def prefect_home() -> Path:
    """PREFECT_HOME, as Prefect reads it: where its profiles and the temporary server's database live."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def active_profile() -> tuple[str, dict]:
    """(name, settings) of the active profile in Prefect's profiles.toml; ({}) when there is none to read."""
    try:
        import tomllib
    except ImportError:   # Python 3.10: no profile lookup; the environment still works
        return "", {}
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return "", {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return active, profiles.get("profiles", {}).get(active) or {}


def configured_api() -> tuple[str, str] | None:
    """(PREFECT_API_URL, where it was found) from the environment or the active profile of Prefect's
    profiles.toml; None when neither sets one.

    Read without importing Prefect: its settings, once read in a process, stay fixed, and the temporary
    server's address must be in the environment before that happens."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "PREFECT_API_URL"
    active, settings = active_profile()
    url = settings.get("PREFECT_API_URL")
    return (url, f"Prefect profile {active!r}") if url else None


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active profile (see configured_api)."""
    found = configured_api()
    return found[0] if found else None


@dataclass(frozen=True)
class ServerChoice:
    """The API a command uses: `url` (None: a temporary server of its own) and why, in words."""

    url: str | None
    reason: str

    @property
    def temporary(self) -> bool:
        return self.url is None


def choose_server(explicit: str | None = None) -> ServerChoice:
    """--server (a URL, or `temporary`) when given, else the configured API, else a temporary server.

    ValueError names what --server accepts when `explicit` is neither."""
    if explicit is not None:
        value = explicit.strip()
        if value.lower() == TEMPORARY:
            return ServerChoice(None, "--server temporary")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"--server takes a Prefect API URL (http://HOST:4200/api) or '{TEMPORARY}', "
                             f"not {explicit!r}")
        return ServerChoice(value, "--server")
    found = configured_api()
    if found:
        return ServerChoice(*found)
    return ServerChoice(None, "no PREFECT_API_URL in the environment or the active Prefect profile")


class ServerUnavailable(RuntimeError):
    """The temporary server could not be started: the command ends with this one sentence."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """Prefect's API on a free loopback port, in a child process that starts now and is waited for later.
    Spawned as early as a command can (flows/cli.py early_server): only the standard library before it."""

    def __init__(self):
        from importlib.util import find_spec
        prefect_dir = Path(find_spec("prefect").origin).parent
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**self.DEFAULTS, **os.environ, "PREFECT_UI_ENABLED": "0",
                    "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=self.env, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
        self.started = time.monotonic()

    # Prefect settings of the temporary server that the environment may override. All of the run's records (flow
    # and task runs, states, logs, events, artifacts) are written as by any Prefect server; off are what a server
    # living for one command has no use for: telemetry (nothing to report, and on a machine without internet
    # access its service prints an error into the run's output) and automations (a run's events are kept, but
    # no automation reacts to them here).
    DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false"}

    def wait_ready(self, timeout: float) -> None:
        """Block until the server answers; ServerUnavailable naming the cause when it exits or times out."""
        deadline = self.started + timeout
        while not answers(self.api_url, timeout=1.0):
            if self.process.poll() is not None:
                raise ServerUnavailable(f"the temporary Prefect server exited with code {self.process.returncode} "
                                   f"before answering (its error is printed above)")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                                   f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
