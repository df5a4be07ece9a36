"""
SmolTalk, general chat conversations (https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk, the
"smol" version meant for small models: ~460K train and ~24K test conversations).

A row is {"messages": [{"role", "content"}, ...], ...}: an optional system message, then user and
assistant alternating. Training data only (no exact evaluation).
"""

from __future__ import annotations

from pathlib import Path

from nanopipe.tasks.base import Task, checked_conversation
from nanopipe.tasks.sources import load_rows, require_keys

HF_REPO = "HuggingFaceTB/smol-smoltalk"
SPLITS = ("train", "test")


class SmolTalk(Task):
    """smol-smoltalk from the hub or local files with a "messages" column."""

    def __init__(self, split: str = "train", data_path: str | Path | None = None,
                 shuffle_seed: int | None = 42, **slicing: int | None):
        super().__init__(**slicing)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.rows = load_rows(HF_REPO, None, split, data_path, shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = require_keys(self.rows[index], ("messages",), self.rows, index)
        messages = [{"role": m["role"], "content": m["content"]} if isinstance(m, dict) else m
                    for m in row["messages"]]
        return checked_conversation(messages, self.rows.where(index))
