"""
Checkpoints: one directory per model, one set of files per saved step.

    <ckpt_dir>/model_{step:06d}.pt            model state_dict (rank 0)
    <ckpt_dir>/optim_{step:06d}_rank{r}.pt    optimizer state of rank r (every rank: optimizer state is sharded)
    <ckpt_dir>/meta_{step:06d}.json           model_config, tokenizer_dir, step, user_config, loader_state,
                                              loop_state, val_bpb ... (rank 0, written last)

Every file is written atomically (temporary name, fsync, rename), and the meta file goes last: a step
whose meta exists has a complete model file. `find_last_step(dir, world_size=W)` also requires the W
optimizer files, which is what a resume needs.

A resume goes through `load_resume_checkpoint`: the newest step that verifies (meta parses, every file there
and non-empty) and loads (torch.load of the model and this rank's optimizer file, agreed by every rank) wins;
a damaged newer step is skipped with one line saying why. A checkpoint written by a different number of
processes is refused (WorldSizeMismatchError, exit 2), never silently replaced by a fresh start, unless the
caller re-shards it (reshard=True: every rank loads all the old optimizer files, nanopipe.reshard splits them).

    model, tokenizer, meta = load_model("base", device, phase="eval")            # NANOPIPE_HOME layout
    model, tokenizer, meta = load_model("base", device, "eval", checkpoint_dir=d) # explicit directory
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from nanopipe.common import atomic_torch_save, atomic_write_json, get_base_dir, print0
from nanopipe.configs.base import ConfigError, depth_of_model_tag
from nanopipe.exit_codes import ExitCode, StageError
from nanopipe.gpt import GPT, GPTConfig
from nanopipe.tokenizer import get_tokenizer

# source -> directory under NANOPIPE_HOME holding one sub-directory per model tag
CHECKPOINT_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}

_META_RE = re.compile(r"^meta_(\d+)\.json$")
_OPTIM_RE = re.compile(r"^optim_(\d+)_rank(\d+)\.pt$")


class CheckpointError(StageError, FileNotFoundError):
    """A checkpoint (directory, step or file) is missing or unreadable. The message names the directory."""


class BadCheckpointError(CheckpointError):
    """A checkpoint that reads but cannot be used: its meta disagrees with its weights, or the weights are not
    finite. Bad input (exit 2): loading it again fails the same way."""

    exit_code = ExitCode.BAD_INPUT


class WorldSizeMismatchError(StageError, ValueError):
    """The checkpoint to resume was written by a different number of processes than this run has."""

    exit_code = ExitCode.BAD_INPUT


def model_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"model_{step:06d}.pt"


def meta_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"meta_{step:06d}.json"


def optim_path(ckpt_dir: str | os.PathLike, step: int, rank: int) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}_rank{rank}.pt"


# -----------------------------------------------------------------------------
# Save / load

def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model_state: dict | None, optim_state: dict | None,
                    meta: dict, rank: int = 0) -> Path:
    """Write this rank's part of checkpoint `step`. Call it on every rank that holds optimizer state.

    Rank 0 writes the model and then the meta (the meta last, so it marks a complete model file); every
    rank writes its own optimizer file when optim_state is given.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if optim_state is not None:
        atomic_torch_save(optim_state, optim_path(ckpt_dir, step, rank))
    if rank == 0:
        assert model_state is not None, "rank 0 must pass the model state"
        atomic_torch_save(model_state, model_path(ckpt_dir, step))
        atomic_write_json(meta_path(ckpt_dir, step), {**meta, "step": step})
        print0(f"Saved checkpoint step {step} to {ckpt_dir}")
    return ckpt_dir


def list_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps with a meta file and a model file, ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for name in os.listdir(ckpt_dir):
        match = _META_RE.match(name)
        if match and model_path(ckpt_dir, int(match.group(1))).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(ckpt_dir: str | os.PathLike, world_size: int | None = None) -> int:
    """The highest complete step; with world_size, only steps that also have all its optimizer files."""
    ckpt_dir = Path(ckpt_dir)
    steps = list_steps(ckpt_dir)
    if world_size is not None:
        steps = [s for s in steps if all(optim_path(ckpt_dir, s, r).is_file() for r in range(world_size))]
    if not steps:
        what = f" with optimizer files for {world_size} rank(s)" if world_size is not None else ""
        raise CheckpointError(f"no complete checkpoint{what} in {ckpt_dir}")
    return steps[-1]


def _torch_load(path: Path, device: torch.device | str, ckpt_dir: Path, step: int) -> Any:
    if not path.is_file():
        available = list_steps(ckpt_dir)
        raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} has no {path.name} "
                              f"(complete steps there: {available or 'none'})")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read {path}: {err}") from err


