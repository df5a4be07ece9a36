"""
What a person waits for at the command line: a fully cached `nanopipe run`, and each stage's start-up.

    python bench/bench_cli.py                                  # demo-cpu, 5 cached re-runs per mode
    python bench/bench_cli.py --stop_after=tok_eval --repeats=5 --workdir=/tmp/np-cli

1. Produces the preset's artifacts once with `nanopipe run` (skipped when --workdir already holds them).
2. Times `nanopipe run` again (everything Cached), as a subprocess from start to exit, in two modes that
   alternate: with the temporary Prefect server the command starts for itself (`--server=temporary`, what a
   run without PREFECT_API_URL gets), and with a running Prefect server (`prefect server start`, started here
   on a free port) named by `--server=URL` (as PREFECT_API_URL would). Target: <= 5 s for the cached re-run.
   Each figure comes with the load average and the CPU time (user + system) of the command and its server.
3. Start-up per stage: each planned stage command is launched into a scratch output directory and timed to
   its first output line (process spawn + interpreter + imports) and to its first progress line (plus data,
   tokenizer and model setup: the first step for a training stage), then stopped.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.stage_flags import parse_bench_flags  # noqa: E402
from flows.config import PipelineConfig  # noqa: E402
from nanopipe.events import PROGRESS_PREFIX  # noqa: E402  (a stage's progress record, nanopipe/events.py)

RETRYABLE = "Encountered retryable exception in request"


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def nanopipe(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    """(wall seconds, the finished command); its CPU seconds (the command and the temporary server it waits
    for) are in `done.cpu`."""
    started, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    done.cpu = children_cpu() - cpu
    if done.returncode != 0:
        sys.exit(f"nanopipe {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done


def start_prefect_server(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--no-ui"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if json.loads(r.read()) is True:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    sys.exit("the Prefect server did not come up within 300 s")


def stage_startup(plan, scratch: Path, env: dict, timeout: float = 600) -> tuple[float, float | None]:
    """(seconds to the first output line, seconds to the first progress line or None) of one stage command
    writing into `scratch` instead of its artifact directory."""
    cmd = [a.replace(plan.out_dir, str(scratch)) for a in plan.command()]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**env, **plan.resources.env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first_line = first_progress = None
    try:
        for line in proc.stdout:
            now = time.perf_counter() - started
            first_line = first_line if first_line is not None else now
            if line.startswith(PROGRESS_PREFIX) or " " + PROGRESS_PREFIX in line:
                first_progress = now
                break
            if now > timeout:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    return first_line or 0.0, first_progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and the pipeline command's own --preset and --stop_after, in one namespace."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="cached re-runs per mode (alternating)")
    parser.add_argument("--workdir", default=None, help="where the artifacts live (kept; default: a temporary one)")
    parser.add_argument("--skip_startup", "--skip-startup", action="store_true", help="skip the per-stage start-up")
    args, pipeline = parse_bench_flags(parser, [(PipelineConfig, ("preset", "stop_after"))],
                                       scale={"preset": "demo-cpu"}, argv=argv)
    return argparse.Namespace(**vars(args), **pipeline.model_dump())


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nanopipe-cli-bench-")).resolve()
    # Both servers log each request they answer 503 because SQLite said "database is locked" (a write racing
    # another: Prefect's client retries it 2 s later, the report card's requests 0.05 s later, flows/card_first.py),
    # so that the figures can be read with that in mind.
    env = {**os.environ, "NANOPIPE_HOME": str(workdir / "home"), "PREFECT_HOME": str(workdir / "prefect"),
           "PYTHONUNBUFFERED": "1", "PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
    env.pop("PREFECT_API_URL", None)
    run_args = ["run", f"--preset={args.preset}"] + ([f"--stop_after={args.stop_after}"] if args.stop_after else [])

    seconds, _ = nanopipe(run_args + ["--server=temporary"], env)
    print(f"first run (produces or verifies the artifacts): {seconds:.1f} s", flush=True)

    server_log = workdir / "prefect-server.log"
    server, url = start_prefect_server({**env, "PREFECT_HOME": str(workdir / "prefect-server")}, server_log)
    modes = {"temporary server": ["--server=temporary"], "running server": [f"--server={url}"]}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    retried = {m: 0 for m in modes}
    try:
        for i in range(args.repeats):
            order = list(modes) if i % 2 == 0 else list(modes)[::-1]
            for mode in order:
                logged = server_log.stat().st_size
                seconds, done = nanopipe(run_args + modes[mode], env)
                assert "Cached" in done.stdout + done.stderr, "the re-run was not fully cached"
                server_said = server_log.read_bytes()[logged:].decode(errors="replace")
                locked = (done.stdout + done.stderr + (server_said if mode == "running server" else "")
                          ).count(RETRYABLE)
                times[mode].append(seconds)
                cpus[mode].append(done.cpu)
                retried[mode] += locked
                print(f"  cached re-run, {mode}: {seconds:.2f} s, CPU {done.cpu:.2f} s, load average "
                      f"{os.getloadavg()[0]:.2f}"
                      + (f"   ({locked} request(s) answered 503 'database is locked', retried)" if locked else ""),
                      flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    print(f"\ncached `nanopipe {' '.join(run_args)}`, median of {args.repeats} (target <= 5 s); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for mode, values in times.items():
        print(f"  {mode:<22} {statistics.median(values):6.2f} s   (min {min(values):.2f}, max {max(values):.2f}; "
              f"{retried[mode]} retried request(s) in {len(values)} runs); CPU median "
              f"{statistics.median(cpus[mode]):.2f} s")
    print("  CPU: user + system seconds of the command and its temporary server together (not a running server's)")
    sizes = {name: (workdir / name / "prefect.db").stat().st_size / 2**20 for name in ("prefect", "prefect-server")
             if (workdir / name / "prefect.db").exists()}
    print("  Prefect databases: " + ", ".join(f"{name}/prefect.db {mb:.0f} MiB" for name, mb in sizes.items()))

    if args.skip_startup:
        return
    os.environ["NANOPIPE_HOME"] = env["NANOPIPE_HOME"]
    from flows.cli import build_pipeline_config
    from flows.plan import plan_pipeline
    config = build_pipeline_config(run_args[1:])
    print(f"\nstage start-up (command launched into a scratch directory; first output line / first progress line)")
    print(f"  {'stage':<16}{'first line s':>14}{'first progress s':>18}")
    for plan in plan_pipeline(config):
        scratch = Path(tempfile.mkdtemp(prefix=f"{plan.stage}-", dir=workdir))
        first_line, first_progress = stage_startup(plan, scratch, env)
        shown = f"{first_progress:.2f}" if first_progress is not None else "-"
        print(f"  {plan.stage:<16}{first_line:>14.2f}{shown:>18}", flush=True)


if __name__ == "__main__":
    main()
