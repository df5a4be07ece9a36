"""The hand-fused CPU kernels (nanopipe.fused_kernels) compute what the plain ops compute: values and gradients,
in float64 against autograd through the plain formulas, and a whole model's loss and gradients with and without
them."""

import pytest
import torch
import torch.nn.functional as F

import nanopipe.gpt as gpt
from nanopipe import fused_kernels
from nanopipe.gpt import GPT, build_model_config

f64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def test_rms_norm_rotary_mlp_and_projections_match_the_plain_ops():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, **f64, requires_grad=True)
    torch.testing.assert_close(fused_kernels.RMSNormFunction.apply(x), F.rms_norm(x, (8,)))
    assert torch.autograd.gradcheck(fused_kernels.RMSNormFunction.apply, (x,))

    cos, sin = (t.double() for t in gpt.rotary_tables(5, 8))
    xr = torch.randn(2, 5, 3, 8, **f64, requires_grad=True)
    rotated = fused_kernels.RotaryFunction.apply(xr, cos, sin)
    x1, x2 = xr[..., :4], xr[..., 4:]
    torch.testing.assert_close(rotated, torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1))
    assert rotated.transpose(1, 2).is_contiguous()  # laid out heads-major for attention
    assert torch.autograd.gradcheck(lambda t: fused_kernels.RotaryFunction.apply(t, cos, sin), (xr,))

    xm = torch.randn(5, 6, **f64, requires_grad=True)
    w_fc, w_proj = torch.randn(12, 6, **f64, requires_grad=True), torch.randn(6, 12, **f64, requires_grad=True)
    torch.testing.assert_close(fused_kernels.MLPFunction.apply(xm, w_fc, w_proj), F.relu(xm @ w_fc.T).square() @ w_proj.T)
    assert torch.autograd.gradcheck(fused_kernels.MLPFunction.apply, (xm, w_fc, w_proj))

    ws = [torch.randn(d, 6, **f64, requires_grad=True) for d in (6, 3, 3)]
    outs = fused_kernels.SharedInputLinearsFunction.apply(xm, *ws)
    for out, w in zip(outs, ws):
        torch.testing.assert_close(out, xm @ w.T)
    assert torch.autograd.gradcheck(lambda a, *b: fused_kernels.SharedInputLinearsFunction.apply(a, *b), (xm, *ws))


def test_small_causal_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 20, 8, **f64, requires_grad=True) for _ in range(3))
    out = fused_kernels.SmallCausalAttentionFunction.apply(q, k, v)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, reference)
    g = torch.randn_like(out)
    torch.testing.assert_close(grads(out, (q, k, v), g), grads(reference, (q, k, v), g))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lm_head_soft_capped_cross_entropy_matches_the_plain_ops(reduction):
    torch.manual_seed(0)
    x = torch.randn(9, 5, **f64, requires_grad=True)
    weight = (torch.randn(11, 5, **f64) * 4).requires_grad_()  # logits well into the cap's bend
    targets = torch.randint(0, 11, (9,))
    targets[[2, 5]] = -1
    out = fused_kernels.LinearSoftcapCrossEntropyFunction.apply(x, weight, targets, 15.0, reduction)
    reference = F.cross_entropy(15 * torch.tanh(x @ weight.T / 15), targets, ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(out, reference)
    g = torch.randn_like(reference)
    torch.testing.assert_close(grads(out, (x, weight), g), grads(reference, (x, weight), g))
    # its backward reuses the forward's buffers, so a second backward through the same graph is refused
    out = fused_kernels.LinearSoftcapCrossEntropyFunction.apply(x, weight, targets, 15.0, reduction)
    torch.autograd.grad(out, x, g, retain_graph=True)
    with pytest.raises(AssertionError, match="backward runs once"):
        torch.autograd.grad(out, x, g)


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_model_loss_and_gradients_are_the_same_with_and_without_the_fused_kernels(n_kv_head, monkeypatch):
    torch.manual_seed(0)
    config = build_model_config(depth=2, aspect_ratio=64, head_dim=32, max_seq_len=64, vocab_size=500,
                                n_kv_head=n_kv_head)  # vocab padded to 512: the padding rows stay unscored
    model = GPT.create(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised projections would hide most of the network
            p.normal_(0.0, 0.5)
    idx, targets = torch.randint(0, 500, (3, 64)), torch.randint(0, 500, (3, 64))
    targets[0, :7] = -1

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        per_token = model(idx, targets, loss_reduction="none").detach()
        return loss.detach(), per_token, {n: p.grad.clone() for n, p in model.named_parameters()}

    fused = loss_and_grads()
    monkeypatch.setattr(gpt, "use_fused_cpu_kernels", lambda x: False)
    plain = loss_and_grads()
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-4, atol=1e-4)
    for name, grad in plain[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert fused[2]["lm_head.weight"][500:].abs().max() == 0


def test_fused_kernels_are_only_for_eager_float32_cpu():
    x = torch.zeros(2, 2)
    assert gpt.use_fused_cpu_kernels(x)
    assert not gpt.use_fused_cpu_kernels(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gpt.use_fused_cpu_kernels(x)


def test_bf16_cpu_matmuls_give_the_float32_loss_and_gradients_closely():
    """--cpu_matmul_precision=bf16 (oneDNN with bf16 arithmetic allowed) trains the same model: the loss and
    gradients of a random model stay close to the exact float32 ones."""
    from nanopipe.training import cpu_matmul_precision
    torch.manual_seed(0)
    model = GPT.create(build_model_config(depth=2, aspect_ratio=64, head_dim=32, max_seq_len=64, vocab_size=512),
                       "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    idx, targets = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))

    def loss_and_grads(precision):
        model.zero_grad(set_to_none=True)
        with cpu_matmul_precision(precision):
            loss = model(idx, targets)
            loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (exact_loss, exact), (fast_loss, fast) = loss_and_grads("ieee"), loss_and_grads("bf16")
    torch.testing.assert_close(fast_loss, exact_loss, rtol=1e-3, atol=0.0)
    assert torch.nn.functional.cosine_similarity(fast, exact, dim=0) > 0.999
