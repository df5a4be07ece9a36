"""
What each stage taught, over several seeds: runs the whole pipeline (`nanopipe run --preset P`) once per seed
in its own home, or reuses homes where those runs already finished, then prints the report card's "What
each stage taught" table per seed and one line per metric across seeds (mean and range of the score after
the stage, of the gain, and of the gain in standard errors).

    python bench/bench_stage_gains.py --preset=demo-cpu --seeds=1,2,3 --workdir=/tmp/gains
    python bench/bench_stage_gains.py --preset=demo-cpu --seeds=1,2,3 --workdir=/tmp/gains --reuse

Like `bash scripts/demo.sh`, it runs RL (`--run_rl=true`; a later `--run_rl=false` wins). Seed s sets
`common.seed=s` for every stage: it changes weight initialisation, data order and sampling; the
held-out problems stay the same (the builtin tasks' test split, fixed seeds). Each run goes through the real
flow with Prefect's temporary server, exactly like `bash scripts/demo.sh`, and its wall time is printed.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.artifacts import read_manifest  # noqa: E402
from flows.cli import build_pipeline_config  # noqa: E402
from flows.config import PipelineConfig  # noqa: E402
from flows.plan import plan_pipeline  # noqa: E402
from flows.taught import Taught, taught_markdown, taught_rows  # noqa: E402


def pipeline_config(preset: str, seed: int, overrides: list[str]) -> tuple[PipelineConfig, list[str]]:
    """The config `nanopipe run --preset P --common.seed=s <overrides>` runs, and those flags."""
    flags = ["--run_rl=true", f"--common.seed={seed}", *overrides]
    return build_pipeline_config(["--preset", preset, *flags]), flags


def artifact_dirs(config: PipelineConfig, home: Path) -> dict[str, Path]:
    """{stage: artifact directory} as the run plans them (call it before the run: the names hash the code)."""
    return {plan.stage: Path(plan.artifact_dir) for plan in plan_pipeline(config, home=home)}


def stage_metrics(planned: dict[str, Path], home: Path) -> dict[str, dict]:
    """{stage: metrics} of every stage whose artifact is complete (its manifest reads): the planned one, or
    where that is missing (the code changed since the run) the stage's newest complete artifact in `home`."""
    metrics = {}
    for stage, directory in planned.items():
        manifest = read_manifest(directory)
        if manifest is None:
            candidates = [read_manifest(d) for d in sorted((home / "artifacts" / stage).glob("*"),
                                                           key=lambda d: d.stat().st_mtime, reverse=True)]
            manifest = next((m for m in candidates if m is not None), None)
            if manifest is not None:
                print(f"  {stage}: the planned artifact is missing, reading the newest complete one instead")
        if manifest is not None:
            metrics[stage] = manifest.get("metrics") or {}
    return metrics


def run_pipeline(preset: str, flags: list[str], home: Path) -> float:
    """Run the pipeline in `home`; its wall time in seconds (the run's output goes to home/run.log)."""
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--home", str(home), *flags]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(home / "run.log", "w") as log:
        result = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(f"  the run failed (exit {result.returncode}); see {home / 'run.log'}")
    return seconds


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    return f"{mean:.{digits}f} ({min(values) * scale:.{digits}f} to {max(values) * scale:.{digits}f})"


def across_seeds(per_seed: dict[int, list[Taught]]) -> list[str]:
    """One line per (stage, metric): after, gain and z over the seeds, and how many seeds called it signal."""
    keys = list(dict.fromkeys((r.stage, r.metric) for rows in per_seed.values() for r in rows))
    lines = ["| stage | metric | seeds | after, mean (range) | gain, mean (range) | z, mean (range) | signal |",
             "|---|---|---|---|---|---|---|"]
    for stage, metric in keys:
        rows = [r for rows in per_seed.values() for r in rows if (r.stage, r.metric) == (stage, metric)]
        percent = not rows[0].lower_is_better
        scale, digits = (100.0, 1) if percent else (1.0, 3)
        afters = [r.after for r in rows if r.after is not None]
        gains = [r.gain for r in rows if r.gain is not None]
        zs = [r.z for r in rows if r.z is not None]
        signal = sum(r.verdict in ("signal", "learned") for r in rows)
        lines.append(f"| {stage} | {metric} | {len(rows)} | {_spread(afters, scale, digits)} | "
                     f"{_spread(gains, scale, digits)} | {_spread(zs)} | {signal}/{len(rows)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo-cpu")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, one run each")
    parser.add_argument("--workdir", type=Path, required=True, help="homes go to WORKDIR/seed<s>")
    parser.add_argument("--reuse", action="store_true", help="only read homes that already ran (no new run)")
    args, overrides = parser.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"command: python bench/bench_stage_gains.py --preset={args.preset} --seeds={args.seeds} "
          f"--workdir={args.workdir}{' --reuse' if args.reuse else ''} {' '.join(overrides)}".rstrip())
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    per_seed: dict[int, list[Taught]] = {}
    for seed in seeds:
        config, flags = pipeline_config(args.preset, seed, overrides)
        home = args.workdir / f"seed{seed}"
        planned = artifact_dirs(config, home)
        if not args.reuse:
            seconds = run_pipeline(args.preset, flags, home)
            print(f"seed {seed}: whole pipeline {seconds / 60:.1f} min (load average {os.getloadavg()[0]:.2f})")
        per_seed[seed] = taught_rows(stage_metrics(planned, home))
        print(f"\n### seed {seed} ({home})\n")
        print("\n".join(taught_markdown(per_seed[seed])[2:]) or "no finished stage in this home")
    print("\n### across seeds\n")
    print("\n".join(across_seeds(per_seed)))


if __name__ == "__main__":
    main()
