"""
Hand-fused CPU kernels of the GPT (nanopipe/gpt.py): the same arithmetic as its plain ops, with fewer passes
over memory, fewer temporaries and one autograd node each. A CPU step of a small model is dominated by such
overheads once the matmuls run at full speed. Each backward runs once (no retain_graph double backward).

gpt.py calls them only where use_fused_cpu_kernels() says so (float32 CPU tensors, eager, no autocast);
tests/test_fused_kernels.py checks each against the plain ops and with gradcheck.
"""

import torch


class RMSNormFunction(torch.autograd.Function):
    """y = x * r, r = rsqrt(mean(x^2) + eps) with F.rms_norm's default eps; dx = r * (g - y * mean(g * y))."""

    @staticmethod
    def forward(ctx, x):
        eps = torch.finfo(x.dtype).eps
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, g):
        y, r = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, y, dim=-1).unsqueeze_(-1)
        return torch.addcmul(g, y, dot, value=-1.0 / y.size(-1)).mul_(r)


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float,
                   heads_major: bool = False) -> torch.Tensor:
    """[x1 cos + s x2 sin, x2 cos - s x1 sin] for sign s, written straight into one output (no cat).
    x: (B, T, H, D). With heads_major the output is a (B, T, H, D) view of (B, H, T, D) memory, the layout
    attention wants, so that the later transpose costs no copy."""
    half = x.size(-1) // 2
    if heads_major:
        B, T, H, D = x.shape
        out = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device).transpose(1, 2)
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=-sign)
    return out


class RotaryFunction(torch.autograd.Function):
    """The rotation is orthogonal, so its backward is the inverse rotation: the same with -sin. The output is
    laid out heads-major (see _rotate_halves; the QK-norm after it keeps that layout), the gradient
    token-major like the projection that produced x."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_halves(x, cos, sin, 1.0, heads_major=x.ndim == 4)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate_halves(g, cos, sin, -1.0), None, None


class SmallCausalAttentionFunction(torch.autograd.Function):
    """Causal softmax attention for short contexts, with the (T, T) scores materialised: a handful of
    batched GEMMs over all heads at once, which on CPU beats the flash kernel's many small blocks while T is
    small (the scores of all heads then take B * H * T^2 floats). q, k, v: (N, T, D) for N = batch * heads.

        forward:  S = mask + scale q k^T (one GEMM, mask -inf above the diagonal), P = softmax(S), O = P v
        backward: dV = P^T dO, dS = softmax'(P, dO v^T), dQ = scale dS k, dK = scale dS^T q
    """

    @staticmethod
    def forward(ctx, q, k, v):
        T, scale = q.size(1), q.size(2) ** -0.5
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        p = torch.baddbmm(mask, q, k.mT, alpha=scale).softmax(dim=-1)
        ctx.save_for_backward(q, k, v, p)
        return torch.bmm(p, v)

    @staticmethod
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        scale = q.size(2) ** -0.5
        dv = torch.bmm(p.mT, do)
        dp = torch.bmm(do, v.mT)
        ds = dp.sub_(torch.linalg.vecdot(dp, p, dim=-1).unsqueeze_(-1)).mul_(p)  # P * (dP - rowsum(dP * P))
        dq = torch.baddbmm(q.new_zeros(()), ds, k, beta=0.0, alpha=scale)
        dk = torch.baddbmm(q.new_zeros(()), ds.mT, q, beta=0.0, alpha=scale)
        return dq, dk, dv


class SharedInputLinearsFunction(torch.autograd.Function):
    """Several linear maps of one input, (x W_1^T, x W_2^T, ...), x: (N, C). The backward accumulates the input's
    gradient through the GEMMs themselves (beta = 1) instead of allocating one term per map and summing."""

    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return tuple(torch.mm(x, w.t()) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grads, weights):
                dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)
        dws = [g.t() @ x if needed else None for g, needed in zip(grads, ctx.needs_input_grad[1:])]
        return (dx, *dws)


class MLPFunction(torch.autograd.Function):
    """The whole MLP, y = relu(x W_fc^T)^2 W_proj^T, as one function: the ReLU runs in place on the first GEMM's
    output, the backward multiplies in place into the GEMM output it owns, and the factor 2 of d(r^2)/dr
    rides on the last two GEMMs (alpha = 2) instead of costing a pass. x: (N, C)."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        r = torch.mm(x, w_fc.t()).relu_()
        h = r * r
        ctx.save_for_backward(x, w_fc, w_proj, r, h)
        return torch.mm(h, w_proj.t())

    @staticmethod
    def backward(ctx, g):
        x, w_fc, w_proj, r, h = ctx.saved_tensors
        dw_proj = g.t() @ h if ctx.needs_input_grad[2] else None
        dr_half = torch.mm(g, w_proj).mul_(r)  # dL/dh * r; dL/d(pre-ReLU) is twice this (0 where r = 0)
        zero = x.new_zeros(())
        dx = torch.addmm(zero, dr_half, w_fc, beta=0.0, alpha=2.0) if ctx.needs_input_grad[0] else None
        dw_fc = torch.addmm(zero, dr_half.t(), x, beta=0.0, alpha=2.0) if ctx.needs_input_grad[1] else None
        return dx, dw_fc, dw_proj


