"""
What every training stage shares: the error for a diverged loss, memory and FLOPs accounting, collectives
over the ranks, and the CPU/GC settings of a long training loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys

import torch
import torch.distributed as dist

from nanopipe.common import Runtime
from nanopipe.exit_codes import ExitCode, StageError
from nanopipe.gpt import GPTConfig
from nanopipe.vocab import padded_vocab_size

PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2.25e15, "A100": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
DEFAULT_PEAK_FLOPS = 989e12         # H100 bf16 dense, for GPUs not in the table


def estimate_peak_memory(config: GPTConfig, device_batch_size: int, world_size: int, cuda: bool) -> dict[str, int]:
    """Rough peak memory per device, in bytes, by part.

    Weights, gradients and optimizer state are exact counts (fp32, except the bf16 token embedding on
    CUDA; AdamW and Muon state sharded over the ranks). Activations are a model: about 32 bytes per
    channel per token per layer with bf16 autocast, flash attention and torch.compile's fusion (which
    puts nanochat's d20 at batch 32 x 2048 inside an 80 GB H100), about 100 in eager float32; logits
    take 4 bytes per entry with bf16 + fused cross-entropy, 16 in eager float32.
    """
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    padded_V = padded_vocab_size(V)
    wte = lm_head = padded_V * C
    matrices = L * (2 * C * C + 2 * C * (config.n_kv_head * config.head_dim) + 8 * C * C)
    wte_bytes = 2 if cuda else 4
    weights = wte * wte_bytes + (lm_head + matrices) * 4
    grads = weights
    adam_state = 2 * (wte * wte_bytes + lm_head * 4) // world_size
    muon_state = matrices * 4 // world_size
    tokens = device_batch_size * config.sequence_len
    activations = (32 if cuda else 100) * C * L * tokens
    logits = (4 if cuda else 16) * V * tokens
    parts = dict(weights=weights, gradients=grads, optimizer=adam_state + muon_state,
                 activations=activations, logits=logits)
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device_type: str) -> float | None:
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS_BF16.items() if key in name), DEFAULT_PEAK_FLOPS)


def peak_memory_mib(device_type: str) -> float:
    """Peak allocated device memory on CUDA, peak resident set size of the process elsewhere."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / (2**20 if sys.platform == "darwin" else 2**10)


def keep_freed_memory_for_reuse() -> None:
    """On CPU, every step frees and re-allocates the same activation and logit buffers. By default glibc hands
    large freed blocks (above its mmap threshold) and a grown heap top (above its trim threshold) back to the
    kernel, so the next step page-faults them in again: thousands of faults and tens of ms per step for a tiny
    model. Keep them in the process instead. The resident size then stays at its peak, which the training
    loop reaches every step anyway. Nothing happens where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # no glibc (musl, ...): its allocator behaves differently anyway
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h parameter numbers
    mallopt(m_mmap_threshold, 32 * 2**20)  # the largest value glibc accepts for it
    mallopt(m_trim_threshold, 2**31 - 1)


class NonFiniteLossError(StageError, RuntimeError):
    """The training loss became NaN or infinite. A retry would hit it again: fix the config instead."""

    exit_code = ExitCode.DIVERGED

def gather_loader_state(state: dict, rt: Runtime) -> dict:
    """Every rank's loader state, for the meta file (rank 0 writes it)."""
    states = [state]
    if rt.world_size > 1:
        states = [None] * rt.world_size
        dist.all_gather_object(states, state)
    return {"world_size": rt.world_size, "ranks": states}


def mean_across_ranks(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / rt.world_size
    return value


def barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def gc_frozen_after_first_step():
    """Python's cyclic GC keeps rescanning the long-lived setup objects for nothing: after the first step,
    freeze them and collect by hand every 5000 steps instead. Restored on exit."""
    state = {"frozen": False}

    def after_step(step: int) -> None:
        if not state["frozen"]:
            gc.collect()
            gc.freeze()
            gc.disable()
            state["frozen"] = True
        elif step % 5000 == 0:
            gc.collect()

    try:
        yield after_step
    finally:
        if state["frozen"]:
            gc.enable()
            gc.unfreeze()
