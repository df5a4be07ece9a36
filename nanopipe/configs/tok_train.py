"""Flags of the tokenizer training stage (`python -m nanopipe.stages.tok_train`)."""

from __future__ import annotations

from pydantic import Field

from nanopipe.configs.base import CommonConfig, Off
from nanopipe.configs.data import DataFlags
from nanopipe.vocab import MIN_VOCAB_SIZE

DEFAULT_VOCAB_SIZE = 32768


class TokTrainConfig(CommonConfig, DataFlags):
    """Flags of the tokenizer training stage."""

    max_chars: int = Field(10_000_000_000, ge=1, description="stop reading the train shards after this many characters")
    doc_cap: Off[int] = Field(10_000, ge=1, description="crop each document to this many characters (-1: no crop)")
    vocab_size: int = Field(DEFAULT_VOCAB_SIZE, ge=MIN_VOCAB_SIZE, le=1 << 20,
                            description="vocabulary size: 256 byte tokens + learned merges + 9 special tokens")
    out_dir: str | None = Field(None, description="tokenizer directory to write (default: NANOPIPE_HOME/tokenizer)")
    val_chars: int = Field(10_000_000, ge=1, description="characters of the validation shard to measure compression on")
    log_every_chars: int = Field(100_000_000, ge=1, description="print a progress line every this many characters read")

    NON_SEMANTIC = tuple(dict.fromkeys(
        CommonConfig.NON_SEMANTIC + getattr(DataFlags, "NON_SEMANTIC", ()) + ("val_chars", "log_every_chars")))
