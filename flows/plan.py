"""
Plan a pipeline run before anything runs: every stage's full config, content hash and artifact directory.

Hashes depend only on configs, declared code and upstream hashes, never on upstream outputs, so the whole
plan (and `nanopipe status`) is known up front. Planning validates every stage's config; `preflight` then
runs the dry run of each training stage that is about to execute, so a bad late-stage setting fails in
seconds instead of after hours of pretraining. `rerun_reasons` says why a stage will run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from flows.artifacts import MANIFEST, artifact_dir, artifact_hash, code_hashes, code_version, read_manifest
from flows.config import PipelineConfig
from flows.launcher import Resources, launch, stage_command, stage_reason
from flows.stages import Stage, get_stage
from flows.store import StoreError, check_store
from nanopipe.configs.flags import to_cli_args
from nanopipe.configs import ConfigError, config_digest, non_semantic_fields
from nanopipe.configs.base import world_size_checked_later
from nanopipe.configs.base_eval import check_bpb_batches
from nanopipe.configs.base_train import check_batch_sizes
from nanopipe.configs.chat_rl import check_world_size
from nanopipe.configs.chat_sft import check_sft_batch_sizes
from nanopipe.configs.mid_train import check_mid_batch_sizes
from nanopipe.configs.chat_eval import DATA_PATH_FIELDS
from nanopipe.common import get_base_dir
from nanopipe.events import Plan, last
from nanopipe.remote import RemoteFile, availability_problem, is_url, remote_file
from nanopipe.tasks import arc, gsm8k, humaneval, mmlu, smoltalk
from nanopipe.tasks.spelling import is_remote_words, word_list_remote


class StagePlan(BaseModel):
    """One stage, fully resolved: what to launch, with which flags, writing where."""

    stage: str
    module: str
    tag: str
    hash: str = Field(description="content address of the stage's artifact")
    code_version: str = Field(description="package version + hash of the modules the stage declares")
    code: dict[str, str] = Field(default_factory=dict, description="declared module -> hash of its source")
    data: str | None = Field(None, description="fingerprint of the local text shards the stage reads, if any")
    artifact_dir: str
    out_dir: str = Field(description="the stage's --out_dir inside the artifact directory")
    config: dict[str, Any] = Field(description="the stage config as launched (inputs and out_dir wired)")
    semantic_config: dict[str, Any] = Field(default_factory=dict, description="the fields in the hash")
    args: list[str] = Field(description="command-line flags reproducing `config`")
    upstream: dict[str, dict[str, str]] = Field(default_factory=dict, description="input field -> stage, hash, path")
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
    """Resolve every enabled stage of the pipeline, in order. Every rule a stage would reject is checked
    first (`check_config`: in-process, torch-free, before hashing any code), so a bad setting fails in the
    run's first second with a PlanError naming the stage and the flags."""
    home = Path(home) if home else get_base_dir()
    stages = config.planned_stages()
    check_config(config, stages)
    store = config.store_url()
    if store:  # an unusable store would otherwise be a warning per stage, and a run Completed with nothing kept
        try:
            check_store(store, "artifact_store" if config.artifact_store else "$NANOPIPE_ARTIFACT_STORE")
        except StoreError as err:
            raise PlanError(str(err)) from None
    plans: dict[str, StagePlan] = {}
    for stage in stages:
        plans[stage.name] = plan_stage(config, stage, plans, home)
    return list(plans.values())


# The rules of a stage's config that depend on the world size: the stage calls the same function at start
WORLD_CHECKS: dict[str, Callable[[Any, int], Any]] = {
    "base_train": check_batch_sizes, "mid_train": check_mid_batch_sizes, "chat_sft": check_sft_batch_sizes,
    "chat_rl": check_world_size}


