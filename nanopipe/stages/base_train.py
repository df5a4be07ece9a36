"""
Base pretraining: train a GPT from scratch on the pretraining shards, with Muon + AdamW.

Run alone (a tiny CPU run, then a real one):

    python -m nanopipe.stages.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 \
        --total_batch_size=8192 --num_iterations=100 --eval_every=50 --eval_tokens=65536 \
        --core_metric_every=-1 --sample_every=-1
    python -m nanopipe.stages.base_train --depth=20 --plan_only    # shapes, FLOPs, memory; no training

Under torchrun (one process per GPU; on CPU the gloo backend):

    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.base_train --depth=20

Resume after a crash with --resume_from_step=latest (or a step number): model, optimizer, data loader
position and loop state are restored exactly, so the run continues as if it had never stopped. 'latest' skips
a damaged newest checkpoint (saying so) for the one before. A checkpoint written by another number of processes
resumes too (nanopipe.reshard): the optimizer state is re-sharded, gradient accumulation is recomputed so the
global batch stays --total_batch_size, and the data continues where the furthest rank stopped, no document twice.
One run at a time per --out_dir (a second exits 2 naming the first); a run whose memory estimate exceeds the
device's available memory exits 2 before training unless --allow_over_memory.
Checkpoints and metrics.json go to --out_dir (default NANOPIPE_HOME/base_checkpoints/<model_tag>).
Exit codes: 2 for a bad flag, 3 when the loss stops being finite (a retry cannot fix either).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from nanopipe.checkpoint import CHECKPOINT_DIRS, ResumePoint, load_resume_checkpoint, meta_path, save_checkpoint
from nanopipe.common import (Runtime, atomic_write_json, compute_cleanup, compute_init, get_base_dir, get_dist_info,
                             init_wandb, print0, report_progress, write_metrics)
from nanopipe.configs.base import ConfigError
from nanopipe.configs.base import REFERENCE_BATCH_TOKENS, compile_decision, model_tag_for_depth
from nanopipe.configs.base_train import BaseTrainConfig, check_batch_sizes
from nanopipe.configs.flags import stage_main
from nanopipe.configs.tok_train import DEFAULT_VOCAB_SIZE
from nanopipe.core_eval import bundle_missing_message, evaluate_core, find_eval_bundle
from nanopipe.dataloader import BestFitLoader
from nanopipe.events import MemoryEstimate, Plan, Resumed, emit
from nanopipe.data import ensure_shards
from nanopipe.gpt import GPT, GPTConfig, build_model_config
from nanopipe.loss_eval import evaluate_split_bpb
from nanopipe.optim import batch_lr_scale, lr_multiplier, muon_momentum
from nanopipe.reshard import reshard_loader_states, resharded_line, restore_optimizers
from nanopipe.sampling import SAMPLE_PROMPTS, generate_samples
from nanopipe.tokenizer import default_tokenizer_dir, get_token_bytes, get_tokenizer
from nanopipe.training import (NonFiniteLossError, all_ranks_ok, barrier, check_memory_fits, cpu_matmul_precision,
                               estimate_peak_memory, exclusive_out_dir, gather_loader_state, gc_frozen_after_first_step,
                               keep_freed_memory_for_reuse, mean_across_ranks, peak_flops, peak_memory_mib)

PROG = "python -m nanopipe.stages.base_train"
EMA_BETA = 0.9                      # smoothing of the logged training loss
UNTIMED_STEPS = 10                  # the first steps (compilation, warm-up) are left out of the timings


# -----------------------------------------------------------------------------
# Derived quantities

def horizon(cfg: BaseTrainConfig, flops_per_token: int, num_params: int) -> tuple[int, str]:
    """(num_iterations, how it was chosen): --num_iterations > --target_flops > --target_param_data_ratio."""
    if cfg.num_iterations is not None:
        return cfg.num_iterations, "--num_iterations"
    if cfg.target_flops is not None:
        steps = round(cfg.target_flops / (flops_per_token * cfg.total_batch_size))
        return max(1, steps), f"--target_flops={cfg.target_flops:g}"
    steps = int(cfg.target_param_data_ratio * num_params) // cfg.total_batch_size
    return max(1, steps), f"--target_param_data_ratio={cfg.target_param_data_ratio:g}"


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


# -----------------------------------------------------------------------------
# Paths

def resolve_paths(cfg: BaseTrainConfig) -> tuple[Path, Path, Path]:
    """(tokenizer_dir, checkpoint_dir, out_dir)."""
    tokenizer_dir = Path(cfg.tokenizer_dir).expanduser() if cfg.tokenizer_dir else default_tokenizer_dir()
    model_tag = cfg.model_tag or model_tag_for_depth(cfg.depth)
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else get_base_dir() / CHECKPOINT_DIRS["base"] / model_tag
    ckpt_dir = Path(cfg.checkpoint_dir).expanduser() if cfg.checkpoint_dir else out_dir
    return tokenizer_dir.resolve(), ckpt_dir, out_dir


# -----------------------------------------------------------------------------
# Dry run

def describe_run(cfg: BaseTrainConfig, model_config: GPTConfig, world_size: int, device_type: str) -> dict:
    with torch.device("meta"):
        model = GPT(model_config)
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    num_iterations, how = horizon(cfg, flops_per_token, model.num_scaling_params())
    grad_accum = check_batch_sizes(cfg, world_size)
    memory = estimate_peak_memory(model_config, cfg.device_batch_size, world_size, cuda=device_type == "cuda")
    total_tokens = cfg.total_batch_size * num_iterations
    return {
        "model_config": model_config.__dict__ | {"head_dim": model_config.head_dim},
        "num_params": num_params,
        "param_counts": model.param_counts(),
        "flops_per_token": flops_per_token,
        "num_iterations": num_iterations,
        "horizon_from": how,
        "total_tokens": total_tokens,
        "tokens_per_param": total_tokens / model.num_scaling_params(),
        "total_flops": flops_per_token * total_tokens,
        "world_size": world_size,
        "grad_accum_steps": grad_accum,
        "estimated_peak_memory_bytes": memory,
    }


def print_description(info: dict) -> None:
    c = info["model_config"]
    print0(f"Model: {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads of {c['head_dim']} "
           f"({c['n_kv_head']} kv heads), context {c['sequence_len']}, vocab {c['vocab_size']:,}")
    for name, count in info["param_counts"].items():
        print0(f"  parameters {name:<22}: {count:,}")
    print0(f"FLOPs per token (fwd+bwd): {info['flops_per_token']:.4e}")
    print0(f"Iterations: {info['num_iterations']:,} (from {info['horizon_from']}); tokens: {info['total_tokens']:,} "
           f"({info['tokens_per_param']:.2f} per parameter); total FLOPs {info['total_flops']:.4e}")
    print0(f"World size {info['world_size']}, gradient accumulation steps: {info['grad_accum_steps']}")
    mem = info["estimated_peak_memory_bytes"]
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items() if k != "total")
    print0(f"Estimated peak memory per device: {mem['total'] / 2**30:.2f} GiB ({parts} GiB; a rough model)")


# -----------------------------------------------------------------------------
# The stage

def run(cfg: BaseTrainConfig) -> dict:
    _, _, _, world_size = get_dist_info()
    check_batch_sizes(cfg, world_size)  # before any work: a bad batch size fails in a second
    tokenizer_dir, ckpt_dir, out_dir = resolve_paths(cfg)

    if cfg.plan_only:
        device_type = cfg.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            vocab_size = get_tokenizer(tokenizer_dir).get_vocab_size()
        except FileNotFoundError:   # a dry run before the tokenizer exists: the run's planned vocabulary
            vocab_size, how = ((cfg.vocab_size, "--vocab_size") if cfg.vocab_size
                               else (DEFAULT_VOCAB_SIZE, "tok_train's default"))
            print0(f"dry run: no tokenizer at {tokenizer_dir} yet; planning for vocab_size={vocab_size} ({how})")
        model_config = build_model_config(cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len, vocab_size)
        info = describe_run(cfg, model_config, world_size, device_type)
        print_description(info)
        emit(Plan.of(info))
        return {"plan_only": True, **info}

    # the named inputs, before any process group, lock or output directory: a bad one fails in a second
    get_tokenizer(tokenizer_dir)
    get_token_bytes(tokenizer_dir)
    ensure_shards(cfg)
    with contextlib.ExitStack() as stack:
        for directory in dict.fromkeys([out_dir, ckpt_dir]):  # one run at a time writes these directories
            stack.enter_context(exclusive_out_dir(directory, "base_train"))
        rt = compute_init(cfg.device_type, cfg.dtype, cfg.seed)
        if rt.device_type == "cpu":
            keep_freed_memory_for_reuse()
            print0(f"float32 matmuls on CPU: {stack.enter_context(cpu_matmul_precision(cfg.cpu_matmul_precision))}")
        try:
            trainer = Trainer(cfg, rt, tokenizer_dir, ckpt_dir, out_dir)
            try:
                trainer.fit()
            finally:
                trainer.close()
            return trainer.finish()
        finally:
            compute_cleanup()


class Trainer:
    """One base-training run: __init__ builds (or restores) everything, fit() runs the loop to the end.

    The loop runs steps 0..num_iterations-1; at step == num_iterations it saves, evaluates and stops.
    `loop` is all the state besides the step that a checkpoint carries to resume exactly.
    """

    def __init__(self, cfg: BaseTrainConfig, rt: Runtime, tokenizer_dir: Path, ckpt_dir: Path, out_dir: Path):
        self.cfg, self.rt = cfg, rt
        self.tokenizer_dir, self.ckpt_dir, self.out_dir = tokenizer_dir, ckpt_dir, out_dir
        self.wandb = init_wandb(cfg.run, "nanopipe", cfg.model_dump(mode="json"), rt.master)
        self.autocast = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                         if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
        self.synchronize = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
        self.gpu_peak_flops = peak_flops(rt.device_type)
        print0(f"Device: {rt.device} ({rt.world_size} process(es)), compute dtype {rt.dtype}")

        self.tokenizer = get_tokenizer(tokenizer_dir)
        self.token_bytes = get_token_bytes(tokenizer_dir, device=rt.device)
        self.shards = ensure_shards(cfg)
        print0(f"Data: {len(self.shards.train)} training shard(s) in {self.shards.data_dir}, "
               f"validation {self.shards.val.name}")
        self.bundle_dir = find_eval_bundle(cfg.eval_bundle_dir)
        if cfg.core_metric_every is not None and self.bundle_dir is None:
            print0(bundle_missing_message(cfg.eval_bundle_dir))

        self.model_config = build_model_config(cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len,
                                               self.tokenizer.get_vocab_size())
        self.info = describe_run(cfg, self.model_config, rt.world_size, rt.device_type)
        print_description(self.info)
        emit(MemoryEstimate.of(self.info["estimated_peak_memory_bytes"]))
        self.num_iterations, self.grad_accum = self.info["num_iterations"], self.info["grad_accum_steps"]
        check_memory_fits(self.info["estimated_peak_memory_bytes"]["total"], rt.device,
                          "--device_batch_size (or --max_seq_len, --depth)", cfg.allow_over_memory)

        checkpoint = self._load_checkpoint()
        self.resume_step = checkpoint.step if checkpoint else None
        self._build_model(checkpoint)
        self._build_optimizers(checkpoint)
        self._build_train_loader(checkpoint)
        self.step = checkpoint.step if checkpoint else 0
        self.loop = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0,
                     "min_val_bpb": float("inf"), "val_bpb": None, "core_metric": None}
        if checkpoint:
            self.loop.update(checkpoint.meta["loop_state"])
        self.samples: list[str] = []
        self.mfu = None

    # --- setup --------------------------------------------------------------

    def _load_checkpoint(self) -> ResumePoint | None:
        """The checkpoint --resume_from_step names (the newest usable one for 'latest'), or None: start fresh."""
        rt = self.rt
        checkpoint = load_resume_checkpoint(self.ckpt_dir, self.cfg.resume_from_step, rt.world_size, rt.device,
                                            rank=rt.rank, all_ranks_ok=lambda ok: all_ranks_ok(ok, rt), reshard=True)
        if checkpoint is None:
            return None
        if checkpoint.meta.get("model_config") != self.model_config.__dict__:
            raise ConfigError(f"checkpoint step {checkpoint.step} in {self.ckpt_dir} is a different model "
                              f"({checkpoint.meta.get('model_config')}) from these flags ({self.model_config.__dict__})")
        print0(f"Resuming from step {checkpoint.step} of {self.ckpt_dir}")
        emit(Resumed(step=checkpoint.step, checkpoint_dir=str(self.ckpt_dir), written_by=checkpoint.written_by,
                     world_size=rt.world_size))
        if checkpoint.written_by != rt.world_size:
            print0(resharded_line(checkpoint, rt.world_size, self.grad_accum))
        return checkpoint

    def _build_model(self, checkpoint: ResumePoint | None) -> None:
        self.orig_model = GPT.create(self.model_config, device=self.rt.device)
        if checkpoint:
            self.orig_model.load_state_dict(checkpoint.model_state, strict=True, assign=True)
        use_compile, why = compile_decision(self.cfg.compile, self.rt.device_type, self.num_iterations)
        print0(f"torch.compile: {'on' if use_compile else 'off'} ({why})")
        # the training inputs never change shape; evaluation and sampling use the uncompiled module
        self.model = torch.compile(self.orig_model, dynamic=False) if use_compile else self.orig_model

    def _build_optimizers(self, checkpoint) -> None:
        cfg = self.cfg
        lr_scale = batch_lr_scale(cfg.total_batch_size)  # sqrt(B / 2^19)
        if lr_scale != 1.0:
            print0(f"Learning rates x {lr_scale:.4f} for a batch of {cfg.total_batch_size:,} tokens "
                   f"(reference {REFERENCE_BATCH_TOKENS:,})")
        self.optimizers = self.orig_model.setup_optimizers(
            unembedding_lr=cfg.unembedding_lr * lr_scale, embedding_lr=cfg.embedding_lr * lr_scale,
            matrix_lr=cfg.matrix_lr * lr_scale, weight_decay=cfg.weight_decay)
        self.muon = self.optimizers[1]
        if checkpoint:
            restore_optimizers(self.optimizers, checkpoint.optim_state, checkpoint.all_optim_states, self.rt.rank,
                               self.rt.world_size)

    def _build_train_loader(self, checkpoint) -> None:
        state = None
        if checkpoint and checkpoint.written_by != self.rt.world_size:
            state = reshard_loader_states(checkpoint.meta["loader_state"]["ranks"], self.shards.train,
                                          self.rt.world_size)[self.rt.rank]
        elif checkpoint:
            state = checkpoint.meta["loader_state"]["ranks"][self.rt.rank]
        self.train_loader = BestFitLoader(self.tokenizer, self.shards.train, self.cfg.device_batch_size,
                                          self.cfg.max_seq_len, device=self.rt.device, rank=self.rt.rank,
                                          world_size=self.rt.world_size, resume_state=state,
                                          planned_tokens=self.cfg.total_batch_size * self.num_iterations)
        self.step_loader_state = self.train_loader.state_dict()  # where the current step's batches begin
        self.batch = next(self.train_loader)

    # --- checkpoints ----------------------------------------------------------

    def checkpoint_meta(self) -> dict:
        """Everything a resume needs; a collective under torchrun (it gathers every rank's loader state)."""
        cfg = self.cfg
        return {
            "model_config": self.model_config.__dict__,
            "tokenizer_dir": str(self.tokenizer_dir),
            "user_config": cfg.model_dump(mode="json"),
            "val_bpb": self.loop["val_bpb"],
            "core_metric": self.loop["core_metric"],
            "num_iterations": self.num_iterations,
            "device_batch_size": cfg.device_batch_size,
            "max_seq_len": cfg.max_seq_len,
            "total_batch_size": cfg.total_batch_size,
            "data_fingerprint": self.shards.fingerprint(),
            "loader_state": gather_loader_state(self.step_loader_state, self.rt),
            "loop_state": dict(self.loop),
        }

    def save(self) -> None:
        meta = self.checkpoint_meta()
        save_checkpoint(self.ckpt_dir, self.step, self.orig_model.state_dict(),
                        [opt.state_dict() for opt in self.optimizers], meta, rank=self.rt.rank)
        barrier(self.rt)  # every rank's optimizer file is on disk before anyone moves on

    # --- evaluations ------------------------------------------------------------

    def due(self, every: int | None, last: bool, at_zero: bool = False) -> bool:
        if every is None:
            return False
        return last or (at_zero or self.step > 0) and self.step % every == 0

    def evaluate(self, last: bool) -> None:
        cfg, step = self.cfg, self.step
        if last or self.due(cfg.eval_every, last, at_zero=True):
            self.model.eval()
            bpb = evaluate_split_bpb(self.model, self.tokenizer, [self.shards.val], cfg.device_batch_size,
                                     cfg.max_seq_len, cfg.eval_tokens, self.rt, self.token_bytes, self.autocast)
            self.model.train()
            self.loop["val_bpb"], self.loop["min_val_bpb"] = bpb, min(self.loop["min_val_bpb"], bpb)
            if step == 0:  # random weights: the "before" of what pretraining taught (kept across resumes)
                self.loop["initial_val_bpb"] = bpb
            print0(f"Step {step:05d} | val bpb: {bpb:.6f}")
            report_progress(step=step, total=self.num_iterations, val_bpb=bpb)
            self.wandb.log({"step": step, "val/bpb": bpb})
        if self.bundle_dir is not None and self.due(cfg.core_metric_every, last):
            self.orig_model.eval()  # uncompiled: the prompts change shape all the time
            core = evaluate_core(self.orig_model, self.tokenizer, self.rt.device, self.bundle_dir,
                                 cfg.core_metric_max_per_task, self.autocast)
            self.orig_model.train()
            self.loop["core_metric"] = core["core_metric"]
            print0(f"Step {step:05d} | CORE metric: {core['core_metric']:.4f}")
            self.wandb.log({"step": step, "core_metric": core["core_metric"]})
        if self.rt.master and self.due(cfg.sample_every, last):
            self.orig_model.eval()
            with self.autocast:
                self.samples = generate_samples(self.orig_model, self.tokenizer, SAMPLE_PROMPTS)
            self.orig_model.train()
            for sample in self.samples:
                print0(f"  sample: {sample!r}")

    # --- training -----------------------------------------------------------

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches: (mean loss over ranks, lr multiplier, seconds)."""
        self.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro_step in range(self.grad_accum):
            inputs, targets = self.batch
            with self.autocast:  # bf16 on CUDA: every matmul and attention; the loss itself is float32
                loss = self.model(inputs, targets)
            loss_sum += loss.detach()
            (loss / self.grad_accum).backward()  # .backward() sums gradients: average over the micro-steps
            if micro_step == self.grad_accum - 1:
                self.step_loader_state = self.train_loader.state_dict()
            self.batch = next(self.train_loader)  # copied to the device while it still computes
        cfg = self.cfg
        lrm = lr_multiplier(self.step, self.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        momentum = muon_momentum(self.step)
        for group in self.muon.param_groups:
            group["momentum"] = momentum
        for opt in self.optimizers:
            opt.step()  # under torchrun the optimizers average the gradients across ranks themselves
        self.orig_model.zero_grad(set_to_none=True)
        # The step's one host-device sync (the micro-steps above queue work without waiting: the loss is summed
        # on the device, the next batch is copied from pinned memory with non_blocking). Every step is a
        # logging step, and a NaN must stop the run at the step it appears; at d20 a step is ~0.5 s on an
        # H100, against which the next step's first kernel launches are a small bubble.
        loss = mean_across_ranks(loss_sum / self.grad_accum, self.rt).item()
        self.synchronize()
        return loss, lrm, time.perf_counter() - t0

    def log_step(self, loss: float, lrm: float, dt: float) -> None:
        cfg, step, loop = self.cfg, self.step, self.loop
        loop["smooth_train_loss"] = EMA_BETA * loop["smooth_train_loss"] + (1 - EMA_BETA) * loss
        smooth = loop["smooth_train_loss"] / (1 - EMA_BETA ** (step + 1))  # debiased EMA
        if step >= UNTIMED_STEPS:
            loop["total_training_time"] += dt
            loop["timed_steps"] += 1
        tok_per_sec = cfg.total_batch_size / dt
        line = (f"step {step:05d}/{self.num_iterations:05d} ({100 * step / self.num_iterations:.2f}%) | loss: "
                f"{smooth:.6f} (this step {loss:.6f}) | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
                f"tok/sec: {tok_per_sec:,.0f}")
        if self.gpu_peak_flops is not None:
            self.mfu = 100 * self.info["flops_per_token"] * tok_per_sec / (self.gpu_peak_flops * self.rt.world_size)
            line += f" | mfu: {self.mfu:.2f}%"
        if loop["timed_steps"]:
            eta = (self.num_iterations - step - 1) * loop["total_training_time"] / loop["timed_steps"]
            line += f" | eta: {eta / 60:.1f}m"
        line += f" | epoch: {self.train_loader.epoch} | mem: {peak_memory_mib(self.rt.device_type):,.0f}MiB"
        print0(line)
        report_progress(step=step, total=self.num_iterations, loss=smooth)   # the step the line above prints
        if step % 100 == 0:
            self.wandb.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt,
                            "train/tok_per_sec": tok_per_sec, "train/mfu": self.mfu,
                            "train/epoch": self.train_loader.epoch})

    def fit(self) -> None:
        print0(f"Training {self.num_iterations:,} steps of {self.cfg.total_batch_size:,} tokens from step {self.step}")
        save_every = self.cfg.save_every
        with gc_frozen_after_first_step() as after_step:
            while self.step < self.num_iterations:
                self.evaluate(last=False)
                if self.due(save_every, last=False) and self.step != self.resume_step:
                    self.save()
                loss, lrm, dt = self.train_step()
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"training loss is {loss} at step {self.step}: the run diverged. Lower the learning rates "
                        f"(--matrix_lr, --embedding_lr, --unembedding_lr) or check the data; the last checkpoint "
                        f"in {self.ckpt_dir} is intact")
                self.log_step(loss, lrm, dt)
                self.step += 1
                after_step(self.step)
        # the weights first: an evaluation that crashes or runs out of memory cannot lose them
        if not (self.step == self.resume_step and meta_path(self.ckpt_dir, self.step).is_file()):
            self.save()
        self.evaluate(last=True)

    def close(self) -> None:
        self.train_loader.close()

    def finish(self) -> dict:
        """Complete the final meta with the final evaluations, write metrics.json, return the metrics."""
        loop, cfg = self.loop, self.cfg
        if self.rt.master:
            path = meta_path(self.ckpt_dir, self.step)
            meta = json.loads(path.read_text(encoding="utf-8"))
            meta["val_bpb"], meta["core_metric"] = loop["val_bpb"], loop["core_metric"]
            atomic_write_json(path, meta)
        timed = loop["timed_steps"]
        metrics = {
            "step": self.step,
            "num_iterations": self.num_iterations,
            "val_bpb": loop["val_bpb"],
            "min_val_bpb": loop["min_val_bpb"] if loop["val_bpb"] is not None else None,
            "initial_val_bpb": loop.get("initial_val_bpb"),
            "val_tokens": cfg.eval_tokens if loop["val_bpb"] is not None else None,
            "core_metric": loop["core_metric"],
            "train_loss": loop["smooth_train_loss"] / (1 - EMA_BETA ** self.step) if self.step else None,
            "num_params": self.info["num_params"],
            "flops_per_token": self.info["flops_per_token"],
            "total_tokens": cfg.total_batch_size * self.num_iterations,
            "total_training_time_s": loop["total_training_time"],
            "tokens_per_sec": cfg.total_batch_size * timed / loop["total_training_time"] if timed else None,
            "mfu_percent": self.mfu,
            "peak_memory_mib": peak_memory_mib(self.rt.device_type),
            "world_size": self.rt.world_size,
            "checkpoint_dir": str(self.ckpt_dir),
            "samples": self.samples,
        }
        print0(f"Peak memory: {metrics['peak_memory_mib']:,.0f} MiB | training time: "
               f"{loop['total_training_time'] / 60:.2f}m | final val bpb: {loop['val_bpb']} | min val bpb: "
               f"{metrics['min_val_bpb']}")
        write_metrics(self.out_dir, metrics)
        self.wandb.finish()
        return metrics


def main(argv: list[str] | None = None) -> None:
    # less fragmentation on CUDA; read when CUDA's allocator starts, so set before any CUDA call (torch before
    # 2.9 reads only the older name)
    key = "PYTORCH_ALLOC_CONF" if torch_version() >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"
    os.environ.setdefault(key, "expandable_segments:True")
    return stage_main(BaseTrainConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main()
