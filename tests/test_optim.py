"""Muon, the schedules, and the distributed optimizers (2 processes on gloo) against one process."""

import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanopipe.optim as optim
from nanopipe.gpt import GPT, GPTConfig
from nanopipe.optim import (DistAdamW, DistMuon, Muon, aspect_scale, batch_lr_scale, lr_multiplier, muon_momentum,
                            newton_schulz)
from tests.gloo import init_gloo


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# Newton-Schulz and Muon

@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (256, 32), (4, 48, 96)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 3.0
    X = newton_schulz(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32  # float32 on CPU
    s = torch.linalg.svdvals(X)
    # nanochat's quintic does not converge to exactly 1: singular values land in a band around it
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())


def test_newton_schulz_equalises_an_ill_conditioned_matrix():
    torch.manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(64, 64))
    V, _ = torch.linalg.qr(torch.randn(48, 48))
    S = torch.logspace(0, -2, 48)  # condition number 100
    G = U[:, :48] @ torch.diag(S) @ V.T
    s = torch.linalg.svdvals(newton_schulz(G, steps=5))
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # the directions are kept: X is close to the polar factor U V^T
    polar = U[:, :48] @ V.T
    cos = (newton_schulz(G, 5) * polar).sum() / (newton_schulz(G, 5).norm() * polar.norm())
    assert cos > 0.97


def test_muon_first_step_is_the_orthogonalised_gradient_with_aspect_scaling():
    torch.manual_seed(0)
    wide, tall = torch.nn.Parameter(torch.randn(32, 64)), torch.nn.Parameter(torch.randn(128, 32))
    w0, t0 = wide.detach().clone(), tall.detach().clone()
    wide.grad, tall.grad = torch.randn(32, 64), torch.randn(128, 32)
    g_wide, g_tall = wide.grad.clone(), tall.grad.clone()
    opt = Muon([wide, tall], lr=0.05, momentum=0.9)
    opt.step()
    # momentum from zero, Nesterov: the direction is a positive multiple of g, and NS ignores the scale
    torch.testing.assert_close(wide.detach(), w0 - 0.05 * newton_schulz(g_wide), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tall.detach(), t0 - 0.05 * 2.0 * newton_schulz(g_tall), atol=1e-5, rtol=1e-5)
    assert aspect_scale(tall.shape) == 2.0 and aspect_scale(wide.shape) == 1.0


def test_muon_momentum_accumulates_and_follows_the_group_setting():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 24))
    g1, g2 = torch.randn(16, 24), torch.randn(16, 24)
    opt = Muon([p], lr=0.1, momentum=0.9)
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = 0.9 * (0.1 * g1) + 0.1 * g2  # EMA of the gradients
    expected = before - 0.1 * newton_schulz((0.1 * g2 + 0.9 * buf))  # Nesterov look-ahead
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)
    opt.param_groups[0]["momentum"] = 0.0  # the training loop sets it; with 0 the history is ignored
    before = p.detach().clone()
    p.grad = g1.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1 * newton_schulz(g1), atol=1e-5, rtol=1e-5)


