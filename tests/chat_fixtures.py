"""Inputs of the chat training tests: a small BPE tokenizer trained on the builtin chat data, and depth-2
base checkpoints in the layout base_train leaves (random weights, or a few real training steps)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nanopipe.chat_format import conversation_text
from nanopipe.checkpoint import save_checkpoint
from nanopipe.gpt import GPT, build_model_config
from nanopipe.tasks import builtin_chat_mixture
from nanopipe.tokenizer import Tokenizer

VOCAB_SIZE = 512


def chat_texts(examples: int = 600) -> list[str]:
    """Rendered builtin conversations (both splits): the text the chat stages will tokenise."""
    texts = []
    for split in ("train", "test"):
        mixture = builtin_chat_mixture(split, seed=7, size=examples // 6)
        texts += [conversation_text(mixture[i]) for i in range(len(mixture))]
    return texts


def build_chat_tokenizer(tokenizer_dir: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer.train_from_iterator(chat_texts(), vocab_size=vocab_size)
    tokenizer.save(tokenizer_dir)
    return tokenizer


def write_base_checkpoint(ckpt_dir: Path, tokenizer_dir: Path, vocab_size: int, step: int = 10, depth: int = 2,
                          max_seq_len: int = 128, seed: int = 0) -> Path:
    """A depth-2, width-64 GPT checkpoint with base_train's meta (freshly initialised weights)."""
    torch.manual_seed(seed)
    config = build_model_config(depth=depth, aspect_ratio=32, head_dim=32, max_seq_len=max_seq_len,
                                vocab_size=vocab_size)
    model = GPT.create(config, "cpu")
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_dir": str(tokenizer_dir),
            "loader_state": {"world_size": 1, "ranks": [None]}, "loop_state": {}}
    save_checkpoint(ckpt_dir, step, model.state_dict(), None, meta)
    return ckpt_dir


def tiny_chat_flags(source_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """Flags of a tiny offline chat stage run on CPU; override any with keyword arguments."""
    flags = dict(checkpoint_dir=source_dir, out_dir=out_dir, device_type="cpu", mixture="builtin")
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def tokenizer_and_base(root: Path) -> dict:
    """A chat tokenizer and a tiny base checkpoint under `root`: what the chat stages' tests start from."""
    tokenizer = build_chat_tokenizer(root / "tokenizer")
    write_base_checkpoint(root / "base" / "d2", root / "tokenizer", tokenizer.get_vocab_size())
    return {"root": root, "tokenizer": tokenizer, "base": root / "base" / "d2"}
