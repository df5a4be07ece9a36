"""
Optimizers: Muon for the transformer's matrices, and distributed forms of Muon and AdamW that average
gradients across ranks themselves and shard the optimizer work (ZeRO-2 style), plus the schedules
nanochat uses around them.

Muon (https://kellerjordan.github.io/posts/muon/): SGD with Nesterov momentum whose update matrix is
replaced by an approximately orthogonal one (a few Newton-Schulz iterations), scaled by
sqrt(max(1, rows / cols)).

Distributed forms, when torch.distributed is initialised with world_size > 1:
- DistAdamW: each parameter's gradient is reduce-scattered along dim 0, every rank updates its slice
  (and keeps optimizer state for that slice only), then the slices are all-gathered.
- DistMuon: parameters of one shape are dealt round-robin to ranks; the owner receives the averaged
  gradient, keeps the momentum, orthogonalises and updates; the new weights are all-gathered.
On NCCL the gradients travel with reduce_scatter (op AVG). On gloo, reduce_scatter is at best an
all_reduce per rank underneath (and is missing in older torch, as is ReduceOp.AVG), so gloo uses
all_reduce(SUM), divides by the world size and keeps its own slice: the arithmetic, the sharding and the
checkpointed state are the same on both backends, and equal to one process stepping on the mean gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from nanopipe.configs.base import REFERENCE_BATCH_TOKENS

# Quintic Newton-Schulz coefficients (Keller Jordan's): chosen for a steep slope at zero rather than exact
# convergence, so singular values land roughly in [0.7, 1.2] after 5 steps instead of exactly at 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Backends whose reduce_scatter is used directly; others (gloo) take the all_reduce route.
NATIVE_REDUCE_SCATTER_BACKENDS = {"nccl"}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -----------------------------------------------------------------------------
# Schedules (the training loop applies them to param_group['lr'] / ['momentum'] every step)

def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum warms up linearly from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.4,
                  final_lr_frac: float = 0.0) -> float:
    """Linear warm-up over warmup_ratio of the run, constant, then linear decay over the last
    warmdown_ratio of the run down to final_lr_frac at step == num_iterations."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1.0 - progress) * final_lr_frac


def batch_lr_scale(total_batch_tokens: int, reference_batch_tokens: int = REFERENCE_BATCH_TOKENS) -> float:
    """Learning rates were tuned at a batch of REFERENCE_BATCH_TOKENS (2^19); other batches scale them by
    sqrt(B / B_ref)."""
    return math.sqrt(total_batch_tokens / reference_batch_tokens)


# -----------------------------------------------------------------------------
# Newton-Schulz orthogonalisation

