"""Flags of the tokenizer evaluation stage (`python -m nanopipe.stages.tok_eval`)."""

from __future__ import annotations

import tiktoken
from pydantic import Field, field_validator

from nanopipe.configs.base import CommonConfig
from nanopipe.configs.data import DataFlags


class TokEvalConfig(CommonConfig, DataFlags):
    """Flags of the tokenizer evaluation stage."""

    tokenizer_dir: str | None = Field(None, description="tokenizer to evaluate (default: NANOPIPE_HOME/tokenizer)")
    out_dir: str | None = Field(None, description="where metrics.json goes (default: NANOPIPE_HOME/tok_eval)")
    val_chars: int = Field(10_000_000, ge=1, description="characters of the validation shard to measure on")
    references: list[str] = Field(["gpt2", "cl100k_base"],
                                  description="tiktoken encodings to compare with, comma-separated (empty: none)")
    allow_download: bool = Field(False, description="let tiktoken download a reference missing from its cache")
    download_timeout_s: float = Field(30.0, gt=0, description="seconds to wait for one reference download")

    NON_SEMANTIC = tuple(dict.fromkeys(
        CommonConfig.NON_SEMANTIC + getattr(DataFlags, "NON_SEMANTIC", ()) + ("download_timeout_s",)))

    @field_validator("references")
    @classmethod
    def _known_encodings(cls, names: list[str]) -> list[str]:
        valid = tiktoken.list_encoding_names()
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"unknown tiktoken encoding(s) {unknown}; valid: {', '.join(valid)}")
        return names
