"""
Reinforcement learning on GSM8K: on-policy policy gradient with a group-mean baseline (nanochat's simplified
GRPO; see nanopipe/rl.py). Each step samples num_samples completions of examples_per_step training questions
with the KV-cache engine and the calculator tool, rewards a completion 1 when its final answer is right, and
pushes up the log-probability of the tokens it sampled in proportion to reward - the group's mean reward.
--baseline=zero uses the reward itself (every right answer is reinforced: the policy sharpens faster);
--replay=N adds the supervised loss of N builtin SFT conversations per step, so RL keeps what SFT taught.

Run alone (GSM8K from the hub, or a local copy; or the offline builtin arithmetic problems):

    python -m nanopipe.stages.chat_rl                                    # from the last sft checkpoint
    python -m nanopipe.stages.chat_rl --gsm8k_path=<dir with train/test .jsonl> --source=mid
    python -m nanopipe.stages.chat_rl --task=builtin-arithmetic --synthetic_size=360 --device_type=cpu \\
        --examples_per_step=8 --num_samples=8 --device_batch_size=32 --max_new_tokens=200 --baseline=zero \\
        --init_lr_frac=0.10 --replay=16 --eval_examples=1024 --eval_samples=1   # as the demo preset runs it
    python -m nanopipe.stages.chat_rl --plan_only                        # parameters, steps, memory; no training

Under torchrun (the questions of a step are split over the ranks):

    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.chat_rl -- --run=rl

Resume with --resume_from_step=latest (or a step): model, optimizers, every rank's sampling generator and the
loop state (reward history, last pass@k) come back, so the run continues exactly as if never stopped.
Checkpoints and metrics.json go to --out_dir (default NANOPIPE_HOME/chatrl_checkpoints/<source model tag>).
Exit codes: 2 for a bad flag or input (source checkpoint missing, a tokenizer of another vocabulary, GSM8K neither
at --gsm8k_path nor on the hub), 3 when the loss stops being finite, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path

import torch

from nanopipe.chat_batches import collate_supervised, sum_across_ranks, supervised_loss
from nanopipe.chat_format import render_conversation
from nanopipe.chat_train import (ChatTrainerBase, SourceCheckpoint, model_plan, planned_model, print_plan,
                                 train_from_source)
from nanopipe.common import Runtime, get_dist_info, init_wandb, print0, report_progress
from nanopipe.configs.base import ConfigError
from nanopipe.configs.chat_rl import GSM8K_TRAIN_QUESTIONS, ChatRLConfig, check_world_size, plan_iterations
from nanopipe.configs.flags import stage_main
from nanopipe.events import Plan, emit
from nanopipe.engine import Engine
from nanopipe.gpt import GPTConfig
from nanopipe.rl import (accumulate_policy_gradient, evaluate_pass_at_k, rng_from_json, rng_state_to_json,
                         sample_groups, step_questions)
from nanopipe.tasks import GSM8K, ArithmeticProblems, Task, TaskDataError
from nanopipe.tasks.builtin import builtin_chat_mixture
from nanopipe.tasks.mixtures import SFT_DATA_SEED_OFFSET, DatasetUnavailableError
from nanopipe.training import NonFiniteLossError, peak_memory_mib

PROG = "python -m nanopipe.stages.chat_rl"
RL_DATA_SEED_OFFSET = 2000    # builtin RL questions: another seed than mid-training's (+0) and SFT's (+1000)
PROMPT_TOKENS_ESTIMATE = 256   # a GSM8K question with its chat tokens is well under this (memory estimate only)


# -----------------------------------------------------------------------------
# Inputs: the source checkpoint, the tasks

def builtin_train_task(cfg: ChatRLConfig) -> Task:
    """The builtin training questions: synthetic_size arithmetic problems drawn with their own seed (cfg.seed +
    RL_DATA_SEED_OFFSET), so RL does not revisit the problems mid-training and SFT drew."""
    return ArithmeticProblems(size=cfg.synthetic_size, split="train", seed=cfg.seed + RL_DATA_SEED_OFFSET,
                              restate_counts=cfg.builtin_restate_counts)


def replay_mixture(cfg: ChatRLConfig, num_iterations: int) -> Task:
    """The conversations --replay draws from: the builtin chat mixture's training split (identity, arithmetic,
    multiple choice, spelling) with SFT's seed, as many as the run replays, so none comes twice."""
    tasks = len(builtin_chat_mixture("train", cfg.seed, 1).tasks)   # a task listed twice counts twice
    return builtin_chat_mixture("train", cfg.seed + SFT_DATA_SEED_OFFSET, -(-cfg.replay * num_iterations // tasks),
                                cfg.builtin_restate_counts)


def load_tasks(cfg: ChatRLConfig):
    """(train task, test task). GSM8K comes from --gsm8k_path (a directory with train and test splits, or one
    file used for both) or the hub; when it cannot be read the error names the dataset and the flag. The
    builtin test problems are the held-out ones chat_eval scores (fixed seed)."""
    if cfg.task == "builtin-arithmetic":
        return builtin_train_task(cfg), ArithmeticProblems(size=cfg.eval_examples, split="test")
    path = Path(cfg.gsm8k_path).expanduser() if cfg.gsm8k_path else None
    if path is not None and not path.exists():
        raise ConfigError(f"--gsm8k_path: {path} does not exist (a directory with train/test .jsonl or .parquet, "
                          f"or one .jsonl file)")
    if path is not None and path.is_file():
        print0(f"--gsm8k_path is one file: {path.name} serves for training and evaluation alike")
    try:
        return GSM8K("main", "train", path), GSM8K("main", "test", path)
    except TaskDataError as err:
        where = f"--gsm8k_path={path}" if path else "the Hugging Face hub (openai/gsm8k)"
        raise DatasetUnavailableError(f"GSM8K is not available from {where}: {err} -- give a local copy with "
                            f"--gsm8k_path=DIR (train/test splits) or a .jsonl file, or run offline with "
                            f"--task=builtin-arithmetic") from err


# -----------------------------------------------------------------------------
# Dry run

def describe_run(cfg: ChatRLConfig, model_config: GPTConfig, train_questions: int, world_size: int,
                 device_type: str) -> dict:
    """Parameters, steps, samples per step and a rough peak memory per device: base_train's model of weights,
    gradients, optimizer state and activations for one device batch of (prompt + max_new_tokens) tokens,
    plus the KV cache of one sampling or evaluation batch, the larger."""
    cuda = device_type == "cuda"
    seq_tokens = PROMPT_TOKENS_ESTIMATE + cfg.max_new_tokens
    plan = model_plan(model_config, seq_tokens, cfg.device_batch_size, world_size, cuda)
    memory = plan["estimated_peak_memory_bytes"]
    c = model_config
    rows = max(cfg.device_batch_size, cfg.eval_batch_size or 0)
    memory["kv_cache"] = 2 * c.n_layer * rows * seq_tokens * c.n_kv_head * c.head_dim * (2 if cuda else 4)
    memory["total"] = sum(v for k, v in memory.items() if k != "total")
    samples = cfg.examples_per_step * cfg.num_samples
    return {**plan, "train_questions": train_questions, "num_iterations": plan_iterations(cfg, train_questions),
            "examples_per_step": cfg.examples_per_step, "examples_per_rank": check_world_size(cfg, world_size),
            "samples_per_step": samples, "max_sampled_tokens_per_step": samples * cfg.max_new_tokens,
            "world_size": world_size, "replay": cfg.replay}


def print_description(info: dict, model_from: str) -> None:
    print_plan(info, model_from)
    print0(f"Steps: {info['num_iterations']:,} over {info['train_questions']:,} training questions; "
           f"{info['examples_per_step']} questions per step ({info['examples_per_rank']} per rank, "
           f"{info['world_size']} rank(s)); samples per step: {info['samples_per_step']:,} "
           f"(at most {info['max_sampled_tokens_per_step']:,} sampled tokens)"
           + (f"; replayed SFT conversations per step: {info['replay']}" if info.get("replay") else ""))


def count_train_questions(cfg: ChatRLConfig) -> int:
    """Training questions, without downloading anything: GSM8K's known size unless a local copy is given."""
    if cfg.task == "builtin-arithmetic":
        return cfg.synthetic_size
    if cfg.gsm8k_path is None:
        return GSM8K_TRAIN_QUESTIONS
    return len(load_tasks(cfg)[0])


def dry_run(cfg: ChatRLConfig, world_size: int) -> dict:
    """Plan the run from the source checkpoint's shape (or the --depth hint while it does not exist yet);
    joins no process group and loads no weights."""
    device_type = cfg.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    model_config, model_from, _ = planned_model(cfg)
    info = describe_run(cfg, model_config, count_train_questions(cfg), world_size, device_type)
    print_description(info, model_from)
    emit(Plan.of(info))
    return {"plan_only": True, **info}


# -----------------------------------------------------------------------------
# The stage

def run(cfg: ChatRLConfig) -> dict:
    _, _, _, world_size = get_dist_info()
    check_world_size(cfg, world_size)  # before any work
    if cfg.plan_only:
        return dry_run(cfg, world_size)
    # a missing source checkpoint, a wrong tokenizer or missing data fail before any process group
    return train_from_source(cfg, "rl", load_tasks,
                             lambda cfg, rt, src, out_dir, tasks: Trainer(cfg, rt, src, out_dir, *tasks))


class Trainer(ChatTrainerBase):
    """One RL run: __init__ builds (or restores) everything, fit() runs steps 0..num_iterations-1, then saves
    and evaluates at step == num_iterations. Besides model, optimizers and step, a checkpoint carries `loop`
    (reward history, evaluations) and, as each rank's loader state, its sampling generator."""

    stage = "rl"

    def __init__(self, cfg: ChatRLConfig, rt: Runtime, src: SourceCheckpoint, out_dir: Path, train_task, test_task):
        super().__init__(cfg, rt, src, out_dir)  # the model, and fresh or restored optimizers at init_lr_frac
        self.train_task, self.test_task = train_task, test_task
        self.wandb = init_wandb(cfg.run, "nanopipe-rl", cfg.model_dump(mode="json"), rt.master)
        self.autocast = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                         if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
        print0(f"Device: {rt.device} ({rt.world_size} process(es)), compute dtype {rt.dtype}; "
               f"source {src.ckpt_dir} step {src.step}")
        self.model = self.orig_model
        self.engine = Engine(self.model, self.tokenizer, extended_calculator=cfg.extended_calculator)
        self.pad_id = self.tokenizer.encode_special("<|assistant_end|>")  # padding only: it never carries loss
        self.info = describe_run(cfg, self.model.config, len(train_task), rt.world_size, rt.device_type)
        print_description(self.info, f"source checkpoint {src.ckpt_dir} step {src.step}")
        self.num_iterations = self.info["num_iterations"]
        self.replayed = replay_mixture(cfg, self.num_iterations) if cfg.replay else None
        self.k = cfg.eval_samples or min(cfg.device_batch_size, cfg.num_samples)
        self.num_eval = min(cfg.eval_examples, len(test_task))
        self.loop = {"rewards": [], "sequence_lengths": [], "evals": [], "training_time": 0.0, **self.loop}
        state = self.loader_state_at_start
        self.rng = rng_from_json(state["sampler_rng"]) if state else sampling_rng(cfg.seed, rt.rank)

    # --- checkpoints and evaluation ------------------------------------------------

    def resharded_loader_state(self, states: list[dict], step: int) -> dict:
        """Resumed on another number of ranks: the questions of a step are a function of the step alone; each
        rank's sampling generator is derived afresh from (seed, rank, world size, step)."""
        rng = random.Random(f"chat_rl/{self.cfg.seed}/{self.rt.rank}/{self.rt.world_size}/{step}")
        return {"sampler_rng": rng_state_to_json(rng)}

    def save_checkpoint(self) -> None:
        self.save({"sampler_rng": rng_state_to_json(self.rng)}, {"num_iterations": self.num_iterations})

    def evaluated_now(self) -> bool:
        return bool(self.loop["evals"]) and self.loop["evals"][-1]["step"] == self.step

    def evaluate(self) -> dict:
        """pass@1..k on the first eval_examples test questions, sampled at the training temperature."""
        cfg, rt = self.cfg, self.rt
        self.model.eval()
        with self.autocast:
            counts, problems = evaluate_pass_at_k(self.engine, self.tokenizer, self.test_task, self.num_eval, self.k,
                                                  cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed,
                                                  rt.rank, rt.world_size,
                                                  rows_per_batch=cfg.eval_batch_size or cfg.device_batch_size)
        totals = sum_across_ranks([*counts, problems], rt.device)
        passes = [c / totals[-1] for c in totals[:-1]]
        record = {"step": self.step, "pass@1": passes[0], f"pass@{self.k}": passes[-1],
                  "pass_at": passes, "problems": int(totals[-1])}
        self.loop["evals"].append(record)
        shown = ", ".join(f"pass@{j + 1}: {p:.4f}" for j, p in enumerate(passes))
        print0(f"Step {self.step:05d} | eval on {record['problems']} test questions | {shown}")
        report_progress(step=self.step, total=self.num_iterations, pass_at_1=passes[0], pass_at_k=passes[-1])
        self.wandb.log({"step": self.step, **{f"pass@{j + 1}": p for j, p in enumerate(passes)}})
        return record

    # --- training -----------------------------------------------------------------

    def rollouts(self) -> list:
        """This rank's groups of the current step, sampled with the current weights: the samples of as many
        questions as fit in device_batch_size rows decode together (seeds drawn as one question at a time)."""
        cfg = self.cfg
        self.model.eval()
        indices = step_questions(self.step, cfg.examples_per_step, len(self.train_task), self.rt.rank,
                                 self.rt.world_size)
        with self.autocast:
            return sample_groups(self.engine, self.tokenizer, self.train_task,
                                 [self.train_task[index] for index in indices], cfg.num_samples,
                                 cfg.device_batch_size, cfg.max_new_tokens, cfg.temperature, cfg.top_k, self.rng)

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        groups = self.rollouts()
        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(s) for g in groups for s in g.sequences]
        sampled = sum(g.sampled_tokens() for g in groups)
        total_reward, total_length, total_sampled, sequences = sum_across_ranks(
            [sum(rewards), sum(lengths), sampled, len(rewards)], self.rt.device)
        self.model.train()
        loss = accumulate_policy_gradient(self.model, groups, self.pad_id, self.cfg.device_batch_size, self.autocast,
                                          self.cfg.baseline)
        replay_loss = self.replay_gradient() if self.replayed is not None else 0.0
        loss, replay_loss = (v / self.rt.world_size for v in sum_across_ranks([loss, replay_loss], self.rt.device))
        if not math.isfinite(loss + replay_loss):
            raise NonFiniteLossError(f"policy-gradient loss is {loss} (replay {replay_loss}) at step {self.step}: "
                                     f"lower the learning rates "
                                     f"(--init_lr_frac, --matrix_lr, ...); the last checkpoint in {self.out_dir} "
                                     f"is intact")
        lrm = 1.0 - self.step / self.num_iterations  # linear decay to 0
        self.step_optimizers(lrm)
        return {"reward": total_reward / sequences, "sequence_length": total_length / sequences,
                "sampled_tokens": total_sampled / sequences, "loss": loss, "replay_loss": replay_loss, "lrm": lrm,
                "dt": time.perf_counter() - t0}

    def replay_gradient(self) -> float:
        """Backward of the supervised loss (mean over the assistant's tokens, as SFT's) of this rank's replayed
        conversations of the step; the optimizers step it together with the policy gradient. Which
        conversations is a function of the step, as for the questions. Returns the loss."""
        indices = step_questions(self.step, self.cfg.replay, len(self.replayed), self.rt.rank, self.rt.world_size)
        rows = self.model.config.sequence_len + 1   # inputs and targets are one shorter
        rendered = [render_conversation(self.tokenizer, self.replayed[i], max_tokens=rows) for i in indices]
        inputs, targets = collate_supervised(rendered, self.pad_id)
        with self.autocast:
            loss = supervised_loss(self.model, inputs.to(self.rt.device), targets.to(self.rt.device))
        loss.backward()
        return loss.item()

    def log_step(self, stats: dict) -> None:
        self.loop["rewards"].append(stats["reward"])
        self.loop["sequence_lengths"].append(stats["sequence_length"])
        self.loop["training_time"] += stats["dt"]
        step, total = self.step, self.num_iterations
        replay = f" | replay loss: {stats['replay_loss']:.6f}" if self.replayed is not None else ""
        print0(f"step {step:05d}/{total:05d} ({100 * step / total:.2f}%) | reward: {stats['reward']:.4f} | "
               f"sequence length: {stats['sequence_length']:.1f} (sampled {stats['sampled_tokens']:.1f}) | "
               f"loss: {stats['loss']:.6f}{replay} | lrm: {stats['lrm']:.3f} | dt: {stats['dt']:.2f}s")
        report_progress(step=step, total=total, reward=stats["reward"])   # the step the line above prints
        self.wandb.log({"step": step, "reward": stats["reward"], "sequence_length": stats["sequence_length"],
                        "loss": stats["loss"], "lrm": stats["lrm"]})

    def fit(self) -> None:
        cfg = self.cfg
        print0(f"RL for {self.num_iterations:,} steps of {cfg.examples_per_step} questions x {cfg.num_samples} "
               f"samples from step {self.step}")
        while self.step < self.num_iterations:
            if self.due(cfg.eval_every) and not self.evaluated_now():
                self.evaluate()  # (a run resumed at an evaluation step has that evaluation already)
            if self.due(cfg.save_every, at_zero=False) and self.step != self.resume_step:
                self.save_checkpoint()
            self.log_step(self.train_step())
            self.step += 1
        if self.final_save_needed():  # the weights first: an evaluation that crashes cannot lose them
            self.save_checkpoint()
        if not self.evaluated_now():
            self.evaluate()

    def finish(self) -> dict:
        """Add the final evaluation to the last meta, write metrics.json, return the metrics."""
        final_eval = self.loop["evals"][-1]
        self.complete_final_meta({"loop_state": self.loop, "eval": final_eval})
        rewards = self.loop["rewards"]
        metrics = {
            "step": self.step,
            "num_iterations": self.num_iterations,
            "task": self.cfg.task,
            "reward": rewards[-1] if rewards else None,
            "reward_first": rewards[0] if rewards else None,
            "rewards": rewards,
            "sequence_lengths": self.loop["sequence_lengths"],
            "pass@1": final_eval["pass@1"],
            "pass@k": final_eval["pass_at"][-1],
            "k": self.k,
            "evals": self.loop["evals"],
            "num_params": self.info["num_params"],
            "samples_per_step": self.info["samples_per_step"],
            "training_time_s": self.loop["training_time"],
            "peak_memory_mib": peak_memory_mib(self.rt.device_type),
            "world_size": self.rt.world_size,
            "source_checkpoint": str(self.src.ckpt_dir),
            "checkpoint_dir": str(self.out_dir),
        }
        print0(f"Final reward {metrics['reward']} | pass@1 {metrics['pass@1']:.4f} | pass@{self.k} "
               f"{metrics['pass@k']:.4f} | training time {self.loop['training_time'] / 60:.2f}m")
        self.write_metrics(metrics)
        self.wandb.finish()
        return metrics


def sampling_rng(seed: int, rank: int) -> random.Random:
    """Each rank's sampling generator: its own stream, fixed by (seed, rank)."""
    return random.Random(f"chat_rl/{seed}/{rank}")


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on CUDA
    return stage_main(ChatRLConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main()