def check_config(config: PipelineConfig, stages: list[Stage]) -> None:
    """Each stage's config, and the cross-field rules a stage checks only once launched: its batch arithmetic
    for the world size it gets (`WORLD_CHECKS`), and base_eval's bits-per-byte batch in the context
    base_train gives the model."""
    configs: dict[str, Any] = {}
    for stage in stages:
        resources = config.resources_for(stage)
        world = resources.nproc_per_node * resources.nnodes
        try:
            with world_size_checked_later():   # checked just below, for the world size the stage gets
                cfg = config.stage_config(stage, wired={f: None for f in stage.inputs})
        except ConfigError as err:
            raise PlanError(f"stage {stage.name}: {err}") from None
        try:
            if stage.name in WORLD_CHECKS:
                WORLD_CHECKS[stage.name](cfg, world)
            if stage.name == "base_eval" and "base_train" in configs:
                check_bpb_batches(cfg, configs["base_train"].max_seq_len, world)
        except ConfigError as err:
            layout = f"resources: nproc_per_node={resources.nproc_per_node} x nnodes={resources.nnodes}"
            raise PlanError(f"stage {stage.name} on {world} process(es) ({layout}): {err}") from None
        configs[stage.name] = cfg


def plan_stage(config: PipelineConfig, stage: Stage, upstream_plans: dict[str, StagePlan], home: Path) -> StagePlan:
    missing = [up for up, _ in stage.inputs.values() if up not in upstream_plans]
    if missing:
        raise PlanError(f"stage {stage.name} reads from {', '.join(missing)}, which this pipeline does not run")
    code = code_version(stage.code)
    try:
        # the digest sees the config as the user gave it: wired inputs are covered by the upstream hashes
        semantic = config.stage_config(stage, wired={f: None for f in stage.inputs})
        upstream = {f: upstream_plans[up] for f, (up, _) in stage.inputs.items()}
        data = data_fingerprint(semantic)
        inputs = {f: p.hash for f, p in upstream.items()} | ({"data": data} if data else {})
        digest = artifact_hash(stage.name, config_digest(semantic), inputs, code)
        directory = artifact_dir(stage.name, stage.tag(semantic), digest, home)
        wired = {f: str(Path(upstream[f].artifact_dir) / sub) for f, (_, sub) in stage.inputs.items()}
        wired["out_dir"] = str(directory / stage.output)
        if stage.resume_flag:
            wired[stage.resume_flag[0]] = stage.resume_flag[1]
        cfg = config.stage_config(stage, wired=wired)
    except ConfigError as err:
        raise PlanError(f"stage {stage.name}: {err}") from None
    return StagePlan(
        stage=stage.name, module=stage.module, tag=stage.tag(semantic), hash=digest, code_version=code,
        code=code_hashes(stage.code), data=data, artifact_dir=str(directory), out_dir=wired["out_dir"],
        config=cfg.model_dump(mode="json"),
        semantic_config=semantic.model_dump(mode="json", exclude=non_semantic_fields(type(semantic))),
        args=to_cli_args(cfg),
        upstream={f: {"stage": p.stage, "hash": p.hash, "path": p.artifact_dir} for f, p in upstream.items()},
        resources=config.resources_for(stage), distributed=stage.distributed, resume_flag=stage.resume_flag,
        checkpoint_glob=stage.checkpoint_glob, dry_run_flag=stage.dry_run_flag)


def data_fingerprint(cfg) -> str | None:
    """What identifies the local shards a stage reads: every parquet file's name, size and modification
    time (new shards prepared into the same directory change it; reading them to hash is not needed).
    None for builtin data (made by code, covered by the code version) and the hub (identified by its repo)."""
    if getattr(cfg, "data_source", None) != "local" or not getattr(cfg, "data_dir", None):
        return None
    directory = Path(cfg.data_dir).expanduser()
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.glob("*.parquet"))
    if not entries:
        return None   # the stage itself says that the directory holds no shards
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# Why a stage will run again: compare the plan with the newest complete artifact of the same stage

def _latest_manifest(plan: StagePlan) -> dict | None:
    """The most recently written manifest of another artifact of this stage (any tag), if any."""
    stage_dir = Path(plan.artifact_dir).parent   # artifacts/<stage>/
    candidates = [m for m in stage_dir.glob(f"*/{MANIFEST}") if m.parent != Path(plan.artifact_dir)]
    for path in sorted(candidates, key=lambda m: m.stat().st_mtime, reverse=True):
        manifest = read_manifest(path.parent)
        if manifest and manifest.get("stage") == plan.stage:
            return manifest
    return None


