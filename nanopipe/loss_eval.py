"""
Bits per byte: the validation loss in a unit that does not depend on the tokenizer.

Mean cross-entropy per token rewards a tokenizer with longer tokens; dividing the summed loss (in bits) by
the number of UTF-8 bytes the target tokens stand for does not. Special tokens (byte length 0, e.g. BOS)
and ignored targets (-1) count neither loss nor bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from nanopipe.configs.base import ConfigError
from nanopipe.dataloader import BestFitLoader


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` batches of (inputs, targets), summed over every rank.

    model(inputs, targets, loss_reduction="none") must return per-token losses in nats, shape [B, T].
    token_bytes: [vocab] UTF-8 byte length of each token id, 0 for special tokens.
    """
    assert steps >= 1, f"evaluate_bpb needs at least one step, got steps={steps}"
    device = token_bytes.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)
        losses = model(inputs, targets, loss_reduction="none").reshape(-1).float()
        targets = targets.reshape(-1)
        valid = targets >= 0
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0).to(torch.int64)
        counted = nbytes > 0
        # where() rather than a product: an ignored position may hold a non-finite loss
        total_nats += torch.where(counted, losses, 0.0).sum(dtype=acc_dtype)
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, nbytes = total_nats.item(), total_bytes.item()
    if nbytes == 0:
        return float("inf")
    return nats / (math.log(2) * nbytes)


def evaluate_split_bpb(model, tokenizer, files: list[Path], batch_size: int, seq_len: int, tokens: int, rt,
                       token_bytes, autocast_ctx) -> float:
    """Bits per byte over `tokens` tokens of `files` (rounded down to whole batches across the ranks)."""
    per_step = batch_size * seq_len * rt.world_size
    steps = tokens // per_step
    if steps == 0:
        raise ConfigError(f"{tokens} evaluation tokens are less than one batch across the ranks "
                          f"(batch {batch_size} x sequence {seq_len} x {rt.world_size} ranks = {per_step})")
    with BestFitLoader(tokenizer, files, batch_size, seq_len, device=rt.device, rank=rt.rank,
                       world_size=rt.world_size) as loader, autocast_ctx:
        return evaluate_bpb(model, loader, steps, token_bytes)
