"""Flags of the terminal chat (`python -m nanopipe.stages.chat_cli`)."""

from __future__ import annotations

from pydantic import Field

from nanopipe.configs.base import CheckpointSource, DownstreamConfig
from nanopipe.configs.chat_eval import TopK

SHORT_FLAGS = {"-p": "prompt", "-t": "temperature", "-k": "top_k", "-i": "source"}


class ChatCliConfig(DownstreamConfig):
    """Flags of the terminal chat."""

    source: CheckpointSource = Field("sft", description="which stage's checkpoints to load")
    prompt: str | None = Field(None, min_length=1, description="one-shot mode (-p): answer this prompt, print it and exit")
    temperature: float = Field(0.6, ge=0.0, description="sampling temperature (-t); 0 is greedy")
    top_k: TopK = Field(50, ge=1, description="sample among the k most likely tokens (-k; none, 0 or -1: all)")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated at most per answer")
    tokenizer_dir: str | None = Field(None, description="tokenizer to use (default: the one the checkpoint records)")
    out_dir: str | None = Field(None, description="write the transcript to <out_dir>/metrics.json (none: write nothing)")