def _changed(before: dict, after: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(before) | set(after))
    return [f"{prefix}{k}" for k in keys if before.get(k) != after.get(k)]


def rerun_reasons(plan: StagePlan) -> list[str]:
    """Why this stage's artifact is not the last one produced for the stage, e.g.
    ["config field depth changed (4 -> 6)", "code of nanopipe.gpt changed", "upstream tok_train changed"].
    Empty when nothing was produced before or nothing can be told apart."""
    previous = _latest_manifest(plan)
    if previous is None:
        return ["never produced before"]
    reasons = []
    old_config = previous.get("semantic_config")
    if isinstance(old_config, dict):
        for name in _changed(old_config, plan.semantic_config):
            reasons.append(f"config field {name} changed ({old_config.get(name)!r} -> {plan.semantic_config.get(name)!r})")
    old_code = previous.get("code")
    if isinstance(old_code, dict):
        reasons += [f"code of {m} changed" for m in _changed(old_code, plan.code)]
    elif previous.get("code_version") != plan.code_version:
        reasons.append("code changed")
    if previous.get("data") != plan.data and (previous.get("data") or plan.data):
        reasons.append("the local data shards changed")
    old_upstream = {k: v.get("hash") for k, v in (previous.get("upstream") or {}).items()}
    for role in _changed(old_upstream, {k: v["hash"] for k, v in plan.upstream.items()}):
        reasons.append(f"upstream {plan.upstream.get(role, {}).get('stage', role)} changed")
    return reasons or ["same inputs as the last artifact of this stage, which was deleted, damaged or unfinished"]


# -----------------------------------------------------------------------------
# Preflight: each training stage's own dry run (shapes, batch arithmetic, memory estimate), in a subprocess

# A chat stage's dry run before its source checkpoint exists assumes the model shape these flags give (and
# base_train's max_seq_len as `model_seq_len`); every training stage's dry run before the tokenizer exists
# assumes its vocabulary (`vocab_size`)
SHAPE_FIELDS = ("depth", "aspect_ratio", "head_dim")


def dry_run_command(plan: StagePlan, shape: dict[str, Any] | None = None) -> tuple[list[str], dict[str, str]]:
    """`python -m <stage> <flags> --plan_only` and its environment: torchrun's variables without torchrun,
    so the stage checks its batch arithmetic for the world size it will train with, and never joins a
    process group. `shape` (the base model's depth, aspect ratio, head size) tells a stage whose source
    checkpoint this run will produce what model to plan for."""
    world_size = plan.resources.nproc_per_node * plan.resources.nnodes
    env = {**plan.resources.env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size),
           "LOCAL_WORLD_SIZE": str(plan.resources.nproc_per_node)}
    hints = [f"--{k}={v}" for k, v in (shape or {}).items() if k in plan.config and k not in plan.semantic_config]
    return stage_command(plan.module, [*plan.args, *hints, f"--{plan.dry_run_flag}=true"], plan.resources,
                         distributed=False), env


def dry_run(plan: StagePlan, shape: dict[str, Any] | None = None, timeout_seconds: float = 600) -> Plan:
    """Run the stage's own dry run through the launcher (same process-tree handling as a real launch).
    Returns the plan record it reported; raises PlanError whose first line names the stage and gives its
    reason (its error record), the end of its output following."""
    cmd, env = dry_run_command(plan, shape)
    with tempfile.TemporaryDirectory(prefix=f"nanopipe-preflight-{plan.stage}-") as tmp:
        result = launch(cmd, log_path=Path(tmp) / "dry_run.log", env=env, timeout_seconds=timeout_seconds)
    planned = last(result.records, Plan)
    if result.returncode == 0 and not result.timed_out and planned is not None:
        return planned
    why = ("timed out" if result.timed_out else f"exit code {result.returncode}" if result.returncode else
           f"exit code 0 without a plan record: --{plan.dry_run_flag} planned nothing")
    reason = stage_reason(result.tail, result.records)
    tail = "\n".join(result.tail[-15:])
    raise PlanError(f"stage {plan.stage}: dry run failed ({why}){': ' + reason if reason else ''}\n{tail}".rstrip())