class LinearSoftcapCrossEntropyFunction(torch.autograd.Function):
    """The LM head and the cross-entropy of its soft-capped logits cap * tanh(z / cap), z = x W^T, rewritten
    around q = sigmoid(-2z / cap) (so tanh(z / cap) = 1 - 2q):

        capped logit - cap = -2 cap q, in [-2 cap, 0]: exp never overflows, no max pass is needed
        loss = log(sum_v exp(-2 cap q_v)) + 2 cap q_target
        d loss / dz = (softmax - onehot) * (1 - tanh^2) = (softmax - onehot) * 4 q (1 - q)

    The projection is inside so that its GEMM writes -2z / cap straight into a buffer this function owns.
    Forward keeps two (N, V) buffers (q and the exponentials) and the backward reuses them in place, where
    the plain ops would allocate and traverse about a dozen."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap: float, reduction: str):
        q = torch.addmm(x.new_zeros(()), x, weight.t(), beta=0.0, alpha=-2.0 / cap).sigmoid_()
        e = torch.mul(q, -2.0 * cap).exp_()
        sum_e = e.sum(dim=-1)
        valid = targets != -1
        safe_targets = torch.where(valid, targets, 0).unsqueeze_(1)
        losses = q.gather(1, safe_targets).squeeze_(1).mul_(2.0 * cap).add_(sum_e.log()).mul_(valid)
        ctx.save_for_backward(x, weight, q, e, sum_e, valid, safe_targets)
        ctx.reduction, ctx.used = reduction, False
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / valid.sum() if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        assert not ctx.used, "LinearSoftcapCrossEntropyFunction reuses its buffers: backward runs once (no retain_graph)"
        ctx.used = True
        x, weight, q, e, sum_e, valid, safe_targets = ctx.saved_tensors
        row_grad = grad * valid  # (N,): the incoming gradient of each row's loss, 0 where ignored
        if ctx.reduction == "mean":
            row_grad = row_grad / valid.sum()
        row_grad = row_grad.mul_(4.0)  # the 4 of 4 q (1 - q)
        dz = e.mul_((row_grad / sum_e).unsqueeze_(1))  # 4 g softmax
        dz.scatter_add_(1, safe_targets, row_grad.neg().unsqueeze_(1))  # 4 g (softmax - onehot)
        dz.mul_(q.addcmul_(q, q, value=-1.0))  # times q (1 - q): the gradient of the loss w.r.t. z
        dx = dz @ weight if ctx.needs_input_grad[0] else None
        dweight = dz.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dweight, None, None, None
