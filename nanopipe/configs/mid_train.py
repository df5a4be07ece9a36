"""Flags of mid-training (`python -m nanopipe.stages.mid_train`); defaults are nanochat's speedrun values."""

from __future__ import annotations

from pydantic import Field, model_validator

from nanopipe.configs.base import (EVAL_TOKENS, REFERENCE_BATCH_TOKENS, CompileFlag, ConfigError, Off,
                                   check_for_one_process)
from nanopipe.configs.chat_common import ChatSource, ChatTrainFlags


class MidTrainConfig(CompileFlag, ChatTrainFlags):
    """Mid-training: conversations, multiple choice, tool use and spelling, packed like pretraining."""

    source: ChatSource = Field("base", description="which stage's checkpoints to start from")
    num_iterations: Off[int] = Field(
        None, ge=1, description="optimizer steps (-1/none: one pass over the training mixture)")
    device_batch_size: int = Field(32, ge=1, description="rows per device per micro-step (lower it on OOM)")
    total_batch_size: int = Field(REFERENCE_BATCH_TOKENS, ge=1,
                                  description="tokens per optimizer step, all ranks and micro-steps")
    max_seq_len: int = Field(2048, ge=2, description="row length in tokens (conversations are packed into rows)")
    init_lr_frac: float = Field(1.0, gt=0, le=10, description="starting learning rates as a fraction of the flags'")
    eval_every: Off[int] = Field(150, ge=1, description="val loss/bpb every N steps and at the end "
                                                       "(-1: only at the end)")
    eval_tokens: int = Field(EVAL_TOKENS, ge=1, description="validation tokens per evaluation")

    NON_SEMANTIC = ("eval_every", "eval_tokens", "compile")

    @model_validator(mode="after")
    def _batch_sizes_divide(self):
        if check_for_one_process():
            check_mid_batch_sizes(self, world_size=1)
        return self


def check_mid_batch_sizes(cfg: MidTrainConfig, world_size: int) -> int:
    """Gradient accumulation steps; a ConfigError with valid values when the sizes do not divide."""
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro:
        lower = cfg.total_batch_size // tokens_per_micro * tokens_per_micro
        totals = " or ".join(str(v) for v in (lower, lower + tokens_per_micro) if v > 0)
        raise ConfigError(
            f"--total_batch_size={cfg.total_batch_size} is not a multiple of --device_batch_size "
            f"({cfg.device_batch_size}) x --max_seq_len ({cfg.max_seq_len}) x world size ({world_size}) = "
            f"{tokens_per_micro} tokens per micro-step; try --total_batch_size={totals}")
    if cfg.eval_tokens < tokens_per_micro:
        raise ConfigError(f"--eval_tokens={cfg.eval_tokens} is less than one evaluation batch "
                          f"(device_batch_size x max_seq_len x world size = {tokens_per_micro}); raise it")
    return cfg.total_batch_size // tokens_per_micro