def load_checkpoint(ckpt_dir: str | os.PathLike, step: int, device: torch.device | str,
                    load_optimizer: bool = False, rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(model_state, optimizer_state of `rank` or None, meta) of checkpoint `step`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    mpath = meta_path(ckpt_dir, step)
    if not mpath.is_file():
        raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir} "
                              f"(complete steps there: {list_steps(ckpt_dir) or 'none'})")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{mpath} is not valid JSON: {err}") from err
    model_state = _torch_load(model_path(ckpt_dir, step), device, ckpt_dir, step)
    check_finite_weights(model_state, model_path(ckpt_dir, step))
    optim_state = _torch_load(optim_path(ckpt_dir, step, rank), device, ckpt_dir, step) if load_optimizer else None
    return model_state, optim_state, meta


def non_finite_weights(model_state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict holding a NaN or an infinity."""
    names = [name for name, value in model_state.items() if torch.is_tensor(value) and value.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(model_state[name]).all() for name in names]).tolist()  # one sync
    return [name for name, ok in zip(names, finite) if not ok]


def check_finite_weights(model_state: dict, path: Path) -> None:
    """Refuse weights with NaN or Inf (a diverged or damaged model): sampling from them fails deep inside
    torch, and an evaluation would score them as if they were a model."""
    bad = non_finite_weights(model_state)
    if bad:
        raise BadCheckpointError(f"{path} holds non-finite weights (NaN or Inf in {len(bad)} tensor(s): "
                                 f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): use an earlier "
                                 f"checkpoint step (--model_step) or retrain")


# -----------------------------------------------------------------------------
# Resuming: the newest checkpoint that verifies and loads

def checkpoint_world_size(ckpt_dir: str | os.PathLike, step: int, meta: dict) -> int:
    """How many processes wrote checkpoint `step`: its meta's loader state, else its optimizer files."""
    loader_state = meta.get("loader_state")
    if isinstance(loader_state, dict) and isinstance(loader_state.get("world_size"), int):
        return loader_state["world_size"]
    ranks = [int(m.group(2)) for name in os.listdir(ckpt_dir)
             if (m := _OPTIM_RE.match(name)) and int(m.group(1)) == step]
    return max(ranks) + 1 if ranks else 1


def verify_checkpoint(ckpt_dir: str | os.PathLike, step: int, world_size: int,
                      reshard: bool = False) -> tuple[dict | None, str | None]:
    """(meta, None) when checkpoint `step` looks whole (the meta parses, the model and every optimizer file of
    the ranks that wrote it are there and non-empty), else (meta or None, why not). Reads only the meta.
    Raises WorldSizeMismatchError when a readable meta says another number of processes than `world_size`
    wrote it, unless `reshard`."""
    ckpt_dir = Path(ckpt_dir)
    mpath = meta_path(ckpt_dir, step)
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{mpath.name} is missing"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{mpath.name} is unreadable ({type(err).__name__})"
    if not isinstance(meta, dict):
        return None, f"{mpath.name} is not a JSON object"
    written_by = checkpoint_world_size(ckpt_dir, step, meta)
    if written_by != world_size and not reshard:
        raise WorldSizeMismatchError(
            f"checkpoint step {step} in {ckpt_dir} was written by {written_by} process(es) but this run has "
            f"{world_size}: resume with --nproc_per_node={written_by} (the same number of processes), or start "
            f"a new run in another --out_dir")
    for path in [model_path(ckpt_dir, step)] + [optim_path(ckpt_dir, step, r) for r in range(written_by)]:
        if not path.is_file():
            return meta, f"{path.name} is missing"
        if path.stat().st_size == 0:
            return meta, f"{path.name} is empty"
    return meta, None


def resume_candidates(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps that have a meta file, newest first (what --resume_from_step=latest tries, in order)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = [int(m.group(1)) for name in os.listdir(ckpt_dir) if (m := _META_RE.match(name))]
    return sorted(steps, reverse=True)


@dataclass
class ResumePoint:
    """What a resume restores: the step, the model state, this rank's optimizer state and the meta. Written by
    another number of processes (`written_by`), optim_state is None and `all_optim_states` holds every old
    rank's optimizer file, in rank order, for nanopipe.reshard."""

    step: int
    model_state: dict
    optim_state: Any
    meta: dict
    written_by: int = 0
    all_optim_states: list | None = None


def load_resume_checkpoint(ckpt_dir: str | os.PathLike, resume_from_step: int | str | None, world_size: int,
                           device: torch.device | str, rank: int = 0,
                           all_ranks_ok: Callable[[bool], bool] = lambda ok: ok,
                           fresh_start: str = "from scratch", reshard: bool = False) -> ResumePoint | None:
    """The checkpoint a --resume_from_step resumes, or None for a fresh start.

    'latest' tries the steps newest first and takes the first one that verifies and loads on every rank
    (`all_ranks_ok` is the collective that agrees: a rank whose optimizer file is damaged makes every rank
    move on), printing one line for the skipped ones; none at all is a fresh start. An explicit step that
    does not verify or load is a CheckpointError. A different world size is a WorldSizeMismatchError either way,
    unless `reshard`: then every old rank's optimizer file is loaded (to the CPU) into all_optim_states.
    """
    if resume_from_step is None:
        return None
    ckpt_dir = Path(ckpt_dir)
    explicit = resume_from_step != "latest"
    steps = [int(resume_from_step)] if explicit else resume_candidates(ckpt_dir)
    skipped = []
    for step in steps:
        meta, problem = verify_checkpoint(ckpt_dir, step, world_size, reshard)
        point = None
        if problem is None:
            written_by = checkpoint_world_size(ckpt_dir, step, meta)
            same = written_by == world_size
            paths = [optim_path(ckpt_dir, step, r) for r in ([rank] if same else range(written_by))]
            states = []
            for i, path in enumerate([model_path(ckpt_dir, step)] + paths):
                try:
                    states.append(torch.load(path, map_location=device if same or i == 0 else "cpu",
                                             weights_only=True))
                except Exception as err:  # a truncated or garbled file: its name and the gist of why
                    gist = str(err).splitlines()[0].split(". ")[0] if str(err) else ""
                    problem = f"{path.name} is unreadable ({type(err).__name__}: {gist})"
                    break
            else:
                bad = non_finite_weights(states[0])
                if bad:
                    problem = f"{model_path(ckpt_dir, step).name} holds non-finite weights (NaN or Inf in {bad[0]})"
                else:
                    point = (ResumePoint(step, states[0], states[1], meta, written_by) if same else
                             ResumePoint(step, states[0], None, meta, written_by, states[1:]))
        if not all_ranks_ok(point is not None):
            problem = problem or "another rank's optimizer file is unreadable"
            point = None
        if point is not None:
            if skipped:
                print0(f"--resume_from_step=latest: skipped damaged checkpoint(s) in {ckpt_dir}: "
                       f"{'; '.join(skipped)}; resuming from step {step}")
            return point
        if explicit:
            raise CheckpointError(f"cannot resume from checkpoint step {step} in {ckpt_dir}: {problem} "
                                  f"(complete steps there: {list_steps(ckpt_dir) or 'none'}); "
                                  f"use --resume_from_step=latest or another step")
        skipped.append(f"step {step} ({problem})")
    if skipped:
        print0(f"--resume_from_step=latest: no usable checkpoint in {ckpt_dir} "
               f"(skipped {'; '.join(skipped)}), starting {fresh_start}")
    else:
        print0(f"--resume_from_step=latest: no complete checkpoint in {ckpt_dir} yet, starting {fresh_start}")
    return None


# The stage that wrote a checkpoint (its meta's "stage"; base_train writes none) -> the command it runs as
STAGE_COMMANDS = {"mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl", None: "base_train"}
# Flags a resume must keep: each one sets how much data a step takes (or how long a row is), so a new value
# would silently continue another run's schedule and loader state with another batch. Those a stage has count.
RESUME_FIXED_FLAGS = ("max_seq_len", "total_batch_size", "target_examples_per_step", "examples_per_step",
                      "num_samples")


def check_resumable(cfg, stage: str | None, meta: dict, out_dir: str | os.PathLike, step: int) -> None:
    """A checkpoint in out_dir resumes this run only if this stage (None: base_train) wrote it with the same
    batch shape; else a ConfigError naming the stage, or the flag with its old and new value."""
    written_by = meta.get("stage")
    if written_by != stage:
        raise ConfigError(f"checkpoint step {step} in {out_dir} was written by "
                          f"{STAGE_COMMANDS.get(written_by, written_by)}, not {STAGE_COMMANDS[stage]}: that "
                          f"directory belongs to another stage; give this stage its own --out_dir")
    saved = meta.get("user_config") or {}
    for name in RESUME_FIXED_FLAGS:
        if name in saved and hasattr(cfg, name) and saved[name] != getattr(cfg, name):
            raise ConfigError(f"--{name}={getattr(cfg, name)} differs from --{name}={saved[name]} of checkpoint step "
                              f"{step} in {out_dir}: resume with --{name}={saved[name]}, or start a new run in "
                              f"another --out_dir")


# -----------------------------------------------------------------------------
# Building a model from a checkpoint

def clean_model_state(model_state: dict, device: torch.device) -> dict:
    """Strip torch.compile's `_orig_mod.` prefix; bf16 -> fp32 on CPU/MPS, where bf16 matmuls are slow."""
    cleaned = {}
    for key, value in model_state.items():
        if device.type in ("cpu", "mps") and value.dtype == torch.bfloat16:
            value = value.float()
        cleaned[key.removeprefix("_orig_mod.")] = value
    return cleaned


def build_model(ckpt_dir: str | os.PathLike, step: int, device: torch.device | str, phase: str,
                tokenizer_dir: str | os.PathLike | None = None):
    """(model, tokenizer, meta) from checkpoint `step`: an uncompiled GPT, in eval or train mode.

    The tokenizer comes from `tokenizer_dir` if given, else from the directory recorded in the meta.
    """
    device = torch.device(device)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    model, tokenizer = model_from_state(model_state, meta, ckpt_dir, step, device, phase, tokenizer_dir)
    return model, tokenizer, meta


def model_from_state(model_state: dict, meta: dict, ckpt_dir: str | os.PathLike, step: int,
                     device: torch.device | str, phase: str, tokenizer_dir: str | os.PathLike | None = None):
    """(model, tokenizer) from a loaded model state and its meta (checkpoint `step` of ckpt_dir, for messages)."""
    assert phase in ("train", "eval"), f"phase must be 'train' or 'eval', got {phase!r}"
    device = torch.device(device)
    if "model_config" not in meta:
        raise CheckpointError(f"{meta_path(ckpt_dir, step)} has no model_config: not a nanopipe model checkpoint")
    try:
        config = GPTConfig(**meta["model_config"])
    except (TypeError, ValueError) as err:
        raise BadCheckpointError(f"{meta_path(ckpt_dir, step)} has an invalid model_config: {err}") from None
    with torch.device("meta"):
        model = GPT(config)
    state = clean_model_state(model_state, device)
    check_state_matches(model, state, meta_path(ckpt_dir, step), model_path(ckpt_dir, step))
    model.to_empty(device=device)
    model.init_weights()  # also fills buffers that are not in the state dict (rotary tables)
    model.load_state_dict(state, strict=True, assign=True)
    model.train(phase == "train")
    tok_dir = tokenizer_dir if tokenizer_dir is not None else meta.get("tokenizer_dir")
    tokenizer = get_tokenizer(tok_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"tokenizer {tok_dir} has {tokenizer.get_vocab_size()} tokens but the model in "
                              f"{ckpt_dir} was trained with vocab_size={config.vocab_size}: wrong tokenizer")
    return model, tokenizer


def check_state_matches(model: GPT, state: dict, meta_file: Path, model_file: Path) -> None:
    """The weights must have exactly the tensors, and shapes, of the model the meta describes; else one line
    naming both files and the first difference (instead of load_state_dict's page of mismatches)."""
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in state.items() if torch.is_tensor(value)}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{name} is {list(found[name])} in the weights, {list(shape)} per the meta"
              for name, shape in expected.items() if name in found and found[name] != shape]
    if not (missing or unexpected or shapes):
        return
    c = model.config
    differences = ([f"{len(missing)} tensor(s) missing from the weights ({missing[0]}, ...)"] if missing else []) + (
        [f"{len(unexpected)} tensor(s) the meta's model has no place for ({unexpected[0]}, ...)"] if unexpected
        else []) + shapes[:1]
    raise BadCheckpointError(
        f"{meta_file} does not match the weights in {model_file.name}: its model_config (n_layer={c.n_layer}, "
        f"n_embd={c.n_embd}, n_head={c.n_head}, n_kv_head={c.n_kv_head}, vocab_size={c.vocab_size}) disagrees "
        f"with them: {'; '.join(differences)}")


