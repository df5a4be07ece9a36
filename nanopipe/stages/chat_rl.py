"""
Reinforcement learning on GSM8K: on-policy policy gradient with a group-mean baseline (nanochat's simplified
GRPO; see nanopipe/rl.py). Each step samples num_samples completions of examples_per_step training questions
with the KV-cache engine and the calculator tool, rewards a completion 1 when its final answer is right, and
pushes up the log-probability of the tokens it sampled in proportion to reward - the group's mean reward.

Run alone (GSM8K from the hub, or a local copy; or the offline builtin arithmetic problems):

    python -m nanopipe.stages.chat_rl                                    # from the last sft checkpoint
    python -m nanopipe.stages.chat_rl --gsm8k_path=<dir with train/test .jsonl> --source=mid
    python -m nanopipe.stages.chat_rl --task=builtin-arithmetic --device_type=cpu --num_iterations=40 \\
        --examples_per_step=4 --num_samples=8 --device_batch_size=8 --max_new_tokens=96 --eval_examples=32
    python -m nanopipe.stages.chat_rl --dry_run                          # parameters, steps, memory; no training

Under torchrun (the questions of a step are split over the ranks):

    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.chat_rl -- --run=rl

Resume with --resume_from_step=latest (or a step): model, optimizers, every rank's sampling generator and the
loop state (reward history, last pass@k) come back, so the run continues exactly as if never stopped.
Checkpoints and metrics.json go to --out_dir (default NANOPIPE_HOME/chatrl_checkpoints/<source model tag>).
Exit codes: 2 for a bad flag or input (source checkpoint missing, tokenizer of another vocabulary, GSM8K path
missing), 3 when the loss stops being finite, 1 otherwise (e.g. GSM8K could not be downloaded).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanopipe.checkpoint import (CheckpointError, build_model, clean_model_state, find_last_step, list_steps,
                                 load_checkpoint, meta_path, resolve_checkpoint_dir, save_checkpoint)
from nanopipe.common import (Runtime, atomic_write_json, compute_cleanup, compute_init, get_base_dir, get_dist_info,
                             init_wandb, print0, report_progress, write_metrics)
from nanopipe.config import parse_cli
from nanopipe.configs.base import ConfigError
from nanopipe.configs.chat_rl import GSM8K_TRAIN_QUESTIONS, ChatRLConfig, check_world_size, plan_iterations
from nanopipe.engine import Engine
from nanopipe.gpt import GPT, GPTConfig, build_model_config
from nanopipe.rl import (accumulate_policy_gradient, evaluate_pass_at_k, rng_from_json, rng_state_to_json,
                         sample_group, step_questions)
from nanopipe.training import NonFiniteLossError, estimate_peak_memory, peak_memory_mib
from nanopipe.tasks import ArithmeticProblems, GSM8K, TaskDataError
from nanopipe.tokenizer import TokenizerNotFoundError, get_tokenizer

PROG = "python -m nanopipe.stages.chat_rl"
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
PROMPT_TOKENS_ESTIMATE = 256   # a GSM8K question with its chat tokens is well under this (memory estimate only)


# -----------------------------------------------------------------------------
# Inputs: the source checkpoint, the tasks

@dataclass(frozen=True)
class Source:
    ckpt_dir: Path
    step: int
    model_config: dict
    tokenizer_dir: Path


def resolve_source(cfg: ChatRLConfig) -> Source:
    """Find and check the source checkpoint without loading it: its meta exists, and the tokenizer has the
    model's vocabulary size. Raises CheckpointError (one line naming the path and the mismatch)."""
    explicit = Path(cfg.checkpoint_dir).expanduser() if cfg.checkpoint_dir else None
    ckpt_dir = resolve_checkpoint_dir(cfg.source, cfg.model_tag, explicit)
    step = cfg.model_step if cfg.model_step is not None else find_last_step(ckpt_dir)
    path = meta_path(ckpt_dir, step)
    if not path.is_file():
        raise CheckpointError(f"source checkpoint {ckpt_dir} has no step {step} "
                              f"(complete steps there: {list_steps(ckpt_dir) or 'none'})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict) or "vocab_size" not in model_config:
        raise CheckpointError(f"{path} has no model_config: not a nanopipe model checkpoint")
    tokenizer_dir = cfg.tokenizer_dir or meta.get("tokenizer_dir")
    if not tokenizer_dir:
        raise CheckpointError(f"{path} records no tokenizer_dir: pass --tokenizer_dir")
    tokenizer_dir = Path(tokenizer_dir).expanduser()
    vocab_size = get_tokenizer(tokenizer_dir).get_vocab_size()
    if vocab_size != model_config["vocab_size"]:
        raise CheckpointError(f"vocabulary mismatch: tokenizer {tokenizer_dir} has {vocab_size} tokens but the model "
                              f"in {ckpt_dir} (step {step}) has vocab_size={model_config['vocab_size']}")
    return Source(ckpt_dir, step, model_config, tokenizer_dir)


def load_tasks(cfg: ChatRLConfig):
    """(train task, test task). GSM8K comes from --gsm8k_path (a directory with train and test splits, or one
    file used for both) or the hub; when it cannot be read the error names the dataset and the flag."""
    if cfg.task == "builtin-arithmetic":
        return (ArithmeticProblems(size=cfg.synthetic_size, split="train"),
                ArithmeticProblems(size=cfg.eval_examples, split="test"))
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
        raise TaskDataError(f"GSM8K is not available from {where}: {err} -- give a local copy with "
                            f"--gsm8k_path=DIR (train/test splits) or a .jsonl file, or run offline with "
                            f"--task=builtin-arithmetic") from err


def default_out_dir(source_dir: Path) -> Path:
    return get_base_dir() / "chatrl_checkpoints" / source_dir.name


# -----------------------------------------------------------------------------
# Dry run

def estimate_memory(model_config: GPTConfig, cfg: ChatRLConfig, world_size: int, cuda: bool) -> dict[str, int]:
    """Rough peak bytes per device: weights, gradients and optimizer state as in pretraining; training
    activations of one device batch of (prompt + max_new_tokens) tokens; the KV cache of one sampling batch."""
    seq_tokens = PROMPT_TOKENS_ESTIMATE + cfg.max_new_tokens
    train_shape = GPTConfig(**{**model_config.__dict__, "sequence_len": seq_tokens})
    parts = estimate_peak_memory(train_shape, cfg.device_batch_size, world_size, cuda)
    parts.pop("total")
    c = model_config
    parts["kv_cache"] = 2 * c.n_layer * cfg.device_batch_size * seq_tokens * c.n_kv_head * c.head_dim * (2 if cuda else 4)
    parts["total"] = sum(parts.values())
    return parts


def describe_run(cfg: ChatRLConfig, model_config: GPTConfig, train_questions: int, world_size: int,
                 device_type: str) -> dict:
    with torch.device("meta"):
        model = GPT(model_config)
    num_iterations = plan_iterations(cfg, train_questions)
    per_rank = check_world_size(cfg, world_size)
    return {
        "model_config": model_config.__dict__,
        "num_params": model.num_params(),
        "train_questions": train_questions,
        "num_iterations": num_iterations,
        "examples_per_step": cfg.examples_per_step,
        "examples_per_rank": per_rank,
        "samples_per_step": cfg.examples_per_step * cfg.num_samples,
        "max_sampled_tokens_per_step": cfg.examples_per_step * cfg.num_samples * cfg.max_new_tokens,
        "world_size": world_size,
        "estimated_peak_memory_bytes": estimate_memory(model_config, cfg, world_size, device_type == "cuda"),
    }


def print_description(info: dict) -> None:
    c = info["model_config"]
    print0(f"Model: {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads, vocab {c['vocab_size']:,}; "
           f"parameters: {info['num_params']:,}")
    print0(f"Steps: {info['num_iterations']:,} over {info['train_questions']:,} training questions; "
           f"{info['examples_per_step']} questions per step ({info['examples_per_rank']} per rank, "
           f"{info['world_size']} rank(s)); samples per step: {info['samples_per_step']:,} "
           f"(at most {info['max_sampled_tokens_per_step']:,} sampled tokens)")
    mem = info["estimated_peak_memory_bytes"]
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items() if k != "total")
    print0(f"Estimated peak memory per device: {mem['total'] / 2**30:.2f} GiB ({parts} GiB; a rough model)")


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
    try:
        source = resolve_source(cfg)
        model_config = GPTConfig(**source.model_config)
        print0(f"Source: {source.ckpt_dir} step {source.step}")
    except (CheckpointError, TokenizerNotFoundError) as err:
        print0(f"dry run: source checkpoint not usable yet ({err}); assuming --depth={cfg.depth}")
        model_config = build_model_config(cfg.depth, cfg.aspect_ratio, cfg.head_dim, 2048, 32768)
    info = describe_run(cfg, model_config, count_train_questions(cfg), world_size, device_type)
    print_description(info)
    return {"dry_run": True, **info}


