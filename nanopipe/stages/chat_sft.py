"""
Supervised fine-tuning: train a mid-trained (or base) model on whole example conversations, one per row,
with the loss on the assistant's tokens only.

Run alone (offline demo size on CPU, then nanochat's run on the real datasets):

    python -m nanopipe.stages.chat_sft --mixture=builtin --device_type=cpu --device_batch_size=8 \
        --target_examples_per_step=16 --eval_every=-1 --eval_steps=8 --eval_metrics_every=-1
    python -m nanopipe.stages.chat_sft --plan_only                # parameters, steps, memory

Under torchrun (one process per GPU; on CPU the gloo backend):

    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.chat_sft

The model starts from the last mid-training checkpoint (--source=mid; base also works) with fresh
optimizers at --init_lr_frac of the learning rates, decayed linearly towards 0. As in nanochat, a run of
--num_iterations=N makes N - 1 optimizer steps: its last iteration only evaluates. The mixture (--mixture=seed) is
nanochat's: ARC-Easy and ARC-Challenge train, GSM8K train, the first 10K SmolTalk conversations, identity
conversations (--identity_path; without one, a builtin offline set), SimpleSpelling and SpellingBee. Every
--eval_every steps: the assistant-only loss on SmolTalk test; every --eval_metrics_every steps:
multiple-choice accuracy on MMLU and ARC-Easy (offline: the builtin MultipleChoice task). The loss averages
over the supervised tokens (nanochat's); --loss_per=conversation weighs each conversation once instead, and
--mc_first=N opens the builtin mixture with N multiple-choice conversations (a curriculum for small CPU runs);
--lr_restart=F starts the learning rate's linear decay again after them, from F of the starting rates.

Resume with --resume_from_step=latest (or a step). Checkpoints and metrics.json go to --out_dir (default
NANOPIPE_HOME/chatsft_checkpoints/<source model tag>); the final checkpoint is written before the final
evaluations. Exit codes: 2 a bad flag, source checkpoint or dataset (one line naming it and the flag that fixes
it), 3 non-finite loss, 1 anything else.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from nanopipe.chat_scoring import evaluate_categorical
from nanopipe.chat_batches import (PaddedChatBatcher, evaluate_chat_loss, show_metric, sum_across_ranks,
                                   supervised_loss)
from nanopipe.chat_train import ChatTrainerBase, model_plan, planned_model, print_plan, train_from_source
from nanopipe.common import Runtime, get_dist_info, init_wandb, print0, report_progress
from nanopipe.configs.chat_sft import ChatSFTConfig, check_sft_batch_sizes
from nanopipe.configs.flags import stage_main
from nanopipe.events import Plan, emit
from nanopipe.tasks.mixtures import ChatMixtures, sft_mixtures
from nanopipe.tokenizer import get_token_bytes
from nanopipe.training import gc_frozen_after_first_step, mean_across_ranks, peak_memory_mib

PROG = "python -m nanopipe.stages.chat_sft"
# conversations in the seed mixture, from the hub datasets' sizes (a dry run plans with these, offline)
SEED_MIXTURE_EXAMPLES = 2251 + 1119 + 7473 + 10_000 + 1000 + 300 + 300


def lr_multiplier(step: int, num_iterations: int, restart_at: int = 0, restart_frac: float = 1.0) -> float:
    """Linear decay from 1 at the first step, by 1 / num_iterations a step (nanochat's schedule). With
    0 < restart_at < num_iterations, two decays: the steps before restart_at from 1 over restart_at steps,
    then from restart_frac over the rest (--lr_restart: the mixture after the --mc_first opening)."""
    if 0 < restart_at < num_iterations:
        if step < restart_at:
            return 1.0 - step / restart_at
        return restart_frac * (1.0 - (step - restart_at) / (num_iterations - restart_at))
    return 1.0 - step / num_iterations


def lr_restart_step(cfg: ChatSFTConfig) -> int:
    """The step at which --lr_restart starts the decay again: the first whose conversations are not all
    the --mc_first opening's (0: no restart)."""
    return cfg.mc_first // cfg.target_examples_per_step if cfg.lr_restart else 0


def plan_iterations(cfg: ChatSFTConfig, num_examples: int) -> int:
    """--num_iterations, else nanochat's count: whole steps of one epoch, times the epochs."""
    if cfg.num_iterations is not None:
        return cfg.num_iterations
    return max(1, num_examples // cfg.target_examples_per_step * cfg.num_epochs)


def optimizer_steps(num_iterations: int) -> int:
    """nanochat's SFT loop runs num_iterations iterations and the last one only evaluates."""
    return num_iterations - 1


# -----------------------------------------------------------------------------
# Planning (--plan_only)

def dry_run(cfg: ChatSFTConfig, world_size: int) -> dict:
    device_type = cfg.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    model_config, model_from, _ = planned_model(cfg)
    # rows are padded to the longest conversation of the micro-batch: at most the model's context
    plan = model_plan(model_config, model_config.sequence_len, cfg.device_batch_size, world_size,
                      device_type == "cuda")
    print_plan(plan, model_from)
    grad_accum = check_sft_batch_sizes(cfg, world_size)
    if cfg.mixture == "builtin":
        examples, how = len(sft_mixtures(cfg).train), "builtin mixture"
    else:
        examples, how = SEED_MIXTURE_EXAMPLES, "seed mixture, hub dataset sizes"
    num_iterations = plan_iterations(cfg, examples)
    max_tokens = optimizer_steps(num_iterations) * cfg.target_examples_per_step * model_config.sequence_len
    print0(f"Iterations: {num_iterations:,} ({cfg.num_epochs} epoch(s) of {examples:,} conversations, {how}, "
           f"{cfg.target_examples_per_step} per step)" if cfg.num_iterations is None else
           f"Iterations: {num_iterations:,} (--num_iterations)")
    print0(f"Optimizer steps: {optimizer_steps(num_iterations):,} (the last iteration only evaluates)")
    print0(f"Tokens: at most {max_tokens:,} (rows padded to at most {model_config.sequence_len} tokens)")
    print0(f"World size {world_size}, gradient accumulation steps: {grad_accum}")
    info = {"plan_only": True, **plan, "num_iterations": num_iterations, "train_examples": examples,
            "max_tokens": max_tokens, "grad_accum_steps": grad_accum, "world_size": world_size}
    emit(Plan.of(info))
    return info


# -----------------------------------------------------------------------------
# The stage

def run(cfg: ChatSFTConfig) -> dict:
    _, _, _, world_size = get_dist_info()
    check_sft_batch_sizes(cfg, world_size)  # before any work
    if cfg.plan_only:
        return dry_run(cfg, world_size)
    return train_from_source(cfg, "sft", sft_mixtures, SFTTrainer)


class SFTTrainer(ChatTrainerBase):
    """One fine-tuning run: optimizer steps 0..num_iterations-2, then save and the final evaluations (nanochat's
    last iteration, which only evaluates)."""

    stage = "sft"

    def __init__(self, cfg: ChatSFTConfig, rt: Runtime, src, out_dir: Path, mixtures: ChatMixtures):
        super().__init__(cfg, rt, src, out_dir)
        self.mixtures = mixtures
        self.wandb = init_wandb(cfg.run, "nanopipe-sft", cfg.model_dump(mode="json"), rt.master)
        self.token_bytes = get_token_bytes(src.tokenizer_dir, device=rt.device)
        self.grad_accum = check_sft_batch_sizes(cfg, rt.world_size)
        self.num_iterations = plan_iterations(cfg, len(mixtures.train))
        self.num_steps = optimizer_steps(self.num_iterations)
        self.max_tokens = self.orig_model.config.sequence_len  # conversations are cut to the model's context
        # variable shapes (one conversation per row, padded per micro-batch): no torch.compile
        self.model = self.orig_model
        self.train_loader = PaddedChatBatcher(self.tokenizer, mixtures.train, cfg.device_batch_size, self.max_tokens,
                                              rt.rank, rt.world_size, rt.device,
                                              resume_state=self.loader_state_at_start)
        defaults = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0, "val_loss": None,
                    "val_bpb": None, "accuracy": {}, "supervised_tokens": 0}
        self.loop = {**defaults, **self.loop}
        self.print_setup()
        print0(f"Training mixture ({cfg.mixture}): {len(mixtures.train):,} conversations "
               f"({', '.join(f'{k} {v:,}' for k, v in mixtures.parts['train'].items())}); identity "
               f"conversations: {mixtures.identity}")
        print0(f"Training {self.num_steps:,} steps of {cfg.target_examples_per_step} conversations "
               f"({self.grad_accum} micro-steps of {cfg.device_batch_size} per rank) from step {self.step}")
        if 0 < lr_restart_step(cfg) < self.num_iterations:
            print0(f"Learning rate: linear decay over the multiple-choice opening's {lr_restart_step(cfg):,} steps, "
                   f"then again from {cfg.lr_restart:g} x {cfg.init_lr_frac:g} of the flags' rates over the mixture's")

    # --- the loop ------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.cfg
        with gc_frozen_after_first_step() as after_step:
            while self.step < self.num_steps:
                if self.due(cfg.eval_every):
                    self.evaluate_loss()
                if self.due(cfg.eval_metrics_every, at_zero=False):
                    self.evaluate_accuracy()
                if self.due(cfg.save_every, at_zero=False) and self.step != self.resume_step:
                    self.save(self.train_loader.state_dict())
                loss, lrm, tokens, dt = self.train_step()
                self.check_finite(loss, "--init_lr_frac")
                self.log_step(loss, lrm, tokens, dt)
                self.step += 1
                after_step(self.step)
        if self.final_save_needed():  # the weights first, then the final evaluations
            self.save(self.train_loader.state_dict())
        self.evaluate_loss()
        self.evaluate_accuracy()

    def train_step(self) -> tuple[float, float, int, float]:
        """(mean loss over micro-steps and ranks, lr multiplier, supervised tokens of all ranks, seconds)."""
        self.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.rt.device)
        tokens = torch.zeros((), dtype=torch.long, device=self.rt.device)
        for _ in range(self.grad_accum):
            inputs, targets = next(self.train_loader)
            with self.autocast:
                loss = supervised_loss(self.model, inputs, targets, self.cfg.loss_per)
            loss_sum += loss.detach()
            tokens += (targets >= 0).sum()
            (loss / self.grad_accum).backward()
        lrm = lr_multiplier(self.step, self.num_iterations, lr_restart_step(self.cfg), self.cfg.lr_restart)
        self.step_optimizers(lrm)
        loss = mean_across_ranks(loss_sum / self.grad_accum, self.rt).item()
        total_tokens = int(sum_across_ranks([tokens.item()], self.rt.device)[0])
        self.synchronize()
        return loss, lrm, total_tokens, time.perf_counter() - t0

    def log_step(self, loss: float, lrm: float, tokens: int, dt: float) -> None:
        loop, step = self.loop, self.step
        smooth = self.record_train_loss(loss, dt, steps_done=step + 1)
        loop["supervised_tokens"] += tokens
        print0(f"step {step:05d}/{self.num_iterations:05d} | loss: {smooth:.6f} (this step {loss:.6f}) | "
               f"lrm: {lrm:.4f} | supervised tokens: {tokens:,} | dt: {dt * 1000:.2f}ms | "
               f"epoch: {self.train_loader.epoch} | mem: {peak_memory_mib(self.rt.device_type):,.0f}MiB")
        report_progress(step=step, total=self.num_steps, loss=smooth)   # the step the line above prints
        if step % 10 == 0:
            self.wandb.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/tokens": tokens})

    def evaluate_loss(self) -> None:
        cfg, rt = self.cfg, self.rt
        batches = PaddedChatBatcher(self.tokenizer, self.mixtures.val, cfg.device_batch_size, self.max_tokens,
                                    rt.rank, rt.world_size, rt.device, drop_unsupervised=False)
        self.model.eval()
        with self.autocast:
            result = evaluate_chat_loss(self.model, batches, cfg.eval_steps, self.token_bytes)
        self.model.train()
        self.loop["val_loss"], self.loop["val_bpb"] = result["loss"], result["bpb"]
        print0(f"Step {self.step:05d} | val loss (assistant tokens): {show_metric(result['loss'])} | bpb "
               f"{show_metric(result['bpb'])} ({result['tokens']:,} tokens)")
        report_progress(step=self.step, val_loss=result["loss"])   # null when there was nothing to measure
        self.wandb.log({"step": self.step, **{k: v for k, v in (("val/loss", result["loss"]),
                                                                ("val/bpb", result["bpb"])) if v is not None}})

    def evaluate_accuracy(self) -> None:
        """Multiple-choice accuracy on the metric tasks, with chat_eval's own scoring."""
        cfg, rt = self.cfg, self.rt
        self.model.eval()
        accuracy = {}
        for name, task in self.mixtures.eval_tasks.items():
            num_problems = min(len(task), cfg.eval_metrics_max_problems)
            with self.autocast:
                counts = evaluate_categorical(task, self.model, self.tokenizer, num_problems,
                                              2 * cfg.device_batch_size, rt.rank, rt.world_size)
            passed, total = sum_across_ranks(counts, rt.device)
            accuracy[name] = passed / total
        self.model.train()
        self.loop["accuracy"] = accuracy
        print0(f"Step {self.step:05d} | " + ", ".join(f"{k} accuracy: {v:.4f}" for k, v in accuracy.items()))
        self.wandb.log({"step": self.step, **{f"accuracy/{k}": v for k, v in accuracy.items()}})

    # --- the end --------------------------------------------------------------

    def finish(self) -> dict:
        loop, cfg = self.loop, self.cfg
        self.complete_final_meta({"val_loss": loop["val_loss"], "val_bpb": loop["val_bpb"],
                                  "accuracy": loop["accuracy"]})
        loader = self.train_loader
        cut, dropped, read = (int(n) for n in sum_across_ranks([loader.cut, loader.dropped, loader.position],
                                                               self.rt.device))
        if cut:
            print0(f"warning: {cut:,} of the {read:,} training conversations read were longer than the model's "
                   f"context ({self.max_tokens} tokens) and were cut; {dropped:,} of them kept no assistant token "
                   f"and were dropped, not trained on")
        metrics = {
            "step": self.step,
            "num_iterations": self.num_iterations,
            "val_loss": loop["val_loss"],
            "val_bpb": loop["val_bpb"],
            "accuracy": loop["accuracy"],
            "train_loss": self.smoothed_train_loss(),
            "examples_per_step": cfg.target_examples_per_step,
            "train_examples": len(self.mixtures.train),
            "supervised_tokens": loop["supervised_tokens"],
            "cut_conversations": cut,
            "dropped_conversations": dropped,
            "epochs": self.step * cfg.target_examples_per_step / len(self.mixtures.train),
            "num_params": self.orig_model.num_params(),
            "mixture": cfg.mixture,
            "identity": self.mixtures.identity,
            "data": self.mixtures.describe(),
            "source": self.src.describe(),
            "total_training_time_s": loop["total_training_time"],
            "peak_memory_mib": peak_memory_mib(self.rt.device_type),
            "world_size": self.rt.world_size,
            "checkpoint_dir": str(self.out_dir),
        }
        accuracies = ", ".join(f"{k} {v:.4f}" for k, v in loop["accuracy"].items())
        print0(f"SFT done: {self.step} steps | final val loss {show_metric(loop['val_loss'])} | accuracy: "
               f"{accuracies}")
        self.write_metrics(metrics)
        self.wandb.finish()
        return metrics


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on CUDA
    return stage_main(ChatSFTConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main()
