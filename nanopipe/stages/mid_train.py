"""
Mid-training: teach a pretrained base model the chat format, multiple choice, calculator tool calls and
spelling, by training on whole conversations packed like pretraining text (every token is a target).

Run alone (offline demo size on CPU, then nanochat's run on the real datasets):

    python -m nanopipe.stages.mid_train --mixture=builtin --device_type=cpu --max_seq_len=256 \
        --device_batch_size=8 --total_batch_size=4096 --eval_every=-1 --eval_tokens=16384
    python -m nanopipe.stages.mid_train --plan_only               # parameters, steps, tokens, memory
    python -m nanopipe.stages.mid_train --dry_run                 # train and evaluate, write nothing

Under torchrun (one process per GPU; on CPU the gloo backend):

    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.mid_train -- --device_batch_size=16

The model starts from the last base checkpoint (--source, --model_tag, --model_step or --checkpoint_dir) with
fresh optimizers. The training mixture (--mixture=seed) is nanochat's: SmolTalk, MMLU auxiliary_train,
GSM8K, identity conversations twice (--identity_path; without one, a builtin offline set), SimpleSpelling
and SpellingBee; each real dataset comes from the Hugging Face hub or from --<dataset>_path. By default the
run makes one pass over the mixture; progress is the fraction of it consumed, and the learning rate holds
until 80% and then decays linearly to 0.

Resume with --resume_from_step=latest (or a step): model, optimizers, data position, random state and loop
state come back exactly. Checkpoints and metrics.json go to --out_dir (default
NANOPIPE_HOME/mid_checkpoints/<source model tag>); the final checkpoint is written before the final
evaluation. Exit codes: 2 a bad flag, source checkpoint or dataset (one line naming it and the flag that fixes
it), 3 non-finite loss, 1 anything else.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from nanopipe.chat_format import render_conversation
from nanopipe.chat_batches import PackedChatLoader, evaluate_chat_loss, show_metric, sum_across_ranks
from nanopipe.chat_train import (ChatTrainerBase, check_row_length, model_plan, planned_model, print_plan,
                                 train_from_source)
from nanopipe.common import Runtime, get_dist_info, init_wandb, print0, report_progress
from nanopipe.configs.base import compile_decision
from nanopipe.configs.flags import stage_main
from nanopipe.events import Plan, emit
from nanopipe.configs.mid_train import MidTrainConfig, check_mid_batch_sizes
from nanopipe.optim import muon_momentum
from nanopipe.tasks.mixtures import ChatMixtures, mid_mixtures
from nanopipe.tokenizer import get_token_bytes, get_tokenizer
from nanopipe.training import gc_frozen_after_first_step, mean_across_ranks, peak_memory_mib

PROG = "python -m nanopipe.stages.mid_train"
WARMDOWN_START = 0.8              # the learning rate holds until this fraction of the mixture, then decays to 0
DRY_RUN_SAMPLE = 2000             # conversations rendered to estimate a one-pass run's length


def lr_multiplier(progress: float) -> float:
    """1.0 until WARMDOWN_START of the mixture is consumed, then linear to 0 at the end of the pass."""
    if progress < WARMDOWN_START:
        return 1.0
    return max(0.0, (1.0 - progress) / (1.0 - WARMDOWN_START))


# -----------------------------------------------------------------------------
# Planning (--plan_only)

def estimate_pass(mixtures: ChatMixtures, tokenizer, seq_len: int, sample: int = DRY_RUN_SAMPLE) -> dict:
    """Tokens of one pass over the training mixture, from the mean rendered length of an even sample."""
    n = len(mixtures.train)
    picks = range(0, n, max(1, n // sample))
    lengths = [min(len(render_conversation(tokenizer, mixtures.train[i], max_tokens=None)[0]), seq_len + 1)
               for i in picks]
    mean = sum(lengths) / len(lengths)
    return {"conversations": n, "mean_tokens": mean, "tokens": int(mean * n), "sampled": len(lengths)}


def dry_run(cfg: MidTrainConfig, world_size: int) -> dict:
    device_type = cfg.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    model_config, model_from, src = planned_model(cfg)
    check_row_length(cfg.max_seq_len, model_config, model_from)
    plan = model_plan(model_config, cfg.max_seq_len, cfg.device_batch_size, world_size, device_type == "cuda")
    print_plan(plan, model_from)
    grad_accum = check_mid_batch_sizes(cfg, world_size)
    info = {"plan_only": True, **plan, "grad_accum_steps": grad_accum, "world_size": world_size,
            "num_iterations": cfg.num_iterations, "total_tokens": None, "mixture": cfg.mixture}
    if cfg.num_iterations is not None:
        info["total_tokens"] = cfg.num_iterations * cfg.total_batch_size
        how = "--num_iterations"
    elif cfg.mixture == "builtin" and src is not None:  # the offline mixture is cheap to measure
        one_pass = estimate_pass(mid_mixtures(cfg), get_tokenizer(src.tokenizer_dir), cfg.max_seq_len)
        info["num_iterations"] = max(1, math.ceil(one_pass["tokens"] / cfg.total_batch_size))
        info["total_tokens"] = info["num_iterations"] * cfg.total_batch_size
        info["one_pass"] = one_pass
        how = (f"about one pass over {one_pass['conversations']:,} conversations of ~{one_pass['mean_tokens']:.0f} "
               f"tokens (estimated from {one_pass['sampled']}; padding adds a little)")
    else:
        how = ("one pass over the seed mixture (~850K conversations): the count is known once the data is "
               "read; set --num_iterations to fix it")
    steps = f"{info['num_iterations']:,}" if info["num_iterations"] else "unknown"
    tokens = f"{info['total_tokens']:,}" if info["total_tokens"] else "unknown"
    print0(f"Iterations: {steps} ({how}); tokens: {tokens}; {cfg.total_batch_size:,} tokens per step")
    print0(f"World size {world_size}, gradient accumulation steps: {grad_accum}")
    emit(Plan.of(info))
    return info


# -----------------------------------------------------------------------------
# The stage

def run(cfg: MidTrainConfig) -> dict:
    _, _, _, world_size = get_dist_info()
    check_mid_batch_sizes(cfg, world_size)  # before any work: a bad batch size fails in a second
    if cfg.plan_only:
        return dry_run(cfg, world_size)
    return train_from_source(cfg, "mid", mid_mixtures, MidTrainer)


class MidTrainer(ChatTrainerBase):
    """One mid-training run. The loop runs until --num_iterations steps or one pass over the mixture, then
    saves and evaluates. `loop` holds all the state besides the step that a resume needs."""

    stage = "mid"

    def __init__(self, cfg: MidTrainConfig, rt: Runtime, src, out_dir: Path, mixtures: ChatMixtures):
        # the flags' learning rates as they are, whatever --total_batch_size: nanochat's mid-training does not
        # scale them with the batch (base_train does)
        super().__init__(cfg, rt, src, out_dir)
        self.mixtures = mixtures
        self.wandb = init_wandb(cfg.run, "nanopipe-mid", cfg.model_dump(mode="json"), rt.master)
        self.grad_accum = check_mid_batch_sizes(cfg, rt.world_size)
        self.token_bytes = get_token_bytes(src.tokenizer_dir, device=rt.device)
        use_compile, why = compile_decision(cfg.compile, rt.device_type, cfg.num_iterations)
        print0(f"torch.compile: {'on' if use_compile else 'off'} ({why})")
        # rows never change shape; evaluation uses the same shapes, so it can share the compiled module
        self.model = torch.compile(self.orig_model, dynamic=False) if use_compile else self.orig_model
        self.train_loader = PackedChatLoader(self.tokenizer, mixtures.train, cfg.device_batch_size, cfg.max_seq_len,
                                             rt.rank, rt.world_size, rt.device, resume_state=self.loader_state_at_start)
        defaults = {"progress": 0.0, "smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0,
                    "val_loss": None, "val_bpb": None, "min_val_bpb": None}
        self.loop = {**defaults, **self.loop}
        self.describe_start()

    def describe_start(self) -> None:
        cfg, m = self.cfg, self.mixtures
        self.print_setup()
        print0(f"Training mixture ({cfg.mixture}): {len(m.train):,} conversations "
               f"({', '.join(f'{k} {v:,}' for k, v in m.parts['train'].items())})")
        print0(f"Validation mixture: {len(m.val):,} conversations; identity conversations: {m.identity}")
        horizon = f"{cfg.num_iterations:,} steps" if cfg.num_iterations else "one pass over the mixture"
        print0(f"Training {horizon} of {cfg.total_batch_size:,} tokens ({self.grad_accum} micro-steps of "
               f"{cfg.device_batch_size} x {cfg.max_seq_len} per rank) from step {self.step}")

    # --- the loop ------------------------------------------------------------

    def done(self) -> bool:
        if self.cfg.num_iterations is not None:
            return self.step >= self.cfg.num_iterations
        return self.loop["progress"] >= 1.0

    def fit(self) -> None:
        with gc_frozen_after_first_step() as after_step:
            while not self.done():
                if self.due(self.cfg.eval_every):
                    self.evaluate()
                if self.due(self.cfg.save_every, at_zero=False) and self.step != self.resume_step:
                    self.save(self.train_loader.state_dict())
                loss, lrm, dt = self.train_step()
                self.check_finite(loss, "the learning rates (--init_lr_frac, --matrix_lr, ...)")
                self.step += 1
                self.log_step(loss, lrm, dt)
                after_step(self.step)
        # the weights first: an evaluation that crashes or runs out of memory cannot lose them
        if self.final_save_needed():
            self.save(self.train_loader.state_dict())
        self.evaluate()

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step: (mean loss over micro-steps and ranks, lr multiplier, seconds)."""
        self.synchronize()
        t0 = time.perf_counter()
        lrm = lr_multiplier(self.loop["progress"])  # the progress at the start of this step
        loss_sum = torch.zeros((), device=self.rt.device)
        for _ in range(self.grad_accum):
            inputs, targets = next(self.train_loader)
            with self.autocast:
                loss = self.model(inputs, targets)
            loss_sum += loss.detach()
            (loss / self.grad_accum).backward()  # .backward() sums gradients: average over the micro-steps
        self.step_optimizers(lrm, muon_momentum(self.step))
        loss = mean_across_ranks(loss_sum / self.grad_accum, self.rt).item()
        self.loop["progress"] = self.progress_after_step()
        self.synchronize()
        return loss, lrm, time.perf_counter() - t0

    def progress_after_step(self) -> float:
        """Steps done / --num_iterations, or the fraction of the mixture all ranks have consumed together."""
        if self.cfg.num_iterations is not None:
            return (self.step + 1) / self.cfg.num_iterations
        consumed, = sum_across_ranks([self.train_loader.consumed], self.rt.device)
        return consumed / len(self.mixtures.train)

    def log_step(self, loss: float, lrm: float, dt: float) -> None:
        loop, step, cfg = self.loop, self.step, self.cfg
        smooth = self.record_train_loss(loss, dt, steps_done=step)
        progress = loop["progress"]
        print0(f"step {step:05d} | progress {100 * progress:6.2f}% | loss: {smooth:.6f} (this step {loss:.6f}) | "
               f"lrm: {lrm:.3f} | dt: {dt * 1000:.2f}ms | tok/sec: {cfg.total_batch_size / dt:,.0f} | "
               f"epoch: {self.train_loader.epoch} | mem: {peak_memory_mib(self.rt.device_type):,.0f}MiB")
        # total: the exact horizon, or the one the progress so far points to (so that step / total = progress)
        if cfg.num_iterations is not None:
            total = cfg.num_iterations
        else:
            total = max(step, round(step / progress)) if progress > 0 else None
        report_progress(step=step, total=total, progress=round(progress, 6), loss=smooth)
        if step % 100 == 0:
            self.wandb.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/progress": progress,
                            "train/dt": dt})

    def evaluate(self) -> None:
        cfg, rt = self.cfg, self.rt
        val_loader = PackedChatLoader(self.tokenizer, self.mixtures.val, cfg.device_batch_size, cfg.max_seq_len,
                                      rt.rank, rt.world_size, rt.device)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * rt.world_size))
        self.model.eval()
        with self.autocast:
            result = evaluate_chat_loss(self.model, val_loader, steps, self.token_bytes)
        self.model.train()
        loop = self.loop
        loop["val_loss"], loop["val_bpb"], loop["val_tokens"] = result["loss"], result["bpb"], result["tokens"]
        if self.step == 0:  # the source model on the held-out conversations: the "before" of mid-training
            loop["initial_val_loss"], loop["initial_val_bpb"] = result["loss"], result["bpb"]
        if result["bpb"] is not None:  # None: nothing to measure (no target token with bytes)
            loop["min_val_bpb"] = min(result["bpb"], loop["min_val_bpb"] or math.inf)
        print0(f"Step {self.step:05d} | val loss: {show_metric(result['loss'])} | val bpb: "
               f"{show_metric(result['bpb'])} ({result['tokens']:,} target tokens)")
        report_progress(step=self.step, val_loss=result["loss"], val_bpb=result["bpb"])
        self.wandb.log({"step": self.step, **{k: v for k, v in (("val/loss", result["loss"]),
                                                                ("val/bpb", result["bpb"])) if v is not None}})

    # --- the end --------------------------------------------------------------

    def finish(self) -> dict:
        loop, cfg = self.loop, self.cfg
        self.complete_final_meta({"val_loss": loop["val_loss"], "val_bpb": loop["val_bpb"]})
        timed = loop["timed_steps"]
        cropped, read = (int(n) for n in sum_across_ranks([self.train_loader.cropped, self.train_loader.position],
                                                           self.rt.device))
        if cropped:
            print0(f"warning: {cropped:,} of the {read:,} training conversations read were longer than a row "
                   f"(--max_seq_len={cfg.max_seq_len} + 1 tokens) and were cropped to it; 0 dropped (every token of "
                   f"a cropped conversation is still a target)")
        metrics = {
            "step": self.step,
            "num_iterations": cfg.num_iterations,
            "val_loss": loop["val_loss"],
            "val_bpb": loop["val_bpb"],
            "min_val_bpb": loop["min_val_bpb"],
            "initial_val_loss": loop.get("initial_val_loss"),
            "initial_val_bpb": loop.get("initial_val_bpb"),
            "val_tokens": loop.get("val_tokens"),
            "train_loss": self.smoothed_train_loss(),
            "progress": loop["progress"],
            "total_tokens": cfg.total_batch_size * self.step,
            "num_params": self.orig_model.num_params(),
            "pad_fraction": self.train_loader.pad_fraction(),
            "cropped_conversations": cropped,
            "mixture": cfg.mixture,
            "identity": self.mixtures.identity,
            "data": self.mixtures.describe(),
            "source": self.src.describe(),
            "total_training_time_s": loop["total_training_time"],
            "tokens_per_sec": cfg.total_batch_size * timed / loop["total_training_time"] if timed else None,
            "peak_memory_mib": peak_memory_mib(self.rt.device_type),
            "world_size": self.rt.world_size,
            "checkpoint_dir": str(self.out_dir),
        }
        print0(f"Mid-training done: {self.step} steps, {100 * loop['progress']:.1f}% of the mixture | final val "
               f"loss {show_metric(loop['val_loss'])}, bpb {show_metric(loop['val_bpb'])} | peak memory "
               f"{metrics['peak_memory_mib']:,.0f} MiB")
        self.write_metrics(metrics)
        self.wandb.finish()
        return metrics


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on CUDA
    return stage_main(MidTrainConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main()
