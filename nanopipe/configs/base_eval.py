"""Flags of base model evaluation (`python -m nanopipe.stages.base_eval`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from nanopipe.configs.base import EVAL_TOKENS, ConfigError, DownstreamConfig, Off
from nanopipe.configs.data import DataFlags

EVAL_MODES = ("core", "bpb", "sample")


class BaseEvalConfig(DownstreamConfig, DataFlags):
    """Flags of base model evaluation."""

    eval: str = Field("core,bpb,sample", description="comma-separated evaluations: core, bpb, sample")
    max_per_task: Off[int] = Field(None, ge=1, description="examples per CORE task (-1/none: all)")
    device_batch_size: int = Field(32, ge=1, description="sequences per device per bpb batch")
    split_tokens: int = Field(EVAL_TOKENS, ge=1, description="tokens per split (train, val) for bits per byte")
    eval_bundle_dir: str | None = Field(None, description="CORE eval bundle (default: NANOPIPE_HOME/eval_bundle)")
    tokenizer_dir: str | None = Field(None, description="tokenizer directory (default: the one the checkpoint names)")
    out_dir: str | None = Field(None, description="where metrics.json and core.csv go "
                                                  "(default: NANOPIPE_HOME/base_eval/<tag>_<step>)")

    @field_validator("eval")
    @classmethod
    def _known_modes(cls, value):
        modes = [m.strip() for m in value.split(",") if m.strip()]
        unknown = [m for m in modes if m not in EVAL_MODES]
        if unknown or not modes:
            raise ValueError(f"unknown evaluation(s) {unknown or value!r}; choose from {', '.join(EVAL_MODES)}")
        return ",".join(modes)


def check_bpb_batches(cfg: BaseEvalConfig, seq_len: int, world_size: int) -> None:
    """Bits per byte is measured over whole batches of every rank: --split_tokens must hold at least one.
    `seq_len` is the model's context (base_train's --max_seq_len), known before the model exists."""
    if "bpb" not in cfg.eval.split(","):
        return
    per_step = cfg.device_batch_size * seq_len * world_size
    if cfg.split_tokens < per_step:
        raise ConfigError(f"--split_tokens={cfg.split_tokens} is less than one bits-per-byte batch: --device_batch_size "
                          f"({cfg.device_batch_size}) x the model's context ({seq_len}) x world size ({world_size}) = "
                          f"{per_step} tokens; raise --split_tokens or lower --device_batch_size")
