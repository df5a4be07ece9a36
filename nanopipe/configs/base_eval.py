"""Flags of base model evaluation (`python -m nanopipe.stages.base_eval`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from nanopipe.configs.base import DownstreamConfig, Off
from nanopipe.configs.data import DataFlags

EVAL_MODES = ("core", "bpb", "sample")


class BaseEvalConfig(DownstreamConfig, DataFlags):
    """Flags of base model evaluation."""

    eval: str = Field("core,bpb,sample", description="comma-separated evaluations: core, bpb, sample")
    max_per_task: Off[int] = Field(None, ge=1, description="examples per CORE task (-1/none: all)")
    device_batch_size: int = Field(32, ge=1, description="sequences per device per bpb batch")
    split_tokens: int = Field(20 * 524288, ge=1, description="tokens per split (train, val) for bits per byte")
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
