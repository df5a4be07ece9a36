"""
What the chat training stages (mid_train, chat_sft, chat_rl) share: the source checkpoint they start from,
their optimizers, the resumable random state, the run around their loops (checkpoints, resume, memory check)
and their dry-run plans. Their batch layouts and chat loss are in nanopipe/chat_batches.py.

    src = find_source(cfg.source, cfg.model_tag, cfg.model_step, cfg.checkpoint_dir, cfg.tokenizer_dir)
    model, tokenizer = load_source_model(src, device)          # vocab checked against the tokenizer
    optimizers = setup_chat_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02,
                                       weight_decay=0.0, init_lr_frac=1.0)
    set_lr_multiplier(optimizers, 0.5)

    metrics = train_from_source(cfg, "mid", mid_mixtures, MidTrainer)   # source and data checked, then trains

find_source raises SourceCheckpointError (a ConfigError: exit code 2) naming the path and what is wrong,
without loading any weights, so a stage fails before it trains or joins a process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from nanopipe.checkpoint import (CHECKPOINT_DIRS, CheckpointError, build_model, check_resumable, find_last_step,
                                 load_resume_checkpoint, meta_path, model_from_state, resolve_checkpoint_dir,
                                 save_checkpoint)
from nanopipe.common import (atomic_write_json, compute_cleanup, compute_init, get_base_dir, print0,
                             write_metrics)
from nanopipe.configs.base import ConfigError
from nanopipe.events import MemoryEstimate, Resumed, emit
from nanopipe.gpt import GPT, ROTARY_OVERCOMPUTE, GPTConfig, build_model_config
from nanopipe.reshard import reshard_chat_loader_states, resharded_line, restore_optimizers
from nanopipe.tokenizer import TokenizerNotFoundError, get_tokenizer
from nanopipe.training import (NonFiniteLossError, all_ranks_ok, barrier, check_memory_fits, cpu_matmul_precision,
                               estimate_peak_memory, exclusive_out_dir, gather_loader_state,
                               keep_freed_memory_for_reuse)


class SourceCheckpointError(ConfigError):
    """The source checkpoint is missing, unreadable or does not match the tokenizer. One line, naming the path.
    `missing` is True when there is no checkpoint at all (a planning dry run may go on without one)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


# -----------------------------------------------------------------------------
# The source checkpoint

@dataclass(frozen=True)
class SourceCheckpoint:
    """A checked source checkpoint: where it is, which step, its meta, and the tokenizer that matches it."""

    ckpt_dir: Path
    step: int
    meta: dict
    tokenizer_dir: Path
    model_config: GPTConfig

    def describe(self) -> dict:
        return {"checkpoint_dir": str(self.ckpt_dir), "step": self.step, "tokenizer_dir": str(self.tokenizer_dir),
                "model_config": dict(self.model_config.__dict__)}


