"""
The `nanopipe` command: `nanopipe --help` lists the commands, `nanopipe COMMAND --help` a command's options
with their defaults (flows/cli_help.py).

Overrides address `PipelineConfig` fields with dots (`--tok_train.vocab_size=1024`, `--resources.env.X=1`);
`nanopipe stage` and `nanopipe command` also take the stage's own flags undotted. `--home DIR` sets
NANOPIPE_HOME. The Prefect server: `--server`, else the configured API (PREFECT_API_URL, environment or
profile), else a temporary server for the command (flows/local_server.py).

This module lives in flows/ because it drives flows; it imports Prefect only inside the commands that run one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

class UsageError(ValueError):
    """A bad command line: the message names the flag and what is valid."""


# Flags of the commands that are not fields of PipelineConfig
EXTRA_FLAGS = {"home": "NANOPIPE_HOME for this command (where artifacts live)",
               "json": "status: print JSON",
               "server": "the Prefect API: a URL, or 'temporary' (default: PREFECT_API_URL or the active "
                         "profile's, else a temporary server)", "exec": "command: become the launch command instead of printing it"}


def parse_command(argv: list[str], stage=None, extra: tuple[str, ...] = ()) -> tuple[Any, dict[str, str]]:
    """(PipelineConfig, extra flags) from --preset, dotted overrides of any field and the extra flags.

    One parser for everything: nanopipe.configs.flags derives it from PipelineConfig, whose sub-models are
    the stages' own configs; with `stage`, that stage's flags may also be given undotted."""
    from flows.config import PipelineConfig
    from nanopipe.configs.base import ConfigError, build_config
    from nanopipe.configs.flags import parse_flags
    names = ("home", *extra)
    try:
        values = parse_flags(PipelineConfig, argv, prog="nanopipe", bare_prefix=stage.config_field if stage else None,
                             extra_flags={name: EXTRA_FLAGS[name] for name in names})
        extras = {name: values.pop(name) for name in names if name in values}
        config = build_config(PipelineConfig, values)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    if "home" in extras:
        os.environ["NANOPIPE_HOME"] = os.path.abspath(os.path.expanduser(extras["home"]))
    return config, extras


def build_pipeline_config(argv: list[str], stage=None):
    """PipelineConfig from a command line (see parse_command)."""
    return parse_command(argv, stage)[0]


def _true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


# -----------------------------------------------------------------------------
# Commands

def _prefect_defaults() -> None:
    # The embedded server can take a while to come up on a busy machine; and never phone home.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def server_choice(extras: dict[str, str]):
    """The Prefect API this command uses (flows/local_server.py): --server, else the configured one, else a
    temporary server."""
    from flows.local_server import choose_server
    try:
        return choose_server(extras.get("server"))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _explicit_server(argv: list[str]) -> str | None:
    """--server's value on a command line (the last one given), read without the full parse."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith("--server="):
            found = arg.split("=", 1)[1]
        elif arg == "--server" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


@contextlib.contextmanager
def early_server(argv: list[str]):
    """Yields a temporary server started now, before the command line is parsed and the config checked, when
    the command will want one (no --server URL, no configured API); else None. Its start-up (~4 s of CPU: the
    server app's imports) is most of a cached run, so it starts first and everything else overlaps it. A
    command that ends before using it (a bad flag or value) stops it; the choice the full parse makes stands."""
    from flows.local_server import TemporaryServer, choose_server
    _prefect_defaults()
    try:
        temporary = choose_server(_explicit_server(argv)).temporary
        if temporary:
            writable_directory(_prefect_home(), "PREFECT_HOME")
    except (ValueError, UsageError):   # the full parse and check_outputs say what is wrong, as without this
        temporary = False
    server = TemporaryServer() if temporary else None
    try:
        yield server
    finally:
        if server is not None:
            server.stop()   # no-op when the run stopped it