# -----------------------------------------------------------------------------
# The stage

def run(cfg: ChatRLConfig) -> dict:
    _, _, _, world_size = get_dist_info()
    check_world_size(cfg, world_size)  # before any work
    if cfg.dry_run:
        return dry_run(cfg, world_size)
    source = resolve_source(cfg)       # a missing checkpoint or a wrong tokenizer fails here, in a second
    train_task, test_task = load_tasks(cfg)
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_out_dir(source.ckpt_dir)
    rt = compute_init(cfg.device_type, cfg.dtype, cfg.seed)
    try:
        trainer = Trainer(cfg, rt, source, out_dir, train_task, test_task)
        trainer.fit()
        return trainer.finish()
    finally:
        compute_cleanup()


class Trainer:
    """One RL run: __init__ builds (or restores) everything, fit() runs steps 0..num_iterations-1, then saves
    and evaluates at step == num_iterations. `loop` plus each rank's sampling generator is all the state
    besides model, optimizers and step that a checkpoint carries."""

    def __init__(self, cfg: ChatRLConfig, rt: Runtime, source: Source, out_dir: Path, train_task, test_task):
        self.cfg, self.rt, self.source, self.out_dir = cfg, rt, source, out_dir
        self.train_task, self.test_task = train_task, test_task
        self.wandb = init_wandb(cfg.run, "nanopipe-rl", cfg.model_dump(mode="json"), rt.master)
        self.autocast = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                         if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
        print0(f"Device: {rt.device} ({rt.world_size} process(es)), compute dtype {rt.dtype}")
        self.model, self.tokenizer, _ = build_model(source.ckpt_dir, source.step, rt.device, "train",
                                                    tokenizer_dir=source.tokenizer_dir)
        print0(f"Source: {source.ckpt_dir} step {source.step}")
        self.engine = Engine(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.encode_special("<|assistant_end|>")  # padding only: it never carries loss
        self.info = describe_run(cfg, self.model.config, len(train_task), rt.world_size, rt.device_type)
        print_description(self.info)
        self.num_iterations = self.info["num_iterations"]
        self.k = min(cfg.device_batch_size, cfg.num_samples)
        self.num_eval = min(cfg.eval_examples, len(test_task))
        self._build_optimizers()

        self.step = 0
        self.rng = sampling_rng(cfg.seed, rt.rank)
        self.loop = {"rewards": [], "sequence_lengths": [], "evals": [], "training_time": 0.0}
        self.resume_step = self._resume_step()
        if self.resume_step is not None:
            self._restore(self.resume_step)

    # --- setup ----------------------------------------------------------------

    def _build_optimizers(self) -> None:
        cfg = self.cfg
        self.optimizers = self.model.setup_optimizers(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                                      matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
        for opt in self.optimizers:  # RL starts at a fraction of the rates and decays them linearly to 0
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = group["lr"] * cfg.init_lr_frac

    def _resume_step(self) -> int | None:
        requested = self.cfg.resume_from_step
        if requested != "latest":
            return requested
        try:
            return find_last_step(self.out_dir, world_size=self.rt.world_size)
        except CheckpointError:
            print0(f"--resume_from_step=latest: no complete checkpoint in {self.out_dir} yet, starting from scratch")
            return None

    def _restore(self, step: int) -> None:
        model_state, optim_state, meta = load_checkpoint(self.out_dir, step, self.rt.device, load_optimizer=True,
                                                         rank=self.rt.rank)
        if meta.get("model_config") != self.model.config.__dict__:
            raise ConfigError(f"checkpoint step {step} in {self.out_dir} is a different model "
                              f"({meta.get('model_config')}) from the source ({self.model.config.__dict__})")
        saved = meta["sampler_rng"]
        if saved["world_size"] != self.rt.world_size:
            raise ConfigError(f"checkpoint step {step} in {self.out_dir} was written by {saved['world_size']} "
                              f"process(es); resume it with the same number (this run has {self.rt.world_size})")
        # copied in place (no assign=True): the optimizers already hold these parameter tensors
        self.model.load_state_dict(clean_model_state(model_state, self.rt.device), strict=True)
        for opt, state in zip(self.optimizers, optim_state):
            opt.load_state_dict(state)
        self.rng = rng_from_json(saved["ranks"][self.rt.rank])
        self.loop = meta["loop_state"]
        self.step = step
        print0(f"Resuming from step {step} of {self.out_dir}")

    # --- checkpoints ------------------------------------------------------------

    def save(self) -> None:
        """Model (rank 0), each rank's optimizer state, and a meta holding every rank's sampling generator."""
        states = [rng_state_to_json(self.rng)]
        if self.rt.world_size > 1:
            states = [None] * self.rt.world_size
            dist.all_gather_object(states, rng_state_to_json(self.rng))
        meta = {
            "model_config": self.model.config.__dict__,
            "tokenizer_dir": str(self.source.tokenizer_dir),
            "source_checkpoint": {"dir": str(self.source.ckpt_dir), "step": self.source.step},
            "user_config": self.cfg.model_dump(mode="json"),
            "num_iterations": self.num_iterations,
            "sampler_rng": {"world_size": self.rt.world_size, "ranks": states},
            "loop_state": self.loop,
        }
        save_checkpoint(self.out_dir, self.step, self.model.state_dict(),
                        [opt.state_dict() for opt in self.optimizers], meta, rank=self.rt.rank)
        if self.rt.world_size > 1:
            dist.barrier()  # every rank's optimizer file is on disk before anyone moves on

    def due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def evaluated_now(self) -> bool:
        return bool(self.loop["evals"]) and self.loop["evals"][-1]["step"] == self.step

    # --- evaluation -------------------------------------------------------------

    def evaluate(self) -> dict:
        """pass@1..k on the first eval_examples test questions, sampled at the training temperature."""
        cfg, rt = self.cfg, self.rt
        self.model.eval()
        with self.autocast:
            counts, problems = evaluate_pass_at_k(self.engine, self.tokenizer, self.test_task, self.num_eval, self.k,
                                                  cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed,
                                                  rt.rank, rt.world_size)
        totals = sum_across_ranks([*counts, problems], rt)
        passes = [c / totals[-1] for c in totals[:-1]]
        record = {"step": self.step, "pass@1": passes[0], f"pass@{self.k}": passes[-1],
                  "pass_at": passes, "problems": int(totals[-1])}
        self.loop["evals"].append(record)
        shown = ", ".join(f"pass@{j + 1}: {p:.4f}" for j, p in enumerate(passes))
        print0(f"Step {self.step:05d} | eval on {record['problems']} test questions | {shown}")
        report_progress(step=self.step, total=self.num_iterations, pass_at_1=passes[0], pass_at_k=passes[-1])
        self.wandb.log({"step": self.step, **{f"pass@{j + 1}": p for j, p in enumerate(passes)}})
        return record

    # --- training ---------------------------------------------------------------

    def rollouts(self) -> list:
        """This rank's groups of the current step, sampled with the current weights."""
        cfg = self.cfg
        self.model.eval()
        groups = []
        indices = step_questions(self.step, cfg.examples_per_step, len(self.train_task), self.rt.rank,
                                 self.rt.world_size)
        with self.autocast:
            for index in indices:
                groups.append(sample_group(self.engine, self.tokenizer, self.train_task, self.train_task[index],
                                           cfg.num_samples, cfg.device_batch_size, cfg.max_new_tokens,
                                           cfg.temperature, cfg.top_k, self.rng))
        return groups

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        groups = self.rollouts()
        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(s) for g in groups for s in g.sequences]
        sampled = sum(g.sampled_tokens() for g in groups)
        total_reward, total_length, total_sampled, sequences = sum_across_ranks(
            [sum(rewards), sum(lengths), sampled, len(rewards)], self.rt)
        self.model.train()
        loss = accumulate_policy_gradient(self.model, groups, self.pad_id, self.cfg.device_batch_size, total_sampled,
                                          self.rt.world_size, self.autocast)
        loss = sum_across_ranks([loss], self.rt)[0] / self.rt.world_size
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"policy-gradient loss is {loss} at step {self.step}: lower the learning rates "
                                     f"(--init_lr_frac, --matrix_lr, ...); the last checkpoint in {self.out_dir} "
                                     f"is intact")
        lrm = 1.0 - self.step / self.num_iterations
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for opt in self.optimizers:
            opt.step()  # under torchrun the optimizers average the gradients across ranks themselves
        self.model.zero_grad(set_to_none=True)
        return {"reward": total_reward / sequences, "sequence_length": total_length / sequences,
                "sampled_tokens": total_sampled / sequences, "loss": loss, "lrm": lrm,
                "dt": time.perf_counter() - t0}

    def log_step(self, stats: dict) -> None:
        self.loop["rewards"].append(stats["reward"])
        self.loop["sequence_lengths"].append(stats["sequence_length"])
        self.loop["training_time"] += stats["dt"]
        step, total = self.step, self.num_iterations
        print0(f"step {step:05d}/{total:05d} ({100 * step / total:.2f}%) | reward: {stats['reward']:.4f} | "
               f"sequence length: {stats['sequence_length']:.1f} (sampled {stats['sampled_tokens']:.1f}) | "
               f"loss: {stats['loss']:.6f} | lrm: {stats['lrm']:.3f} | dt: {stats['dt']:.2f}s")
        report_progress(step=step + 1, total=total, reward=stats["reward"])
        self.wandb.log({"step": step, "reward": stats["reward"], "sequence_length": stats["sequence_length"],
                        "loss": stats["loss"], "lrm": stats["lrm"]})

    def fit(self) -> None:
        cfg = self.cfg
        print0(f"RL for {self.num_iterations:,} steps of {cfg.examples_per_step} questions x {cfg.num_samples} "
               f"samples from step {self.step}")
        while self.step < self.num_iterations:
            if self.due(cfg.eval_every) and not self.evaluated_now():
                self.evaluate()  # (a run resumed at an evaluation step has that evaluation already)
            if self.step > 0 and self.due(cfg.save_every) and self.step != self.resume_step:
                self.save()
            self.log_step(self.train_step())
            self.step += 1
        # the weights first: an evaluation that crashes cannot lose them
        if not (self.step == self.resume_step and meta_path(self.out_dir, self.step).is_file()):
            self.save()
        if not self.evaluated_now():
            self.evaluate()

    def finish(self) -> dict:
        """Add the final evaluation to the last meta, write metrics.json, return the metrics."""
        final_eval = self.loop["evals"][-1]
        if self.rt.master:
            path = meta_path(self.out_dir, self.step)
            meta = json.loads(path.read_text(encoding="utf-8"))
            meta["loop_state"], meta["eval"] = self.loop, final_eval
            atomic_write_json(path, meta)
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
            "source_checkpoint": str(self.source.ckpt_dir),
            "checkpoint_dir": str(self.out_dir),
        }
        print0(f"Final reward {metrics['reward']} | pass@1 {metrics['pass@1']:.4f} | pass@{self.k} "
               f"{metrics['pass@k']:.4f} | training time {self.loop['training_time'] / 60:.2f}m")
        write_metrics(self.out_dir, metrics)
        self.wandb.finish()
        return metrics


def sampling_rng(seed: int, rank: int) -> random.Random:
    """Each rank's sampling generator: its own stream, fixed by (seed, rank)."""
    return random.Random(f"chat_rl/{seed}/{rank}")


def sum_across_ranks(values: list[float], rt: Runtime) -> list[float]:
    if rt.world_size == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(ChatRLConfig, argv, prog=PROG)
    try:
        return run(cfg)
    except (ConfigError, CheckpointError, TokenizerNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)
    except TaskDataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    except NonFiniteLossError as err:
        print(f"{PROG}: NonFiniteLossError: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NON_FINITE_LOSS)


if __name__ == "__main__":
    main()