def plan_summary(planned: Plan) -> str:
    """A plan record in words: "1,234 parameters, context 256, vocab 512, 40 steps, 0.12 GiB per device"."""
    model = planned.model
    parts = [f"{planned.num_params:,} parameters" if planned.num_params is not None else None,
             f"context {model['sequence_len']}, vocab {model['vocab_size']:,}" if
             {"sequence_len", "vocab_size"} <= model.keys() else None,
             f"{planned.num_iterations:,} steps" if planned.num_iterations else "steps known once the data is read",
             f"{planned.peak_bytes / 2**30:.2f} GiB per device (estimated)" if planned.peak_bytes is not None else None,
             f"world size {planned.world_size}" if planned.world_size else None]
    return ", ".join(p for p in parts if p)


def preflight(plans: list[StagePlan], shape: dict[str, Any] | None = None, log=print) -> None:
    """Check the local inputs of every plan (`check_inputs`), then dry-run every plan that has a dry-run flag,
    all at once (a stage whose inputs this very run will produce plans with `shape`); raise naming each
    failing stage and its reason in the first line, the end of each one's output below."""
    check_inputs(plans)
    runnable = [p for p in plans if p.dry_run_flag]
    failures, planned = [], {}
    with ThreadPoolExecutor(max_workers=max(1, len(runnable))) as pool:
        futures = {pool.submit(dry_run, plan, shape): plan for plan in runnable}
        for future, plan in futures.items():
            try:
                planned[plan.stage] = future.result()
            except PlanError as err:
                failures.append(str(err))
    for plan in runnable:
        if plan.stage in planned:
            log(f"preflight {plan.stage}: ok ({plan_summary(planned[plan.stage])})")
    if failures:
        sentence = "; ".join(failure.splitlines()[0] for failure in failures)
        raise PlanError(f"preflight failed before any stage ran: {sentence}\n\n" + "\n\n".join(failures))


# -----------------------------------------------------------------------------
# Inputs a stage reads late but planning can check: its local data files, and the hub datasets it needs when
# the hub is offline

# A chat evaluation task -> its hub dataset (the task's local-copy flag is in DATA_PATH_FIELDS)
EVAL_TASK_REPOS = {"ARC-Easy": arc.HF_REPO, "ARC-Challenge": arc.HF_REPO, "MMLU": mmlu.HF_REPO,
                   "GSM8K": gsm8k.HF_REPO, "HumanEval": humaneval.HF_REPO}
# The hub datasets of the seed mixtures (nanopipe/tasks/mixtures.py), by the flag of their local copy
SEED_MIXTURE_REPOS = {
    "nanopipe.stages.mid_train": {"smoltalk_path": smoltalk.HF_REPO, "mmlu_path": mmlu.HF_REPO,
                                  "gsm8k_path": gsm8k.HF_REPO},
    "nanopipe.stages.chat_sft": {"arc_easy_path": arc.HF_REPO, "arc_challenge_path": arc.HF_REPO,
                                 "gsm8k_path": gsm8k.HF_REPO, "smoltalk_path": smoltalk.HF_REPO,
                                 "mmlu_path": mmlu.HF_REPO},
}
TRUE_VALUES = ("1", "ON", "YES", "TRUE")


def hub_datasets(plan: StagePlan) -> dict[str, str]:
    """{config field of the local copy: hub repo} of the datasets a stage will load from the hub."""
    cfg = plan.config
    if plan.module in SEED_MIXTURE_REPOS:
        wanted = SEED_MIXTURE_REPOS[plan.module] if cfg.get("mixture") == "seed" else {}
    elif plan.module == "nanopipe.stages.chat_rl":
        wanted = {"gsm8k_path": gsm8k.HF_REPO} if cfg.get("task") == "gsm8k" else {}
    elif plan.module == "nanopipe.stages.chat_eval":
        wanted = {DATA_PATH_FIELDS[t]: EVAL_TASK_REPOS[t] for t in cfg.get("task", []) if t in EVAL_TASK_REPOS}
    else:
        wanted = {}
    return {name: repo for name, repo in wanted.items() if not cfg.get(name)}