def newton_schulz(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise the last two dims of G (batched): returns ~U V^T for G = U S V^T,
    with singular values near 1 rather than exactly 1. Runs in bf16 on CUDA and for a bf16 G, float32 otherwise
    (the iteration is built to be stable in bf16: https://kellerjordan.github.io/posts/muon/)."""
    assert G.ndim >= 2, f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}"
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda or G.dtype == torch.bfloat16 else G.float()
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # (n, rows, cols): baddbmm wants exactly one batch dim
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm, so ||X||_2 <= 1
    for _ in range(steps):
        # X <- a X + (b A + c A^2) X with A = X X^T: both sums are done by the GEMMs themselves
        # (beta * input + alpha * product) instead of separate scaling and addition passes
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X.reshape(*batch_shape, *X.shape[-2:])


_compiled_newton_schulz = None


def cpu_bf16_matmuls() -> bool:
    """True when the run let float32 matmuls on CPU use bf16 (nanopipe.training.cpu_matmul_precision)."""
    return torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def orthogonalize(G: Tensor, steps: int) -> Tensor:
    """newton_schulz, compiled and in bf16 on CUDA (eager elsewhere: compiling costs more than it saves on CPU).
    On CPU it runs in bf16 where the run allowed bf16 matmuls (a CPU with native bf16), as on CUDA: 2.2x
    faster than float32 there (d4's matrices on AMD Zen 4: 54 vs 121 ms per step). The result is then bf16;
    Muon casts it to the parameters' dtype as it applies it."""
    global _compiled_newton_schulz
    if not G.is_cuda:
        return newton_schulz(G.bfloat16() if cpu_bf16_matmuls() else G, steps)
    if _compiled_newton_schulz is None:
        _compiled_newton_schulz = torch.compile(newton_schulz)
    return _compiled_newton_schulz(G, steps)


def aspect_scale(shape: torch.Size) -> float:
    """Tall matrices get a larger step: sqrt(max(1, rows / cols))."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


# -----------------------------------------------------------------------------
# Muon

class Muon(torch.optim.Optimizer):
    """Muon for 2D parameters. Parameters are grouped by shape (sorted, so every rank and every run
    builds the same groups) and each group is orthogonalised as one batch.

    Group keys: lr, momentum (the training loop warms it up, see muon_momentum), nesterov, ns_steps.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        assert params, "Muon got no parameters"
        bad = [tuple(p.shape) for p in params if p.ndim != 2]
        assert not bad, f"Muon only takes 2D parameters (use AdamW for the others), got shapes {bad}"
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == shape]) for shape in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    def _updates(self, params: list[Tensor], group: dict) -> Tensor:
        """Momentum step for `params` (their .grad already averaged) and their orthogonalised updates,
        stacked (n, rows, cols)."""
        momentum = group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)  # buf = momentum * buf + (1 - momentum) * g
        directions = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        return orthogonalize(torch.stack(directions), group["ns_steps"])

    @staticmethod
    def _apply(params: list[Tensor], updates: Tensor, group: dict) -> None:
        step = -group["lr"] * aspect_scale(params[0].shape)
        # one multi-tensor kernel for the group (not one launch per parameter on CUDA)
        torch._foreach_add_(params, list(updates.to(params[0].dtype).unbind(0)), alpha=step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._apply(params, self._updates(params, group), group)
        return loss


class DistMuon(Muon):
    """Muon across ranks: within each shape group, parameter i is owned by rank i % world_size. Every
    parameter must have a gradient on every rank (the collectives are matched across ranks).
    Momentum buffers live on the owner only: save the optimizer state per rank."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = dist.get_rank(), dist.get_world_size()
        native = dist.get_backend() in NATIVE_REDUCE_SCATTER_BACKENDS
        for group in self.param_groups:
            missing = [tuple(p.shape) for p in group["params"] if p.grad is None]
            assert not missing, f"DistMuon: parameters without a gradient (shapes {missing}); all ranks need all grads"
        # 1) launch every gradient reduction, so that communication overlaps the compute below
        reductions = [self._reduce_group(group["params"], rank, world, native) for group in self.param_groups]
        # 2) per group: finish the reductions, update the owned parameters, launch their all-gathers
        gathers = []
        for group, works in zip(self.param_groups, reductions):
            for work in works:
                work.wait()
            params = group["params"]
            if not native:
                torch._foreach_div_([p.grad for p in params], world)  # the all_reduce summed
            owned = params[rank::world]
            if owned:
                self._apply(owned, self._updates(owned, group), group)
            gathers += self._gather_group(params, rank, world, native)
        for work in gathers:
            work.wait()
        return loss

    @staticmethod
    def _reduce_group(params: list[Tensor], rank: int, world: int, native: bool) -> list:
        """Average each parameter's gradient into its owner's .grad (the owner of params[i] is i % world)."""
        if not native:
            return [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in params]
        works = []
        for base in range(0, len(params), world):
            chunk = [p.grad for p in params[base:base + world]]
            pad = [torch.zeros_like(chunk[0]) for _ in range(world - len(chunk))]
            out = chunk[rank] if rank < len(chunk) else torch.empty_like(chunk[0])
            works.append(dist.reduce_scatter(out, chunk + pad, op=dist.ReduceOp.AVG, async_op=True))
        return works

    @staticmethod
    def _gather_group(params: list[Tensor], rank: int, world: int, native: bool) -> list:
        """Copy every owner's updated parameter to all ranks."""
        works = []
        for base in range(0, len(params), world):
            chunk = [p.data for p in params[base:base + world]]
            mine = chunk[rank] if rank < len(chunk) else torch.zeros_like(chunk[0])
            outputs = chunk + [torch.empty_like(chunk[0]) for _ in range(world - len(chunk))]
            # the input is also one of the outputs; NCCL handles that in place, gloo gets a copy
            works.append(dist.all_gather(outputs, mine if native else mine.clone(), async_op=True))
        return works


# -----------------------------------------------------------------------------
# Distributed AdamW

def adamw_update(p: Tensor, grad: Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
    """One decoupled-weight-decay Adam step on p (a parameter or a slice of one), same arithmetic as
    torch.optim.AdamW."""
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1, bias2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias1)


class DistAdamW(torch.optim.Optimizer):
    """AdamW across ranks with sharded state (ZeRO-2 style): rank r owns rows [r*n, (r+1)*n) of each
    parameter, n = rows / world_size. A parameter whose first dim does not divide by the world size is
    all-reduced and updated whole on every rank (state replicated). Every parameter needs a gradient."""

    def __init__(self, param_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = dist.get_rank(), dist.get_world_size()
        native = dist.get_backend() in NATIVE_REDUCE_SCATTER_BACKENDS
        # 1) launch every gradient reduction
        jobs = []
        for group in self.param_groups:
            for p in group["params"]:
                assert p.grad is not None, f"DistAdamW: a parameter of shape {tuple(p.shape)} has no gradient"
                jobs.append((group, p, *self._reduce(p, rank, world, native)))
        # 2) as each lands: update this rank's rows, launch their all-gather
        gathers = []
        for group, p, work, grad, rows, summed in jobs:
            work.wait()
            if summed:
                grad.div_(world)
            p_part = p.data if rows is None else p.data[rows]
            adamw_update(p_part, grad, self.state[p], group["lr"], group["betas"], group["eps"],
                         group["weight_decay"])
            if rows is not None:
                gathers.append(self._gather(p, p_part, world, native))
        for work in gathers:
            work.wait()
        return loss

    @staticmethod
    def _reduce(p: Tensor, rank: int, world: int, native: bool):
        """-> (work, this rank's gradient rows once work is done, rows slice or None, needs / world)."""
        g = p.grad
        if g.size(0) % world != 0:
            return dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True), g, None, True
        n = g.size(0) // world
        rows = slice(rank * n, (rank + 1) * n)
        if native:
            g_rows = torch.empty_like(g[rows])
            return _reduce_scatter_tensor(g_rows, g), g_rows, rows, False
        return dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True), g[rows], rows, True

    @staticmethod
    def _gather(p: Tensor, p_rows: Tensor, world: int, native: bool):
        if native:
            return _all_gather_tensor(p.data, p_rows)
        return dist.all_gather(list(p.data.chunk(world)), p_rows.clone(), async_op=True)


def _reduce_scatter_tensor(output: Tensor, input: Tensor):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in newer torch
    return fn(output, input, op=dist.ReduceOp.AVG, async_op=True)


def _all_gather_tensor(output: Tensor, input: Tensor):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, async_op=True)