@contextlib.contextmanager
def prefect_api(choice, server=None):
    """Point Prefect at the server `choice` names for this command; yields a function that blocks until that
    server answers. Call it after importing the flow: a temporary server boots while the flow's code imports.
    `server`: a temporary server already started (early_server), used when `choice` wants one.
    Never a server that merely listens on this machine: only the configured API or --server."""
    _prefect_defaults()
    from flows.local_server import TemporaryServer
    if not choice.temporary:
        print(f"nanopipe: using the Prefect API at {choice.url} ({choice.reason})", file=sys.stderr)
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = choice.url
        try:
            yield lambda: None
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before
        return
    server = server or TemporaryServer()
    print(f"nanopipe: starting a temporary Prefect server on {server.api_url} for this run ({choice.reason})",
          file=sys.stderr)
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield functools.partial(server.wait_ready, float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    finally:
        # send what is still queued (the run's last logs and events) while the server is up: otherwise
        # Prefect retries a stopped server at exit for a minute
        if "prefect.logging.handlers" in sys.modules:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker
            for service in (APILogWorker, EventsWorker):
                with contextlib.suppress(Exception):
                    service.drain_all(timeout=15)
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        server.stop()


class Interrupted(Exception):
    """SIGTERM, as an exception the run unwinds through like a Ctrl-C."""


def writable_directory(path: str | os.PathLike, what: str) -> Path:
    """`path` as a directory this command can write into (created if missing), or a UsageError in one line
    naming it: a run that cannot write its outputs should fail in a second, not after minutes of retries."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".nanopipe-write-check-"):
            pass
    except OSError as err:
        raise UsageError(f"{what} {path} cannot be written: {err.strerror or err}") from None
    return path


def _prefect_home() -> str:
    return os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")


def check_outputs(temporary_server: bool = True) -> None:
    """Where this run writes: NANOPIPE_HOME (artifacts) and PREFECT_HOME (the temporary server's database)."""
    from nanopipe.common import base_dir_path
    writable_directory(base_dir_path(), "NANOPIPE_HOME (--home)")
    if temporary_server:
        writable_directory(_prefect_home(), "PREFECT_HOME")


def warm_up(config) -> None:
    """What the flow computes or imports before its first result whatever the server says, done while the
    server starts: the code hashes of the stages it plans (cached per process; ~0.3 s) and the encoder Prefect
    imports to send the parameters (~0.1 s)."""
    from flows.artifacts import code_version
    import fastapi.encoders  # noqa: F401
    for stage in config.planned_stages():
        code_version(stage.code)


def _run_flow(choice, flow_name: str, *args, server=None, warm=None) -> int:
    """Run a flow of flows/pipeline.py to its end; Ctrl-C / SIGTERM stop the stage, write the summary, exit
    130 / 143. The flow module is imported, and `warm` called, while the Prefect server starts (`server`: one
    already started by early_server)."""
    from flows.local_server import ServerUnavailable
    def on_sigterm(signum, frame):
        raise Interrupted("terminated (SIGTERM)")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with prefect_api(choice, server) as server_ready:
            import flows.pipeline
            flow = getattr(flows.pipeline, flow_name)
            if warm:
                warm()
            server_ready()
            state = flow(*args, return_state=True)
    except ServerUnavailable as err:
        print(f"nanopipe: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nanopipe: interrupted (Ctrl-C); the running stage was stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted:
        print("nanopipe: terminated (SIGTERM); the running stage was stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    if _interrupted(state):
        return 128 + _interrupted(state)
    return _report(state)


def _interrupted(state) -> int:
    """The signal a run was stopped by, when its state says so (Prefect reports the exception as a state)."""
    try:
        state.result(raise_on_failure=True)
    except KeyboardInterrupt:
        return signal.SIGINT
    except Interrupted:
        return signal.SIGTERM
    except BaseException:   # an ordinary failure: _report says why
        return 0
    return 0


def check_before_starting(config) -> None:
    """The rules the flow checks at its start (each stage's batch arithmetic for its world size, ...), checked
    here first: a bad value costs a second and no run (the server started early for it is stopped), with
    advice for the run's real world size."""
    from flows.plan import PlanError, check_config
    try:
        check_config(config, config.planned_stages())
    except PlanError as err:
        raise UsageError(str(err)) from None


def cmd_run(argv: list[str]) -> int:
    with early_server(argv) as server:
        config, extras = parse_command(argv, extra=("server",))
        check_before_starting(config)
        choice = server_choice(extras)
        check_outputs(choice.temporary)
        return _run_flow(choice, "full_pipeline", config, server=server, warm=lambda: warm_up(config))


def cmd_stage(argv: list[str]) -> int:
    stage = _stage_argument(argv, "nanopipe stage NAME [--preset P] [flags]")
    with early_server(argv[1:]) as server:
        config, extras = parse_command(argv[1:], stage=stage, extra=("server",))
        planned = config.model_copy(update={"stop_after": None, **({stage.when: True} if stage.when else {})})
        check_before_starting(planned)
        choice = server_choice(extras)
        check_outputs(choice.temporary)
        return _run_flow(choice, "stage_flow", stage.name, config, server=server, warm=lambda: warm_up(planned))


def _stage_argument(argv: list[str], usage: str):
    from flows.stages import STAGE_NAMES, get_stage
    if not argv or argv[0].startswith("-"):
        raise UsageError(f"usage: {usage}; NAME is one of {', '.join(STAGE_NAMES)}")
    try:
        return get_stage(argv[0])
    except KeyError as err:
        raise UsageError(err.args[0]) from None


def cmd_command(argv: list[str]) -> int:
    """Print (or, with --exec, become) one stage's launch command for a config, exactly as the flow runs it.

    On a multi-node run the flow launches torchrun on its own node; every other node runs this with
    --exec and the same flags, and torchrun's rendezvous joins them."""
    import shlex
    from flows.plan import plan_pipeline
    stage = _stage_argument(argv, "nanopipe command NAME [--preset P] [flags] [--exec]")
    config, extras = parse_command(argv[1:], stage, extra=("exec",))
    execute = _true(extras.get("exec"))
    if stage.when:
        config = config.model_copy(update={stage.when: True})
    # planned up to this stage: a later stage's rules must not refuse this one's command
    plan = next(p for p in plan_pipeline(config.model_copy(update={"stop_after": stage.name})) if p.stage == stage.name)
    cmd, env = plan.command(), plan.resources.env
    if execute:
        os.execve(cmd[0], cmd, {**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))
    return 0


def _report(state) -> int:
    if state.is_completed():
        print(f"nanopipe: {state.name}")
        return 0
    print(f"nanopipe: {state.name}: {state.message}", file=sys.stderr)   # "Out of memory: base_train failed: ..."
    return 1


def cmd_status(argv: list[str]) -> int:
    """Which artifacts of a config exist and verify, what is running, and why a stage would run again."""
    from flows.artifacts import lock_holder, read_manifest, verify
    from flows.plan import plan_pipeline, rerun_reasons
    from flows.cli_help import home_and_source
    from flows.recompute import staging_dir, staging_owner
    config, extras = parse_command(argv, extra=("json",))
    as_json = _true(extras.get("json"))
    home, source = home_and_source(extras.get("home"))
    missing = "" if home.is_dir() else "; it does not exist: nothing has run with this home"
    print(f"home: {home} ({source}){missing}", file=sys.stderr if as_json else sys.stdout)
    rows = []
    for plan in plan_pipeline(config):
        directory = Path(plan.artifact_dir)
        check = verify(directory, plan.hash)
        checkpoints = len(list(Path(plan.out_dir).glob(plan.checkpoint_glob))) if Path(plan.out_dir).is_dir() else 0
        if check:
            state = "complete"
        elif read_manifest(directory) is not None:
            state = f"corrupted: {check.reason}"
        elif directory.exists():
            state = "incomplete" + (f" ({checkpoints} checkpoints to resume from)" if checkpoints else "")
        else:
            state = "absent"
        holder = lock_holder(directory)
        if holder:
            state = f"running ({holder})"
        metrics = (read_manifest(directory) or {}).get("metrics", {}) if check else {}
        staging = staging_dir(directory)
        running = lock_holder(staging) if staging.is_dir() else None
        recompute = (None if not staging.is_dir() else f"{staging} (flow run {staging_owner(directory) or '?'}; "
                     + (f"running: {running})" if running else "a retry of that run continues it)"))
        rows.append({"stage": plan.stage, "state": state, "artifact": str(directory), "recompute": recompute,
                     "why": [] if check else rerun_reasons(plan),
                     "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["stage"]) for r in rows)
        for r in rows:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
            print(f"{r['stage']:<{width}}  {r['state']}\n{'':<{width}}  {r['artifact']}")
            if r["why"]:
                print(f"{'':<{width}}  will run: {'; '.join(r['why'])}")
            if r["recompute"]:
                print(f"{'':<{width}}  recompute beside it: {r['recompute']}")
            if shown:
                print(f"{'':<{width}}  {shown}")
    return 0 if all(r["state"] == "complete" for r in rows) else 3


def cmd_presets(argv: list[str]) -> int:
    from flows import presets
    width = max(map(len, presets.PRESET_DESCRIPTIONS))
    for name, text in presets.PRESET_DESCRIPTIONS.items():
        print(f"{name:<{width}}  {text}\n{'':<{width}}  {presets.preset_key_values(name)}")
    if argv:
        name = argv[0]
        print(json.dumps(presets.preset_values(name), indent=2))
    return 0


def cmd_data(argv: list[str]) -> int:
    from nanopipe.data.cli import main as data_main
    data_main(argv, prog="nanopipe data")
    return 0


def cmd_deploy(argv: list[str]) -> int:
    """Create the work pools prefect.yaml needs, deploy it, print the worker commands (flows/deploy.py)."""
    from flows.cli_help import command_parser
    from flows.deploy import DeployError, run_deploy
    args = command_parser("deploy").parse_args(argv)
    _prefect_defaults()
    try:
        return run_deploy(server_choice({"server": args.server} if args.server else {}), gpu=args.gpu)
    except DeployError as err:
        print(f"nanopipe deploy: error: {err}", file=sys.stderr)
        return 1


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "status": cmd_status, "command": cmd_command, "presets": cmd_presets,
            "deploy": cmd_deploy, "data": cmd_data}


def main(argv: list[str] | None = None) -> None:
    from flows.cli_help import command_parser, main_parser
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_parser().format_help())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nanopipe: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n"
              f"{main_parser().format_usage()}", file=sys.stderr)
        raise SystemExit(2)
    if command != "data" and any(arg in ("-h", "--help") for arg in rest):
        print(command_parser(command).format_help())
        raise SystemExit(0)
    try:
        code = COMMANDS[command](rest)
    except Exception as err:
        # flows.plan is imported only now: its imports (~0.4 s of CPU) would otherwise delay the temporary
        # server that `run` and `stage` spawn first
        from flows.plan import PlanError
        if not isinstance(err, (UsageError, PlanError)):
            raise
        print(f"nanopipe {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2)
    if argv_given is None and command in ("run", "stage"):
        _exit_without_teardown(code)
    raise SystemExit(code)


def _exit_without_teardown(code: int) -> None:
    """End the `nanopipe` process as a normal exit does (its other threads waited for, the atexit handlers
    run, the output flushed) but without the interpreter freeing every module one by one: after a run, which
    has loaded Prefect and its server's client, that took ~0.5 s of CPU, with the run's records already on
    the server and the server stopped. Falls back to a normal exit where the interpreter lacks the hook."""
    import atexit
    import threading
    shutdown = getattr(threading, "_shutdown", None)   # what the interpreter itself calls first at exit
    if shutdown is None or not hasattr(atexit, "_run_exitfuncs"):
        raise SystemExit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