def find_largest_model(root: str | os.PathLike) -> str:
    """The model tag to load by default under `root`: the deepest d<N>, else the most recently written."""
    root = Path(root)
    tags = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    if not tags:
        raise CheckpointError(f"no model checkpoints under {root}")
    depths = [(depth, tag) for tag in tags if (depth := depth_of_model_tag(tag)) is not None]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda tag: (root / tag).stat().st_mtime)


def resolve_checkpoint_dir(source: str, model_tag: str | None = None,
                           checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory of a source stage: explicit, or NANOPIPE_HOME/<source dir>/<tag>."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; valid: {', '.join(CHECKPOINT_DIRS)}")
    root = get_base_dir() / CHECKPOINT_DIRS[source]
    return root / (model_tag if model_tag is not None else find_largest_model(root))


def load_model(source: str, device: torch.device | str, phase: str, model_tag: str | None = None,
               step: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
               tokenizer_dir: str | os.PathLike | None = None):
    """(model, tokenizer, meta) of a stage's checkpoint: the largest model and last step unless given."""
    ckpt_dir = resolve_checkpoint_dir(source, model_tag, checkpoint_dir)
    if step is None:
        step = find_last_step(ckpt_dir)
    print0(f"Loading model from {ckpt_dir} step {step}")
    return build_model(ckpt_dir, step, device, phase, tokenizer_dir=tokenizer_dir)
