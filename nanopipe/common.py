"""
Runtime helpers shared by every stage: base directory, device autodetection, DDP from torchrun's
environment, rank-0 logging, seeding, atomic writes, optional wandb.

torch is imported inside the functions that need it, so light commands (`nanopipe data ...`, `--help`)
start without paying for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nanopipe.events import METRICS_FILE, PROGRESS_PREFIX, parse_progress, report_progress  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("nanopipe")


# -----------------------------------------------------------------------------
# Base directory

def base_dir_path() -> Path:
    """NANOPIPE_HOME, default $XDG_CACHE_HOME/nanopipe (~/.cache/nanopipe), without creating it."""
    env = os.environ.get("NANOPIPE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nanopipe"


def get_base_dir() -> Path:
    """NANOPIPE_HOME (created if missing): data shards, tokenizers, checkpoints, artifacts."""
    base = base_dir_path()
    base.mkdir(parents=True, exist_ok=True)
    return base


# -----------------------------------------------------------------------------
# Distributed runtime

def is_ddp_requested() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device_type: str) -> torch.dtype:
    """'' means bfloat16 where the hardware does it fast (CUDA with bf16 support), else float32."""
    import torch
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return torch.float32
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    device_type: str
    dtype: torch.dtype

    @property
    def master(self) -> bool:
        return self.rank == 0


def compute_init(device_type: str = "", dtype: str = "", seed: int = 42) -> Runtime:
    """Pick the device, join the process group if launched by torchrun, seed everything."""
    import torch
    import torch.distributed as dist
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device_type=cuda but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device_type=mps but MPS is not available on this machine")
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is imported.
        # Imported after init_process_group (torch._dynamo imports it, and the first op on a meta tensor
        # imports torch._dynamo, e.g. GPT construction), those defaults keep the default group alive past
        # destroy_process_group: its gloo threads then outlive the interpreter, and one releasing a finished
        # collective during interpreter shutdown aborts the process ("terminate called without an active
        # exception"). Imported first, the defaults are None.
        with contextlib.suppress(ImportError):
            import torch.distributed.nn.functional  # noqa: F401
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    seed_everything(seed)
    return Runtime(ddp, rank, local_rank, world_size, device, device_type, resolve_dtype(dtype, device_type))


_CLEANUP_HOOKS: list[Callable[[], None]] = []


def on_cleanup(hook: Callable[[], None]) -> Callable[[], None]:
    """Register a function that stops background work (e.g. data loader threads); compute_cleanup calls
    every hook, on success and on error, before it destroys the process group."""
    if hook not in _CLEANUP_HOOKS:
        _CLEANUP_HOOKS.append(hook)
    return hook


def compute_cleanup() -> None:
    """End this process's part of the run; call it in a `finally`, it serves the success and the error path.

    First the on_cleanup hooks stop and join background threads, then, under torchrun, the process group is
    destroyed, so that its threads are joined before the interpreter shuts down. No barrier first: a rank that
    failed must not wait for peers that may never come, nor make peers that finished fail in a barrier; a
    peer still waiting in a collective sees the failed rank leave and raises."""
    for hook in list(_CLEANUP_HOOKS):
        try:
            hook()
        except Exception:  # noqa: BLE001 - the process group must still be destroyed
            logger.exception("cleanup hook %r failed", hook)
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.group.WORLD
    dist.destroy_process_group()
    # The group's threads are joined only when the last reference to it goes (normally `group`, here); a
    # reference left elsewhere lets them run into interpreter shutdown, which can abort the process (see
    # compute_init).
    leaked = group is not None and sys.getrefcount(group) > 2  # `group` and getrefcount's argument
    del group
    if leaked:
        logger.warning("the default process group is still referenced after destroy_process_group(): its "
                       "threads may abort the process at exit")


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, flushed so that a parent streaming our stdout sees it at once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# Atomic writes: write beside the target, fsync, rename. A crash leaves the old file or none.

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, target: str | os.PathLike) -> None:
    import torch
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name, then rename it into place as a whole.

    If `target` exists and overwrite is False, FileExistsError is raised before anything is written.
    With overwrite, the old directory is swapped out and removed only after the new one is in place.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (refusing to overwrite it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the directory owner-only; the finished one gets the usual umask-derived mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------
# Optional wandb

class DummyWandb:
    """Stands in for a wandb run when wandb is disabled or not installed."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def init_wandb(run: str, project: str, config: dict, master: bool):
    if run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        print0(f"wandb is not installed: run '{run}' is not logged (pip install 'nanopipe[wandb]')")
        return DummyWandb()
    return wandb.init(project=project, name=run, config=config)


# -----------------------------------------------------------------------------
# What the flow reads of a stage: its records (nanopipe/events.py) and, last, metrics.json

def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> None:
    """Every stage ends by writing metrics.json into its output directory (rank 0, atomically)."""
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_json(Path(out_dir) / METRICS_FILE, metrics)
