"""
Plan a pipeline run before anything runs: every step's full config, content hash and artifact directory.

Hashes depend only on configs and upstream hashes, never on upstream outputs, so the whole plan (and
`nanopipe status`) is known up front. Planning validates every stage's config; `preflight` then runs the
dry-run check of each training stage that is about to execute, so a bad late-stage setting fails in
seconds instead of after hours of pretraining.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from flows.artifacts import artifact_dir, artifact_hash, code_version, read_manifest, verify
from flows.config import PipelineConfig
from flows.launcher import Resources, stage_command
from flows.stages import STEP_NAMES, STEPS, Step, get_step
from nanopipe.config import ConfigError, config_digest, to_cli_args
from nanopipe.common import get_base_dir


class StagePlan(BaseModel):
    """One step, fully resolved: what to launch, with which flags, writing where."""

    step: str
    module: str
    tag: str
    hash: str = Field(description="content address of the step's artifact")
    artifact_dir: str
    out_dir: str = Field(description="the stage's --out_dir inside the artifact directory")
    config: dict[str, Any] = Field(description="the stage config as launched (inputs and out_dir wired)")
    args: list[str] = Field(description="command-line flags reproducing `config`")
    upstream: dict[str, dict[str, str]] = Field(default_factory=dict, description="input field -> step, hash, path")
    resources: Resources
    distributed: bool
    resume_flag: tuple[str, str] | None = None
    checkpoint_glob: str = "model_*.pt"
    dry_run_flag: str | None = None

    def command(self, extra_args: list[str] = ()) -> list[str]:
        return stage_command(self.module, [*self.args, *extra_args], self.resources, self.distributed)


class PlanError(ValueError):
    """A stage config is invalid, or the pipeline cannot be assembled; names the stage and the flag."""


def plan_pipeline(config: PipelineConfig, home: str | os.PathLike | None = None) -> list[StagePlan]:
    """Resolve every enabled step of the pipeline, in order."""
    home = Path(home) if home else get_base_dir()
    code = code_version()
    plans: dict[str, StagePlan] = {}
    for step in STEPS:
        if not config.enabled(step):
            continue
        plans[step.name] = plan_step(config, step, plans, code, home)
    return list(plans.values())


def plan_step(config: PipelineConfig, step: Step, upstream_plans: dict[str, StagePlan], code: str,
              home: Path) -> StagePlan:
    missing = [up for up, _ in step.inputs.values() if up not in upstream_plans]
    if missing:
        raise PlanError(f"stage {step.name} reads from {', '.join(missing)}, which this pipeline does not run")
    try:
        # the digest sees the config as the user gave it: wired inputs are covered by the upstream hashes
        semantic = config.stage_config(step, wired={f: None for f in step.inputs})
        upstream = {f: upstream_plans[up] for f, (up, _) in step.inputs.items()}
        digest = artifact_hash(step.name, config_digest(semantic), {f: p.hash for f, p in upstream.items()}, code)
        directory = artifact_dir(step.name, step.tag(semantic), digest, home)
        wired = {f: str(Path(upstream[f].artifact_dir) / sub) for f, (_, sub) in step.inputs.items()}
        wired["out_dir"] = str(directory / step.output)
        cfg = config.stage_config(step, wired=wired)
    except ConfigError as err:
        raise PlanError(f"stage {step.name}: {err}") from None
    return StagePlan(
        step=step.name, module=step.module, tag=step.tag(semantic), hash=digest, artifact_dir=str(directory),
        out_dir=wired["out_dir"], config=cfg.model_dump(mode="json"), args=to_cli_args(cfg),
        upstream={f: {"step": p.step, "hash": p.hash, "path": p.artifact_dir} for f, p in upstream.items()},
        resources=config.resources_for(step), distributed=step.distributed, resume_flag=step.resume_flag,
        checkpoint_glob=step.checkpoint_glob, dry_run_flag=step.dry_run_flag)


def is_complete(plan: StagePlan) -> bool:
    return bool(verify(plan.artifact_dir, plan.hash))


def produced_by(plan: StagePlan) -> str | None:
    """Flow run id recorded in the artifact's manifest (None when absent)."""
    manifest = read_manifest(plan.artifact_dir) or {}
    return manifest.get("flow_run_id")


def steps_from(plans: list[StagePlan], name: str | None) -> set[str]:
    """The planned steps at or after `name` in pipeline order (none for None)."""
    if name is None:
        return set()
    get_step(name)   # a clear error for an unknown name
    first = STEP_NAMES.index(name)
    return {p.step for p in plans if STEP_NAMES.index(p.step) >= first}


# -----------------------------------------------------------------------------
# Preflight: each training stage's own dry run (shapes, batch arithmetic, memory estimate)

def dry_run_command(plan: StagePlan) -> list[str]:
    return stage_command(plan.module, [*plan.args, f"--{plan.dry_run_flag}=true"], plan.resources, distributed=False)


def _dry_run(plan: StagePlan, timeout_seconds: float) -> tuple[str, int, str]:
    env = {**os.environ, **plan.resources.env, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(dry_run_command(plan), capture_output=True, text=True, env=env,
                              timeout=timeout_seconds, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return plan.step, -1, f"dry run did not finish in {timeout_seconds:.0f} s"
    return plan.step, proc.returncode, (proc.stdout + proc.stderr)


def preflight(plans: list[StagePlan], timeout_seconds: float = 300.0, log=print) -> None:
    """Run the dry-run check of every plan that has one, in parallel; raise naming each failing stage."""
    checks = [p for p in plans if p.dry_run_flag]
    if not checks:
        return
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(checks))) as pool:
        for step, code, output in pool.map(lambda p: _dry_run(p, timeout_seconds), checks):
            if code != 0:
                tail = "\n".join(output.strip().splitlines()[-15:])
                failures.append(f"stage {step}: dry run failed (exit code {code}):\n{tail}")
            else:
                log(f"preflight {step}: ok\n" + "\n".join(output.strip().splitlines()[-12:]))
    if failures:
        raise PlanError("preflight failed before any stage ran:\n" + "\n\n".join(failures))