def hub_offline(env: dict[str, str]) -> str | None:
    """The variable that puts `datasets` offline in this environment (HF_DATASETS_OFFLINE wins), or None."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if env.get(name) is not None:
            return name if env[name].upper() in TRUE_VALUES else None
    return None


def hub_cached(repo: str, env: dict[str, str]) -> bool:
    """Does the local Hugging Face cache hold something of this dataset (what `datasets` can load offline)?
    A look at the cache folders' names, not a load: it may let through a cache that lacks a split."""
    hf_home = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface").expanduser()
    owner, _, name = repo.partition("/")
    wanted = {f"{owner}___{name}", f"datasets--{owner}--{name}"}
    for folder in (env.get("HF_DATASETS_CACHE") or hf_home / "datasets",
                   env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or hf_home / "hub"):
        folder = Path(folder).expanduser()
        if folder.is_dir() and any(p.name.lower().replace("-", "_") in {w.lower().replace("-", "_") for w in wanted}
                                   for p in folder.iterdir()):
            return True
    return False


def remote_inputs(plan: StagePlan) -> dict[str, RemoteFile]:
    """{config field: file} of the files a stage will download from a URL (identity conversations, word lists)."""
    cfg, wanted = plan.config, {}
    if is_url(cfg.get("identity_path")):
        wanted["identity_path"] = remote_file(cfg["identity_path"])
    for name in ("spelling_words", "spelling_words_path"):
        if cfg.get(name) and is_remote_words(cfg[name]) and (name != "spelling_words_path"
                                                               or "SpellingBee" in cfg.get("task", [])):
            wanted[name] = word_list_remote(cfg[name])
    return wanted


def input_problems(plan: StagePlan) -> list[str]:
    """What a stage would fail on only once it runs: a local data path that does not exist, a dataset it needs
    from the hub while the hub is offline and the dataset is not in its cache, a file to download from a URL
    that is neither cached nor reachable. One line each, naming the flag."""
    prefix = get_stage(plan.stage).config_field
    problems = []
    for name, file in remote_inputs(plan).items():
        if problem := availability_problem(file):
            problems.append(f"stage {plan.stage}: --{prefix}.{name}: {problem}")
    local = [name for name in plan.config if name.endswith("_path") and name not in plan.upstream
             and not is_url(plan.config[name]) and plan.config[name] != "download"]
    words = plan.config.get("spelling_words")
    local += ["spelling_words"] if words not in (None, "builtin") and not is_remote_words(words) else []
    for name in local:
        value = plan.config.get(name)
        if value and not Path(value).expanduser().exists():
            problems.append(f"stage {plan.stage}: --{prefix}.{name}={value} does not exist")
    env = {**os.environ, **plan.resources.env}
    offline = hub_offline(env)
    if offline:
        for name, repo in hub_datasets(plan).items():
            if not hub_cached(repo, env):
                problems.append(f"stage {plan.stage}: {repo} comes from the Hugging Face hub, which is offline "
                                f"({offline}={env[offline]}), and is not in its cache: give a local copy with "
                                f"--{prefix}.{name}=PATH")
    return problems


def check_inputs(plans: list[StagePlan]) -> None:
    """Raise one PlanError listing every input problem of the plans about to run (see input_problems)."""
    problems = [line for plan in plans for line in input_problems(plan)]
    if problems:
        raise PlanError("; ".join(problems))


def model_shape(plans: list[StagePlan]) -> dict[str, Any]:
    """What the dry runs plan for before this run's upstream outputs exist: the base model's shape flags
    (from the base_train plan) and the vocabulary the tokenizer will have (tok_train's vocab_size)."""
    by_stage = {p.stage: p for p in plans}
    shape = {}
    if "base_train" in by_stage:
        shape |= {k: by_stage["base_train"].config[k] for k in SHAPE_FIELDS}
        shape["model_seq_len"] = by_stage["base_train"].config["max_seq_len"]
    if "tok_train" in by_stage:
        shape["vocab_size"] = by_stage["tok_train"].config["vocab_size"]
    return shape
