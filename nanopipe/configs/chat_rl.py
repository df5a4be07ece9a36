"""The config of the chat_rl stage (reinforcement learning on GSM8K). Importable without torch: the flow
process plans runs with it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nanopipe.configs.base import (CalculatorFlags, ConfigError, CpuMatmulFlags, DownstreamConfig, Off, ResumeStep,
                                   TopK)
from nanopipe.configs.chat_common import ChatOptimFlags, PlanningFlags

GSM8K_TRAIN_QUESTIONS = 7473   # openai/gsm8k main/train: lets a dry run count steps without the data


class ChatRLConfig(ChatOptimFlags, CalculatorFlags, CpuMatmulFlags, DownstreamConfig, PlanningFlags):
    """Flags of chat_rl (defaults: nanochat's GSM8K RL recipe)."""

    source: Literal["base", "mid", "sft"] = Field("sft", description="which stage's checkpoints to start from")
    # --- task ---------------------------------------------------------------
    task: Literal["gsm8k", "builtin-arithmetic"] = Field(
        "gsm8k", description="training and evaluation problems: GSM8K (hub or --gsm8k_path), or the offline "
                             "builtin arithmetic word problems in GSM8K format")
    gsm8k_path: str | None = Field(None, description="local GSM8K data, directory or .jsonl (none: the hub)")
    synthetic_size: int = Field(1000, ge=1, description="training problems generated for builtin-arithmetic")
    # --- horizon ------------------------------------------------------------
    num_epochs: int = Field(1, ge=1, description="passes over the training questions")
    num_iterations: Off[int] = Field(
        None, ge=1, description="optimizer steps (-1/none: num_epochs * training questions // examples_per_step)")
    # --- rollouts -----------------------------------------------------------
    examples_per_step: int = Field(16, ge=1, description="questions per optimizer step, over all ranks")
    num_samples: int = Field(16, ge=1, description="completions sampled per question (the group of the advantage)")
    device_batch_size: int = Field(8, ge=1, description="sequences per forward pass, sampling and training "
                                                        "(lower it on OOM); also k of the pass@k evaluation")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated at most per completion")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the rollouts and of pass@k")
    top_k: TopK = Field(50, ge=1, description="sample among the k most likely tokens (none, 0 or -1: all)")
    baseline: Literal["mean", "zero"] = Field(
        "mean", description="what a sample's reward is compared with: its group's mean (nanochat's: only groups "
                            "with mixed outcomes teach) or zero (every correct sample is reinforced: sharpens the "
                            "policy faster)")
    replay: Off[int] = Field(
        None, ge=1, description="conversations of the builtin chat mixture (SFT's offline data) per step whose "
                                "supervised loss joins the policy gradient, so RL keeps what SFT taught "
                                "(-1/none: no replay)")
    builtin_restate_counts: bool = Field(
        False, description="builtin workshop problems (builtin-arithmetic's and --replay's) answer by restating "
                           "the count of machines first, as chat_sft's flag of the same name")
    # --- optimisation (the learning rates: ChatOptimFlags) -------------------
    init_lr_frac: float = Field(0.05, gt=0, le=1, description="learning rates start at this fraction of the "
                                                              "above, then decay linearly to 0")
    # --- evaluation, checkpoints --------------------------------------------
    eval_every: Off[int] = Field(60, ge=1, description="pass@k on the test questions every N steps (and at "
                                                       "the end; -1/none: at the end only)")
    eval_examples: int = Field(400, ge=1, description="test questions of each pass@k evaluation")
    eval_samples: Off[int] = Field(None, ge=1, description="k of the pass@k evaluation: samples per test question "
                                                        "(-1/none: min(device_batch_size, num_samples))")
    eval_batch_size: Off[int] = Field(None, ge=1, description="sequences per forward pass of the pass@k "
                                                            "evaluation (-1/none: device_batch_size); the scores "
                                                            "do not depend on it")
    save_every: Off[int] = Field(60, ge=1, description="checkpoint every N steps (and at the end; -1/none: "
                                                       "at the end only)")
    resume_from_step: ResumeStep = Field(
        None, description="resume from this step of out_dir's checkpoints, or 'latest' (none: start fresh)")
    # --- paths --------------------------------------------------------------
    tokenizer_dir: str | None = Field(None, description="tokenizer (default: the one the source checkpoint records)")
    out_dir: str | None = Field(None, description="where checkpoints and metrics.json go "
                                                  "(default: NANOPIPE_HOME/chatrl_checkpoints/<source model tag>)")
    plan_only: bool = Field(False, description="print parameters, steps, samples per step and a memory estimate, "
                                             "then exit")

    NON_SEMANTIC = ("eval_every", "eval_examples", "eval_samples", "eval_batch_size", "save_every", "resume_from_step",
                    "plan_only", "model_tag", "checkpoint_dir")

    @model_validator(mode="after")
    def _consistent(self):
        if self.gsm8k_path is not None and self.task != "gsm8k":
            raise ValueError(f"--gsm8k_path is only read with --task=gsm8k (this run has --task={self.task})")
        return self


def check_world_size(cfg: ChatRLConfig, world_size: int) -> int:
    """Questions per rank per step; a ConfigError naming the flag when the ranks cannot share them (or the
    replayed conversations) evenly."""
    if cfg.examples_per_step % world_size:
        fits = [n for n in (cfg.examples_per_step // world_size * world_size,
                            -(-cfg.examples_per_step // world_size) * world_size) if n > 0]
        raise ConfigError(f"--examples_per_step={cfg.examples_per_step} does not split over {world_size} ranks; "
                         f"try --examples_per_step={' or '.join(map(str, dict.fromkeys(fits)))}")
    if cfg.replay is not None and cfg.replay % world_size:
        fits = [n for n in (cfg.replay // world_size * world_size, -(-cfg.replay // world_size) * world_size) if n > 0]
        raise ConfigError(f"--replay={cfg.replay} does not split over {world_size} ranks; "
                          f"try --replay={' or '.join(map(str, dict.fromkeys(fits)))}")
    return cfg.examples_per_step // world_size


def plan_iterations(cfg: ChatRLConfig, train_questions: int) -> int:
    """Optimizer steps: --num_iterations, else num_epochs * train_questions // examples_per_step (>= 1)."""
    if cfg.num_iterations is not None:
        return cfg.num_iterations
    return max(1, cfg.num_epochs * train_questions // cfg.examples_per_step)
