"""Flags of the terminal chat (`python -m nanopipe.stages.chat_cli`)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from nanopipe.configs.base import CalculatorFlags, CheckpointSource, DownstreamConfig, TopK

SHORT_FLAGS = {"-p": "prompt", "-t": "temperature", "-k": "top_k", "-i": "source"}


class ChatCliConfig(CalculatorFlags, DownstreamConfig):
    """Flags of the terminal chat."""

    source: CheckpointSource = Field("sft", description="which stage's checkpoints to load")
    prompt: str | None = Field(None, min_length=1, description="one-shot mode (-p): answer this prompt, print it and exit")
    temperature: float = Field(0.6, ge=0.0, description="sampling temperature (-t); 0 is greedy")
    top_k: TopK = Field(50, ge=1, description="sample among the k most likely tokens (-k; none, 0 or -1: all)")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated at most per answer")
    tokenizer_dir: str | None = Field(None, description="tokenizer to use (default: the one the checkpoint records)")
    out_dir: str | None = Field(None, description="write the transcript to <out_dir>/metrics.json (none: write nothing)")

    @model_validator(mode="before")
    @classmethod
    def _given_prompt_is_not_empty(cls, values):
        """A given -p must hold text: `-p ''` (which the parser reads as none) would open the interactive chat
        instead of answering. Only a given prompt is checked: leaving -p out stays interactive."""
        if isinstance(values, dict) and "prompt" in values:
            prompt = values["prompt"]
            if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
                raise PydanticCustomError("empty_prompt", "-p/--prompt is empty: give the text to answer, or leave "
                                                          "-p out for the interactive chat")
        return values