def test_muon_state_dict_resumes_exactly():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 32)) for _ in range(3)]
    grads = [[torch.randn(16, 32) for _ in params] for _ in range(4)]

    def run(opt, ps, steps):
        for step in steps:
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()

    straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run(Muon(straight, lr=0.03), straight, range(4))
    first = Muon(params, lr=0.03)
    run(first, params, range(2))
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = Muon(resumed, lr=0.03)
    second.load_state_dict(first.state_dict())
    run(second, resumed, range(2, 4))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_muon_rejects_vectors():
    with pytest.raises(AssertionError, match="2D"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def test_schedules():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(5000) == pytest.approx(0.95)
    # 100 steps, warmdown 40%: constant through step 60, then linear to final_lr_frac at step 100
    assert [lr_multiplier(s, 100) for s in (0, 60)] == [1.0, 1.0]
    assert lr_multiplier(80, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, 100) == 0.0
    assert lr_multiplier(100, 100, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, warmup_ratio=0.1) == pytest.approx(1.0)
    assert batch_lr_scale(2**19) == 1.0 and batch_lr_scale(2**17) == pytest.approx(0.5)


# -----------------------------------------------------------------------------
# Distributed optimizers: 2 processes on gloo (loopback) against one process on the averaged gradients

WORLD = 2
STEPS = 3
# n_layer=3 gives 3 matrices of each MLP shape, so Muon's round-robin over 2 ranks has a ragged chunk
DIST_CONFIG = dict(sequence_len=32, vocab_size=200, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    data = torch.randint(0, DIST_CONFIG["vocab_size"], (2, 17), generator=g)
    return data[:, :-1], data[:, 1:]


def _extra_params() -> list[torch.nn.Parameter]:
    """Shapes the model lacks: rows not divisible by the world size (DistAdamW's replicated path)."""
    g = torch.Generator().manual_seed(5)
    return [torch.nn.Parameter(torch.randn(3, 5, generator=g)), torch.nn.Parameter(torch.randn(6, 4, generator=g))]


def _extra_grad(p: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + 10 * step + rank + p.numel())
    return torch.randn(p.shape, generator=g)


def _set_schedule(optimizers, step: int) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1.0 - 0.2 * step)
            if "momentum" in group:
                group["momentum"] = muon_momentum(step * 100)


def _train(model, optimizers, extra, extra_opt, grads_for_step) -> None:
    for step in range(STEPS):
        grads_for_step(step)
        _set_schedule(optimizers + [extra_opt], step)
        for opt in optimizers + [extra_opt]:
            opt.step()
        model.zero_grad(set_to_none=True)
        for p in extra:
            p.grad = None


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, WORLD, f"tcp://127.0.0.1:{port}")
    try:
        # the gloo route (all_reduce + slice), then the reduce_scatter route NCCL takes, forced onto gloo
        for route, backends in (("fallback", {"nccl"}), ("native", {"nccl", "gloo"})):
            optim.NATIVE_REDUCE_SCATTER_BACKENDS = backends
            torch.manual_seed(0)
            model = GPT.create(GPTConfig(**DIST_CONFIG), "cpu")
            optimizers = model.setup_optimizers(unembedding_lr=0.01, embedding_lr=0.2, matrix_lr=0.02,
                                                weight_decay=0.1)
            assert [type(o) for o in optimizers] == [DistAdamW, DistMuon]
            extra = _extra_params()
            extra_opt = DistAdamW([dict(params=extra, lr=0.01)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
            for group in extra_opt.param_groups:
                group["initial_lr"] = group["lr"]

            def local_grads(step):
                x, y = _batch(step, rank)
                model(x, y).backward()
                for p in extra:
                    p.grad = _extra_grad(p, step, rank)

            _train(model, optimizers, extra, extra_opt, local_grads)
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
            state.update({f"extra{i}": p.detach().clone() for i, p in enumerate(extra)})
            torch.save(state, f"{out_dir}/{route}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference_state() -> dict[str, torch.Tensor]:
    """One process, the plain optimizers, stepping on the mean of the two ranks' gradients."""
    torch.manual_seed(0)
    model = GPT.create(GPTConfig(**DIST_CONFIG), "cpu")
    optimizers = model.setup_optimizers(unembedding_lr=0.01, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, Muon]
    extra = _extra_params()
    extra_opt = torch.optim.AdamW([dict(params=extra, lr=0.01)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for group in extra_opt.param_groups:
        group["initial_lr"] = group["lr"]

    def mean_grads(step):
        per_rank = []
        for rank in range(WORLD):
            model.zero_grad(set_to_none=True)
            x, y = _batch(step, rank)
            model(x, y).backward()
            per_rank.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *per_rank):
            p.grad = (g0 + g1) / WORLD
        for p in extra:
            p.grad = (_extra_grad(p, step, 0) + _extra_grad(p, step, 1)) / WORLD

    _train(model, optimizers, extra, extra_opt, mean_grads)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"extra{i}": p.detach().clone() for i, p in enumerate(extra)})
    return state


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args, nprocs: int, timeout_s: float) -> None:
    # fork where it is safe (no other Python threads that could hold a lock): the children start with torch
    # already imported, seconds saved on a busy CPU; otherwise spawn fresh interpreters
    forkable = "fork" in mp.get_all_start_methods() and threading.active_count() == 1
    method = "fork" if forkable else "spawn"
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")


def test_distributed_optimizers_match_one_process_on_mean_gradients(tmp_path):
    _spawn(_dist_worker, (_free_port(), str(tmp_path)), nprocs=WORLD, timeout_s=120)
    reference = _reference_state()
    torch.manual_seed(0)
    start = {n: p.detach() for n, p in GPT.create(GPTConfig(**DIST_CONFIG), "cpu").named_parameters()}
    for route in ("fallback", "native"):
        ranks = [torch.load(tmp_path / f"{route}_rank{r}.pt") for r in range(WORLD)]
        assert ranks[0].keys() == reference.keys()
        for name, expected in reference.items():
            for r, state in enumerate(ranks):
                torch.testing.assert_close(state[name], expected, atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"{route} rank {r} {name}: {m}")
        moved = [n for n in start if not torch.allclose(reference[n], start[n])]
        assert len(moved) > len(start) // 2  # the comparison is not between untouched weights


def test_orthogonalize_runs_in_bf16_on_cpu_when_the_run_allows_bf16_matmuls():
    from nanopipe.training import cpu_matmul_precision
    torch.manual_seed(0)
    G = torch.randn(3, 64, 128) * 3.0
    with cpu_matmul_precision("ieee"):
        exact = optim.orthogonalize(G, 5)
    with cpu_matmul_precision("bf16"):
        fast = optim.orthogonalize(G, 5)
    assert exact.dtype == torch.float32 and fast.dtype == torch.bfloat16
    s = torch.linalg.svdvals(fast.float())
    assert s.min() > 0.6 and s.max() < 1.3, (s.min().item(), s.max().item())
    cos = (fast.float() * exact).sum() / (fast.float().norm() * exact.norm())
    assert cos > 0.99, cos.item()  # the same directions as the float32 iteration
