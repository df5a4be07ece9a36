"""Flags of supervised fine-tuning (`python -m nanopipe.stages.chat_sft`); defaults are nanochat's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nanopipe.configs.base import ConfigError, Off, check_for_one_process
from nanopipe.configs.chat_common import ChatSource, ChatTrainFlags


class ChatSFTConfig(ChatTrainFlags):
    """Supervised fine-tuning on whole conversations, loss on the assistant's tokens only."""

    source: ChatSource = Field("mid", description="which stage's checkpoints to start from")
    num_epochs: int = Field(1, ge=1, description="passes over the training mixture (when --num_iterations is none)")
    num_iterations: Off[int] = Field(
        None, ge=1, description="optimizer steps (-1/none: num_epochs x mixture size / examples per step)")
    device_batch_size: int = Field(4, ge=1, description="conversations per device per micro-step")
    target_examples_per_step: int = Field(32, ge=1, description="conversations per optimizer step, all ranks "
                                                                "and micro-steps")
    loss_per: Literal["token", "conversation"] = Field(
        "token", description="how the loss averages: over every supervised token (nanochat's) or per "
                             "conversation, so a one-letter answer weighs as much as a long one")
    mc_first: int = Field(0, ge=0, description="--mixture=builtin: multiple-choice conversations that open the "
                                               "training data, before the shuffled mixture (a curriculum: the "
                                               "answer letter is learnt alone first; 0: none)")
    lr_restart: float = Field(0.0, ge=0, le=1, description="with --mc_first: the mixture after the multiple-choice "
                                                           "opening starts the linear decay again, from this "
                                                           "fraction of the run's starting rates (0: one decay "
                                                           "over the whole run, nanochat's)")
    init_lr_frac: float = Field(0.02, gt=0, le=10, description="starting learning rates as a fraction of the flags'")
    eval_every: Off[int] = Field(100, ge=1, description="validation loss every N steps and at the end "
                                                       "(-1: only at the end)")
    eval_steps: int = Field(100, ge=1, description="micro-batches per validation loss evaluation")
    eval_metrics_every: Off[int] = Field(200, ge=1, description="multiple-choice accuracy every N steps and at "
                                                                "the end (-1: only at the end)")
    eval_metrics_max_problems: int = Field(1024, ge=1, description="problems per multiple-choice evaluation")

    NON_SEMANTIC = ("eval_every", "eval_steps", "eval_metrics_every", "eval_metrics_max_problems")

    @model_validator(mode="after")
    def _mc_first_is_builtin(self):
        if self.mc_first and self.mixture != "builtin":
            raise ConfigError(f"--mc_first={self.mc_first} opens the builtin mixture; with --mixture={self.mixture} "
                              f"use --mc_first=0 or --mixture=builtin")
        if self.lr_restart and not self.mc_first:
            raise ConfigError(f"--lr_restart={self.lr_restart:g} restarts the learning rate after the --mc_first "
                              f"opening; give --mc_first=N (N > 0) or --lr_restart=0")
        return self

    @model_validator(mode="after")
    def _batch_sizes_divide(self):
        if check_for_one_process():
            check_sft_batch_sizes(self, world_size=1)
        return self


def check_sft_batch_sizes(cfg: ChatSFTConfig, world_size: int) -> int:
    """Gradient accumulation steps; a ConfigError with valid values when the sizes do not divide."""
    per_micro = cfg.device_batch_size * world_size
    if cfg.target_examples_per_step % per_micro:
        lower = cfg.target_examples_per_step // per_micro * per_micro
        targets = " or ".join(str(v) for v in (lower, lower + per_micro) if v > 0)
        raise ConfigError(
            f"--target_examples_per_step={cfg.target_examples_per_step} is not a multiple of --device_batch_size "
            f"({cfg.device_batch_size}) x world size ({world_size}) = {per_micro}; try "
            f"--target_examples_per_step={targets}")
    return cfg.target_examples_per_step // per_micro