def find_source(source: str, model_tag: str | None = None, model_step: int | None = None,
                checkpoint_dir: str | None = None, tokenizer_dir: str | None = None) -> SourceCheckpoint:
    """Locate a source checkpoint and check it against its tokenizer, reading only JSON and the tokenizer.

    The tokenizer is `tokenizer_dir` when given, else the one the checkpoint's meta records.
    """
    try:
        ckpt_dir = Path(resolve_checkpoint_dir(source, model_tag, checkpoint_dir))
    except CheckpointError as err:  # no model tag under NANOPIPE_HOME/<source dir>
        raise SourceCheckpointError(f"source checkpoint ({source}): {err}", missing=True) from None
    if not ckpt_dir.is_dir():
        raise SourceCheckpointError(f"source checkpoint directory {ckpt_dir} does not exist", missing=True)
    try:
        step = find_last_step(ckpt_dir) if model_step is None else model_step
    except CheckpointError:
        raise SourceCheckpointError(f"source checkpoint directory {ckpt_dir} holds no complete checkpoint",
                                    missing=True) from None
    path = meta_path(ckpt_dir, step)
    if not path.is_file():
        raise SourceCheckpointError(f"source checkpoint {path} does not exist (--model_step={step})", missing=True)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        model_config = GPTConfig(**meta["model_config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise SourceCheckpointError(f"source checkpoint {path} is not a nanopipe model checkpoint "
                                    f"({type(err).__name__}: {err})") from None
    tok_dir = tokenizer_dir or meta.get("tokenizer_dir")
    if not tok_dir:
        raise SourceCheckpointError(f"source checkpoint {path} records no tokenizer_dir; pass --tokenizer_dir")
    tok_dir = Path(tok_dir).expanduser()
    try:
        vocab_size = get_tokenizer(tok_dir).get_vocab_size()
    except TokenizerNotFoundError as err:
        raise SourceCheckpointError(f"tokenizer of source checkpoint {ckpt_dir}: {err}") from None
    if vocab_size != model_config.vocab_size:
        raise SourceCheckpointError(
            f"source checkpoint {ckpt_dir} step {step} has vocab_size={model_config.vocab_size} but tokenizer "
            f"{tok_dir} has {vocab_size} tokens: they do not belong together")
    return SourceCheckpoint(Path(ckpt_dir), step, meta, tok_dir, model_config)


def check_row_length(max_seq_len: int | None, model_config: GPTConfig, model_from: str) -> None:
    """--max_seq_len rows must fit the model's rotary tables (ROTARY_OVERCOMPUTE x its context): a longer row
    has positions the model has no rotation for. Checked before any weights load."""
    limit = model_config.sequence_len * ROTARY_OVERCOMPUTE
    if max_seq_len is not None and max_seq_len > limit:
        raise ConfigError(f"--max_seq_len={max_seq_len} is longer than the rotary tables of the model ({model_from}): "
                          f"{limit} positions ({ROTARY_OVERCOMPUTE} x its context of {model_config.sequence_len} "
                          f"tokens); use --max_seq_len={limit} or less")


def load_source_model(src: SourceCheckpoint, device: torch.device | str, phase: str = "train"):
    """(model, tokenizer) of a checked source checkpoint; the model is an uncompiled GPT on `device`."""
    try:
        model, tokenizer, _ = build_model(src.ckpt_dir, src.step, device, phase, tokenizer_dir=src.tokenizer_dir)
    except CheckpointError as err:
        raise SourceCheckpointError(f"source checkpoint {src.ckpt_dir}: {err}") from None
    return model, tokenizer


def output_dir(stage_source: str, src: SourceCheckpoint, out_dir: str | None) -> Path:
    """--out_dir, else NANOPIPE_HOME/<stage's checkpoint dir>/<the source's model tag>."""
    if out_dir:
        return Path(out_dir).expanduser()
    return get_base_dir() / CHECKPOINT_DIRS[stage_source] / src.ckpt_dir.name


# -----------------------------------------------------------------------------
# Optimizers

def setup_chat_optimizers(model: GPT, *, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                          weight_decay: float, init_lr_frac: float = 1.0, lr_scale: float = 1.0) -> list:
    """A fresh [AdamW (embedding, head), Muon (matrices)] pair as base_train builds it, every learning rate
    times lr_scale * init_lr_frac; `initial_lr` of each group is that starting rate."""
    scale = lr_scale * init_lr_frac
    optimizers = model.setup_optimizers(unembedding_lr=unembedding_lr * scale, embedding_lr=embedding_lr * scale,
                                        matrix_lr=matrix_lr * scale, weight_decay=weight_decay)
    return optimizers


def set_lr_multiplier(optimizers: Sequence[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def set_muon_momentum(optimizers: Sequence[torch.optim.Optimizer], momentum: float) -> None:
    """Muon is the second optimizer of setup_chat_optimizers."""
    for group in optimizers[1].param_groups:
        group["momentum"] = momentum


# -----------------------------------------------------------------------------
# Random state (nothing in these loops draws random numbers today; a checkpoint keeps it anyway, so that a
# stage that starts sampling, e.g. RL, resumes exactly too)

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# -----------------------------------------------------------------------------
# A resumable chat training run: what mid_train and chat_sft share around their own loops

EMA_BETA = 0.9       # smoothing of the logged training loss
UNTIMED_STEPS = 10   # the first steps (compilation, allocator warm-up) are left out of the timings


def train_from_source(cfg, stage: str, load_data: Callable, make_trainer: Callable) -> dict:
    """A chat stage's run after its flag checks: find the source checkpoint, open every dataset
    (`load_data(cfg)`), and only then join the process group and train with `make_trainer(cfg, rt, src,
    out_dir, data)`, so that a missing checkpoint or dataset fails in seconds. The trainer's metrics."""
    src = find_source(cfg.source, cfg.model_tag, cfg.model_step, cfg.checkpoint_dir, cfg.tokenizer_dir)
    out_dir = output_dir(stage, src, cfg.out_dir)
    data = load_data(cfg)
    check_row_length(getattr(cfg, "max_seq_len", None), src.model_config,
                     f"source checkpoint {src.ckpt_dir} step {src.step}")
    with contextlib.ExitStack() as stack:
        if getattr(cfg, "dry_run", False):  # nanochat's --dry_run: train and evaluate, write nothing
            print0(f"--dry_run: training without writing checkpoints or metrics.json (to {out_dir})")
        else:
            stack.enter_context(exclusive_out_dir(out_dir, stage))  # one run at a time writes out_dir
        rt = compute_init(cfg.device_type, cfg.dtype, cfg.seed)
        if rt.device_type == "cpu":
            keep_freed_memory_for_reuse()
            print0(f"float32 matmuls on CPU: {stack.enter_context(cpu_matmul_precision(cfg.cpu_matmul_precision))}")
        try:
            trainer = make_trainer(cfg, rt, src, out_dir, data)
            trainer.fit()
            return trainer.finish()
        finally:
            compute_cleanup()


class ChatTrainerBase:
    """Model, optimizers and checkpoints of a chat training run. A fresh run starts from the source checkpoint
    with fresh optimizers; a resumed one restores model, optimizers (one file per rank), random state, the
    subclass's loader state and `loop` from its own checkpoint in out_dir.

    Subclasses set `stage` ('mid', 'sft' or 'rl'), build their loaders from `loader_state_at_start` (None on a
    fresh run) and put every value besides the step that a resume needs into `self.loop`. Before any weights
    load, the peak-memory estimate of `memory_rows()` must fit the device (or --allow_over_memory).
    """

    stage = ""

    def __init__(self, cfg, rt, src: SourceCheckpoint, out_dir: Path, lr_scale: float = 1.0):
        self.cfg, self.rt, self.src, self.out_dir = cfg, rt, src, out_dir
        self.autocast = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                         if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
        self.synchronize = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
        row_tokens, rows = self.memory_rows()
        sized = dataclasses.replace(src.model_config, sequence_len=row_tokens)
        memory = estimate_peak_memory(sized, rows, rt.world_size, cuda=rt.device_type == "cuda")
        emit(MemoryEstimate.of(memory))
        check_memory_fits(memory["total"], rt.device, "--device_batch_size", getattr(cfg, "allow_over_memory", False))
        resume = load_resume_checkpoint(out_dir, cfg.resume_from_step, rt.world_size, rt.device, rank=rt.rank,
                                        all_ranks_ok=lambda ok: all_ranks_ok(ok, rt),
                                        fresh_start="from the source checkpoint", reshard=True)
        self.resume_step = resume.step if resume else None
        if resume:
            check_resumable(cfg, self.stage, resume.meta, out_dir, resume.step)
            print0(f"Resuming from step {resume.step} of {out_dir}")
            emit(Resumed(step=resume.step, checkpoint_dir=str(out_dir), written_by=resume.written_by,
                         world_size=rt.world_size))
            if resume.written_by != rt.world_size:
                print0(resharded_line(resume, rt.world_size, None))
            self.orig_model, self.tokenizer = model_from_state(resume.model_state, resume.meta, out_dir, resume.step,
                                                               rt.device, "train", tokenizer_dir=src.tokenizer_dir)
            ckpt = resume
        else:
            self.orig_model, self.tokenizer, _ = build_model(src.ckpt_dir, src.step, rt.device, "train",
                                                             tokenizer_dir=src.tokenizer_dir)
            ckpt = None
        self.optimizers = setup_chat_optimizers(
            self.orig_model, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
            matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay, init_lr_frac=cfg.init_lr_frac, lr_scale=lr_scale)
        self.step = 0
        self.loop: dict = {}
        loader_state = None
        if ckpt:
            meta, own, old = ckpt.meta, ckpt.optim_state, ckpt.all_optim_states
            restore_optimizers(self.optimizers, own and own["optimizers"], old and [s["optimizers"] for s in old],
                               rt.rank, rt.world_size)
            self.step = meta["step"]
            self.loop.update(meta["loop_state"])
            if old is None:
                loader_state = meta["loader_state"]["ranks"][rt.rank]
                restore_rng_state(own["rng"])
            else:  # another number of ranks: the data position re-dealt, an old rank's random state
                loader_state = self.resharded_loader_state(meta["loader_state"]["ranks"], meta["step"])
                restore_rng_state(old[rt.rank % len(old)]["rng"])
        self.loader_state_at_start = loader_state

    def resharded_loader_state(self, states: list[dict], step: int) -> dict:
        """This rank's loader state from the states of a checkpoint written by another number of ranks."""
        return reshard_chat_loader_states(states, self.rt.world_size)[self.rt.rank]

    def memory_rows(self) -> tuple[int, int]:
        """(tokens per row, rows per device) of the largest forward pass, for the memory check: --max_seq_len
        rows where the stage has it, else the model's context. A stage with shorter rows (RL) may override it."""
        return getattr(self.cfg, "max_seq_len", None) or self.src.model_config.sequence_len, self.cfg.device_batch_size

    # --- checkpoints -----------------------------------------------------------

    def checkpoint_meta(self, loader_state: dict) -> dict:
        """Everything a resume and a downstream stage need; a collective under torchrun."""
        return {
            "model_config": dict(self.orig_model.config.__dict__),
            "tokenizer_dir": str(self.src.tokenizer_dir),
            "source": self.src.describe(),
            "stage": self.stage,
            "user_config": self.cfg.model_dump(mode="json"),
            "loader_state": gather_loader_state(loader_state, self.rt),
            "loop_state": dict(self.loop),
        }

    @property
    def writes(self) -> bool:
        """False under --dry_run (nanochat's meaning): the run trains and evaluates but writes no file."""
        return not getattr(self.cfg, "dry_run", False)

    def save(self, loader_state: dict, extra_meta: dict | None = None) -> None:
        if not self.writes:
            return
        meta = {**self.checkpoint_meta(loader_state), **(extra_meta or {})}
        optim_state = {"optimizers": [opt.state_dict() for opt in self.optimizers], "rng": rng_state()}
        save_checkpoint(self.out_dir, self.step, self.orig_model.state_dict(), optim_state, meta, rank=self.rt.rank)
        barrier(self.rt)  # every rank's optimizer file is on disk before anyone moves on

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json in out_dir (rank 0), unless --dry_run."""
        if self.writes:
            write_metrics(self.out_dir, metrics)

    def final_save_needed(self) -> bool:
        """False when the run resumed at its very end (the final checkpoint is already there)."""
        return not (self.step == self.resume_step and meta_path(self.out_dir, self.step).is_file())

    def complete_final_meta(self, values: dict) -> None:
        """Add the final evaluations to the final checkpoint's meta (rank 0), after the weights were saved."""
        if self.rt.master and self.writes:
            path = meta_path(self.out_dir, self.step)
            meta = json.loads(path.read_text(encoding="utf-8"))
            meta.update(values)
            atomic_write_json(path, meta)

    # --- the loop --------------------------------------------------------------

    def print_setup(self) -> None:
        print0(f"Device: {self.rt.device} ({self.rt.world_size} process(es)), compute dtype {self.rt.dtype}")
        print0(f"Source: {self.src.ckpt_dir} step {self.src.step}; output: {self.out_dir}")

    def check_finite(self, loss: float, lower: str) -> None:
        """Fail fast on a diverged run: `lower` names what to lower (the flags)."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {self.step}: the run diverged. Lower {lower} or check the data; "
                f"the last checkpoint in {self.out_dir} is intact")

    def record_train_loss(self, loss: float, seconds: float, steps_done: int) -> float:
        """Fold a step's loss into loop's EMA and its time into loop's total (after the UNTIMED_STEPS);
        the debiased smoothed loss after `steps_done` steps."""
        loop = self.loop
        loop["smooth_train_loss"] = EMA_BETA * loop["smooth_train_loss"] + (1 - EMA_BETA) * loss
        if steps_done > UNTIMED_STEPS:
            loop["total_training_time"] += seconds
            loop["timed_steps"] += 1
        return self.smoothed_train_loss(steps_done)

    def smoothed_train_loss(self, steps_done: int | None = None) -> float | None:
        """The debiased EMA of the training loss after `steps_done` steps (default: self.step); None before any."""
        steps_done = self.step if steps_done is None else steps_done
        return self.loop["smooth_train_loss"] / (1 - EMA_BETA ** steps_done) if steps_done else None

    def due(self, every: int | None, at_zero: bool = True) -> bool:
        return every is not None and (at_zero or self.step > 0) and self.step % every == 0

    def step_optimizers(self, lrm: float, muon_momentum: float | None = None) -> None:
        set_lr_multiplier(self.optimizers, lrm)
        if muon_momentum is not None:
            set_muon_momentum(self.optimizers, muon_momentum)
        for opt in self.optimizers:
            opt.step()  # under torchrun the optimizers average the gradients across ranks themselves
        self.orig_model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Dry runs: the model a stage would train, without loading it or joining a process group

DRY_RUN_DEFAULT_VOCAB = 32768  # tok_train's default, when neither the source nor a tokenizer exists yet


def planned_model(cfg) -> tuple[GPTConfig, str, SourceCheckpoint | None]:
    """(model config, where it came from, the source checkpoint or None): the source checkpoint's model, or,
    when there is none yet (a planning dry run before the upstream stages ran), the shape of
    --depth/--aspect_ratio/--head_dim. A source that exists but does not match its tokenizer still fails."""
    try:
        src = find_source(cfg.source, cfg.model_tag, cfg.model_step, cfg.checkpoint_dir, cfg.tokenizer_dir)
        return src.model_config, f"source checkpoint {src.ckpt_dir} step {src.step}", src
    except SourceCheckpointError as err:
        if not err.missing:
            raise
        # the run's planned vocabulary (the flow's preflight passes tok_train's), else an assumption
        vocab, vocab_from = (cfg.vocab_size, "--vocab_size") if cfg.vocab_size else (DRY_RUN_DEFAULT_VOCAB, "assumed")
        if cfg.tokenizer_dir:
            try:
                vocab, vocab_from = get_tokenizer(cfg.tokenizer_dir).get_vocab_size(), str(cfg.tokenizer_dir)
            except TokenizerNotFoundError:
                pass
        config = build_model_config(cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.model_seq_len, vocab)
        return config, (f"no source checkpoint yet ({err}); assuming --depth={cfg.depth} "
                        f"--aspect_ratio={cfg.aspect_ratio} --head_dim={cfg.head_dim}, vocab {vocab:,} "
                        f"({vocab_from})"), None


def model_plan(config: GPTConfig, row_tokens: int, rows_per_device: int, world_size: int, cuda: bool) -> dict:
    """Parameters, training FLOPs per token and the peak-memory estimate of base_train's model for it."""
    with torch.device("meta"):
        model = GPT(config)
    sized = dataclasses.replace(config, sequence_len=row_tokens)  # the memory model reads rows from sequence_len
    return {"model_config": dict(config.__dict__), "num_params": model.num_params(),
            "param_counts": model.param_counts(), "flops_per_token": model.estimate_flops(),
            "estimated_peak_memory_bytes": estimate_peak_memory(sized, rows_per_device, world_size, cuda)}


def print_plan(plan: dict, model_from: str) -> None:
    c = plan["model_config"]
    print0(f"Model ({model_from}): {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads, "
           f"context {c['sequence_len']}, vocab {c['vocab_size']:,}")
    for name, count in plan["param_counts"].items():
        print0(f"  parameters {name:<22}: {count:,}")
    mem = plan["estimated_peak_memory_bytes"]
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items() if k != "total")
    print0(f"Estimated peak memory per device: {mem['total'] / 2**30:.2f} GiB ({parts} GiB; a rough model)")
