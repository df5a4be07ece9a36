"""
What every training stage shares: the error for a diverged loss, memory and FLOPs accounting (and the
refusal of a run whose estimate does not fit), collectives over the ranks, the exclusive lock on an output
directory, and the CPU/GC settings of a long training loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout

from nanopipe.common import Runtime, atomic_write_json, get_dist_info, print0
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


class OverMemoryError(StageError, MemoryError):
    """The peak-memory estimate of a run exceeds the memory its device has available."""

    exit_code = ExitCode.BAD_INPUT


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory this process may use: free memory of its GPU on CUDA; on CPU the machine's available RAM shared
    by the processes of this node; None where it cannot be told (MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return available // max(1, local_procs)


def check_memory_fits(estimate_bytes: int, device: torch.device, lower: str, allow_over_memory: bool) -> None:
    """Refuse (OverMemoryError, exit 2) a run whose peak-memory estimate exceeds the available memory, before
    it allocates anything: otherwise it runs until the OOM killer ends it. `lower` names the flags to lower."""
    available = available_memory_bytes(device)
    if available is None or estimate_bytes <= available:
        return
    line = (f"estimated peak memory {estimate_bytes / 2**30:.2f} GiB per process exceeds the "
            f"{available / 2**30:.2f} GiB available on {device}")
    if allow_over_memory:
        print0(f"Warning: {line}; going ahead (--allow_over_memory)")
        return
    raise OverMemoryError(f"{line}: lower {lower}, or pass --allow_over_memory to run anyway "
                          f"(the estimate is a rough model)")


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


CPU_MATMUL_PRECISIONS = ("auto", "ieee", "bf16")


@contextlib.contextmanager
def cpu_matmul_precision(choice: str):
    """Set how float32 matmuls run on CPU for the duration; yields the precision used and why, for the log.

    'bf16' is torch's oneDNN fp32_precision setting: float32 GEMMs go through oneDNN with bf16 arithmetic
    allowed where the CPU has native bf16 instructions (AVX512-BF16, AMX). Measured on an AVX512-BF16 CPU
    (AMD Zen 4, one thread): 2.3x the GEMM throughput of the default path, with results as close to float64
    as plain float32's (relative error 3e-7 vs 2e-7 at 256 x 256). Muon's Newton-Schulz follows it into bf16
    (nanopipe.optim.orthogonalize). 'ieee' is torch's default. 'auto' picks bf16 where oneDNN reports bf16
    support. The previous setting comes back on exit (tests run several stages in one process)."""
    assert choice in CPU_MATMUL_PRECISIONS, f"cpu_matmul_precision must be one of {CPU_MATMUL_PRECISIONS}, got {choice!r}"
    supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if choice == "auto":
        choice, why = ("bf16", "auto: the CPU has native bf16") if supported else ("ieee", "auto: no native bf16")
    else:
        why = "--cpu_matmul_precision"
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if choice == "bf16" else "none"
    try:
        yield f"{choice} ({why})"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


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


def all_ranks_ok(ok: bool, rt: Runtime) -> bool:
    """True on every rank when `ok` is True on every rank (a collective under torchrun)."""
    if rt.world_size == 1:
        return ok
    flag = torch.tensor(int(ok), device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# -----------------------------------------------------------------------------
# One run per output directory

LOCK_NAME = ".nanopipe.lock"


class OutDirBusyError(StageError, RuntimeError):
    """Another run holds the output directory: two runs would overwrite each other's checkpoints."""

    exit_code = ExitCode.BAD_INPUT


@contextlib.contextmanager
def exclusive_out_dir(out_dir: str | os.PathLike, stage: str):
    """Hold an exclusive lock on out_dir for the whole run; a second run fails at once (OutDirBusyError) naming
    the holder instead of overwriting its checkpoints. Only global rank 0 takes it, before the process group
    exists: it is the one process every run has exactly once, and the others follow it or are torn down with it.
    The lock is an OS file lock, released when the process ends however it ends; `<lock>.holder` says who."""
    if get_dist_info()[1] != 0:
        yield
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path, holder_path = out_dir / LOCK_NAME, out_dir / (LOCK_NAME + ".holder")
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_path.read_text(encoding="utf-8"))
            who = f"{holder.get('stage')} pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
        except (OSError, ValueError):
            who = "a process that has not said who it is"
        raise OutDirBusyError(f"{out_dir} is in use by another run ({who}): wait for it to end or stop it, or "
                              f"give this run another --out_dir") from None
    try:
        atomic_write_json(holder_path, {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()


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
