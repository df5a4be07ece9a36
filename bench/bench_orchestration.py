"""
Orchestration overhead: the full_pipeline flow against the very same stage commands run bare.

    python bench/bench_orchestration.py                       # demo-cpu, one round
    python bench/bench_orchestration.py --preset demo-cpu --rounds 2 --workdir /tmp/np-bench

Each round runs the planned stage commands one after another with plain subprocess calls (no Prefect, no
logging, no manifests) in one fresh NANOPIPE_HOME, then `full_pipeline` on the same config in another,
then `full_pipeline` again (everything Cached). Both read one pre-built builtin corpus. Without
PREFECT_API_URL the flow talks to Prefect's temporary server, started (and timed) before the first round.
Prints figures; asserts nothing about time (the target is flow / bare <= 1.05 on demo-cpu).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_bare(values: dict, home: Path) -> tuple[float, dict[str, float]]:
    """The stage commands of the plan, in order, each to completion: (total seconds, per stage)."""
    from flows.config import PipelineConfig
    from flows.plan import plan_pipeline
    os.environ["NANOPIPE_HOME"] = str(home)
    per_stage = {}
    started = time.perf_counter()
    for plan in plan_pipeline(PipelineConfig.model_validate(values), home=home):
        Path(plan.artifact_dir).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(Path(plan.artifact_dir) / "bare.log", "w") as log:
            subprocess.run(plan.command(), env={**os.environ, **plan.resources.env}, stdout=log,
                           stderr=subprocess.STDOUT, check=True)
        per_stage[plan.stage] = time.perf_counter() - t0
    return time.perf_counter() - started, per_stage


def run_flow(values: dict, home: Path) -> tuple[float, dict[str, tuple[str, float]], float]:
    """full_pipeline in this process: (wall seconds, per stage (state, task seconds), seconds inside the
    stage processes themselves, from the manifests)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from flows.artifacts import read_manifest
    from flows.pipeline import full_pipeline
    os.environ["NANOPIPE_HOME"] = str(home)
    started = time.perf_counter()
    state = full_pipeline(values, return_state=True)
    wall = time.perf_counter() - started
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    per_stage = {r.name.split(":")[0]: (r.state.name, r.total_run_time.total_seconds()) for r in runs}
    in_stages = sum(read_manifest(ref.path)["timings"]["seconds"] for ref in state.result().values())
    return wall, per_stage, in_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo-cpu")
    parser.add_argument("--rounds", type=int, default=1, help="bare / flow / cached rounds (median reported)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nanopipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    import flows.pipeline  # noqa: F401  (imports torch and the stage modules, as a flow run does)
    import_seconds = time.perf_counter() - t0
    from nanopipe.data import ensure_builtin
    data_dir = ensure_builtin(workdir / "builtin")
    values = {"preset": args.preset, "data": {"data_source": "builtin", "data_dir": str(data_dir)}}
    t0 = time.perf_counter()
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        client.hello()   # starts the temporary server unless PREFECT_API_URL points at one
    server_seconds = time.perf_counter() - t0

    bare, flow, cached = [], [], []
    for i in range(args.rounds):
        # alternate the order, so a drift in machine load does not favour one side
        if i % 2 == 0:
            bare.append(run_bare(values, workdir / f"bare-{i}"))
            flow.append(run_flow(values, workdir / f"flow-{i}"))
        else:
            flow.append(run_flow(values, workdir / f"flow-{i}"))
            bare.append(run_bare(values, workdir / f"bare-{i}"))
        cached.append(run_flow(values, workdir / f"flow-{i}"))
        assert {s for s, _ in cached[-1][1].values()} == {"Cached"}, cached[-1][1]
        print(f"round {i}: bare {bare[-1][0]:.2f} s, flow {flow[-1][0]:.2f} s "
              f"(ratio {flow[-1][0] / bare[-1][0]:.3f}), cached {cached[-1][0]:.2f} s", flush=True)

    bare_total = statistics.median(b[0] for b in bare)
    flow_total = statistics.median(f[0] for f in flow)
    cached_total = statistics.median(c[0] for c in cached)
    ratio = statistics.median(f[0] / b[0] for f, b in zip(flow, bare))
    outside = statistics.median(f[0] - f[2] for f in flow)
    print(f"\npreset {args.preset}, {args.rounds} round(s), medians; {os.cpu_count()} CPUs")
    print(f"{'stage':<12}{'bare s':>10}{'in flow s':>12}")
    for step in bare[-1][1]:
        b = statistics.median(r[1][step] for r in bare)
        f = statistics.median(r[1][step][1] for r in flow)
        print(f"{step:<12}{b:>10.2f}{f:>12.2f}")
    print(f"{'total':<12}{bare_total:>10.2f}{flow_total:>12.2f}")
    print(f"orchestration overhead: flow / bare = {ratio:.3f} (median of rounds; target <= 1.05)")
    print(f"flow time outside the stage processes (planning, preflight, Prefect, manifests): {outside:.2f} s")
    print(f"fully cached re-run: {cached_total:.2f} s")
    print(f"once per process, not in the figures above: imports {import_seconds:.1f} s, "
          f"Prefect server start {server_seconds:.1f} s")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
