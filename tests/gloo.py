"""Joining a gloo process group from a test's spawned worker, as compute_init does for a stage."""

from __future__ import annotations

import datetime


def init_gloo(rank: int, world: int, init_method: str, timeout_s: float = 60) -> None:
    """One intra-op thread, then the process group. torch.distributed.nn.functional is imported first, as
    compute_init does: imported after init_process_group (building a GPT imports it, through torch._dynamo), its
    default arguments keep the destroyed group alive, and its gloo threads can abort the worker at exit
    (SIGABRT)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional  # noqa: F401
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
