"""
Plan a pipeline run before anything runs: every step's full config, content hash and artifact directory.

Hashes depend only on configs and upstream hashes, never on upstream outputs, so the whole plan (and
`nanopipe status`) is known up front. Planning validates every stage's config; `preflight` then runs the
dry-run check of each training stage that is about to execute, so a bad late-stage setting fails in
seconds instead of after hours of pretraining.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from flows.artifacts import artifact_dir, artifact_hash, code_version, read_manifest, verify
from flows.config import PipelineConfig
from flows.launcher import Resources, stage_command
from flows.stages import STEP_NAMES, STEPS, Step, get_step
from nanopipe.config import ConfigError, build_config, config_digest, to_cli_args
from nanopipe.common import get_base_dir


class StagePlan(BaseModel):
    """One step, fully resolved: what to launch, with which flags, writing where."""

    step: str
    module: str
    tag: str
    hash: str = Field(description="content address of the step's artifact")
    code_version: str = Field(description="package version + hash of the stage module and what it imports")
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

    def command(self) -> list[str]:
        """The launch command; identical on every node and every attempt (resuming is the stage's job)."""
        return stage_command(self.module, self.args, self.resources, self.distributed)


class PlanError(ValueError):
    """A stage config is invalid, or the pipeline cannot be assembled; names the stage and the flag."""


def plan_pipeline(config: PipelineConfig, home: str | os.PathLike | None = None) -> list[StagePlan]:
    """Resolve every enabled step of the pipeline, in order."""
    home = Path(home) if home else get_base_dir()
    plans: dict[str, StagePlan] = {}
    for step in STEPS:
        if config.enabled(step):
            plans[step.name] = plan_step(config, step, plans, code_version(step.module), home)
        if step.name == config.stop_after:
            break
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
        if step.resume_flag:
            wired[step.resume_flag[0]] = step.resume_flag[1]
        cfg = config.stage_config(step, wired=wired)
    except ConfigError as err:
        raise PlanError(f"stage {step.name}: {err}") from None
    return StagePlan(
        step=step.name, module=step.module, tag=step.tag(semantic), hash=digest, code_version=code,
        artifact_dir=str(directory),
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

_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def dry_run_env(plan: StagePlan) -> dict[str, str]:
    # torchrun's variables without torchrun: the stage sees the world size it will train with (so the
    # batch arithmetic is checked for it) while a dry run never joins a process group
    world_size = plan.resources.nproc_per_node * plan.resources.nnodes
    return {**plan.resources.env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}


def dry_run(plan: StagePlan) -> str:
    """Run the stage's own dry run (`run(cfg)` with its dry-run flag) here, in-process: the stage module is
    already imported for its config, so the check costs milliseconds instead of a new interpreter.
    Returns what it printed; raises PlanError naming the stage."""
    module = importlib.import_module(plan.module)
    config_class = PipelineConfig.model_fields[get_step(plan.step).config_field].annotation
    out = io.StringIO()
    try:
        cfg = build_config(config_class, {**plan.config, plan.dry_run_flag: True})
        with _environment(dry_run_env(plan)), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module.run(cfg)
    except (Exception, SystemExit) as err:   # any failure of the check is the answer: report it, with output
        tail = "\n".join(out.getvalue().strip().splitlines()[-15:])
        raise PlanError(f"stage {plan.step}: dry run failed: {type(err).__name__}: {err}\n{tail}".rstrip()) from None
    return out.getvalue()


def preflight(plans: list[StagePlan], log=print) -> None:
    """Dry-run every plan that has a dry-run flag; raise naming each failing stage (all of them)."""
    failures = []
    for plan in plans:
        if not plan.dry_run_flag:
            continue
        try:
            output = dry_run(plan)
        except PlanError as err:
            failures.append(str(err))
            continue
        log(f"preflight {plan.step}: ok\n" + "\n".join(output.strip().splitlines()[-12:]))
    if failures:
        raise PlanError("preflight failed before any stage ran:\n" + "\n\n".join(failures))
