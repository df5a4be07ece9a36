"""
The GPT of nanopipe, a decoder-only Transformer in the nanochat family:

- rotary position embeddings (no learned positions), QK-norm, parameter-free RMSNorm, no biases
- ReLU² MLP of width 4x, untied token embedding and LM head, logits soft-capped at ±15
- optional grouped-query attention (n_kv_head < n_head)
- F.scaled_dot_product_attention (flash kernels where available), with a KV cache for decoding

Build it on the meta device so that a large model is allocated once, then initialise in place:

    config = build_model_config(depth=4, aspect_ratio=64, head_dim=64, max_seq_len=256, vocab_size=512)
    model = GPT.create(config, device="cpu")          # meta -> to_empty -> init_weights
    loss = model(idx, targets)                        # idx, targets: (B, T) int64, -1 = ignored
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopipe.common import print0
from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.configs.tok_train import DEFAULT_VOCAB_SIZE
from nanopipe.fused_kernels import (LinearSoftcapCrossEntropyFunction, MLPFunction, RMSNormFunction, RotaryFunction,
                                    SharedInputLinearsFunction, SmallCausalAttentionFunction)
from nanopipe.kv_cache import KVCache, cached_attention
from nanopipe.optim import DistAdamW, DistMuon, Muon, is_distributed
from nanopipe.vocab import VOCAB_PAD_MULTIPLE, padded_vocab_size

LOGIT_SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15)
ROTARY_BASE = 10_000
ROTARY_OVERCOMPUTE = 10  # rotary tables cover 10x the training context (generation may run past it)
REFERENCE_MODEL_DIM = 768  # the AdamW learning rates were tuned at this width


def model_width(depth: int, aspect_ratio: int, head_dim: int) -> int:
    """Channels of the residual stream: depth * aspect_ratio, rounded up to a multiple of head_dim."""
    return math.ceil(depth * aspect_ratio / head_dim) * head_dim


_DEFAULT_RUN = BaseTrainConfig()
_DEFAULT_WIDTH = model_width(_DEFAULT_RUN.depth, _DEFAULT_RUN.aspect_ratio, _DEFAULT_RUN.head_dim)


@dataclass
class GPTConfig:
    """Architecture of a GPT. Saved as a dict in every checkpoint's meta.json (`model_config`)."""

    # defaults: the architecture base_train's defaults build (nanochat's d20 at tok_train's vocabulary)
    sequence_len: int = _DEFAULT_RUN.max_seq_len  # training context length in tokens
    vocab_size: int = DEFAULT_VOCAB_SIZE
    n_layer: int = _DEFAULT_RUN.depth
    n_head: int = _DEFAULT_WIDTH // _DEFAULT_RUN.head_dim  # query heads
    n_kv_head: int = _DEFAULT_WIDTH // _DEFAULT_RUN.head_dim  # key/value heads (GQA when fewer than n_head)
    n_embd: int = _DEFAULT_WIDTH

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def build_model_config(depth: int, aspect_ratio: int, head_dim: int, max_seq_len: int, vocab_size: int,
                       n_kv_head: int | None = None) -> GPTConfig:
    """The whole architecture from one dial: width = depth * aspect_ratio rounded up to a multiple of
    head_dim, heads = width / head_dim. n_kv_head defaults to n_head (plain multi-head attention)."""
    for flag, value in (("--depth", depth), ("--aspect_ratio", aspect_ratio), ("--head_dim", head_dim),
                        ("--max_seq_len", max_seq_len), ("vocab_size", vocab_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    model_dim = model_width(depth, aspect_ratio, head_dim)
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head if n_kv_head is None else n_kv_head, n_embd=model_dim)


# -----------------------------------------------------------------------------
# Building blocks

def use_fused_cpu_kernels(x: torch.Tensor) -> bool:
    """True for float32 CPU tensors in eager mode without autocast: there the hand-fused autograd functions of
    nanopipe/fused_kernels.py replace chains of small ATen ops (each allocating and re-reading its operands, and
    each a node for autograd). Under torch.compile, under autocast and on CUDA, the plain ops are used (and the compiler, where
    there is one, does the fusing)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, without a learnable gain."""
    if use_fused_cpu_kernels(x):
        return RMSNormFunction.apply(x)
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: int = ROTARY_BASE,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (1, seq_len, 1, head_dim // 2), float32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's channels by a position-dependent angle. x: (B, T, H, D)."""
    if use_fused_cpu_kernels(x) and cos.dtype == x.dtype:
        return RotaryFunction.apply(x, cos, sin)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


SMALL_ATTENTION_MAX_LEN = 256  # CPU training contexts up to this length use SmallCausalAttentionFunction


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """Causal self-attention over (B, H, T, D) queries, keys and values."""
    B, H, T, D = q.shape
    if use_fused_cpu_kernels(q) and not enable_gqa and T <= SMALL_ATTENTION_MAX_LEN:
        y = SmallCausalAttentionFunction.apply(q.reshape(B * H, T, D), k.reshape(B * H, T, D), v.reshape(B * H, T, D))
        return y.view(B, H, T, D)
    # CUDA: under bf16 autocast, causal with no mask, SDPA dispatches to its flash kernel (GQA goes to the
    # memory-efficient one where flash lacks enable_gqa); no (T, T) scores are materialised
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)


def softcapped_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             reduction: str) -> torch.Tensor:
    """Cross-entropy of the LM head's soft-capped logits, LOGIT_SOFTCAP * tanh(x W^T / LOGIT_SOFTCAP), in float32,
    targets == -1 ignored. x: (N, C), weight: (V, C), targets: (N,). reduction 'mean' (over the counted
    targets), 'sum' or 'none' ((N,), 0 where ignored), as F.cross_entropy."""
    assert reduction in ("mean", "sum", "none"), f"loss_reduction must be mean, sum or none, got {reduction!r}"
    if use_fused_cpu_kernels(x) and weight.dtype == x.dtype:
        return LinearSoftcapCrossEntropyFunction.apply(x, weight, targets, LOGIT_SOFTCAP, reduction)
    logits = F.linear(x, weight).float()
    logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def top_k_limit(top_k: int | None, vocab_size: int) -> int | None:
    """How many of the most likely tokens sampling keeps: None keeps them all, as does a k at or above the
    vocabulary. The flags' "0 or -1: all" becomes None in the config (nanopipe.configs.base.TopK), so a
    sampler only ever gets None or a k of at least 1."""
    assert top_k is None or top_k >= 1, f"top_k must be None (every token) or at least 1, got {top_k}"
    return top_k if top_k is not None and top_k < vocab_size else None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache: KVCache | None):
        B, T, C = x.size()
        if use_fused_cpu_kernels(x):
            q, k, v = SharedInputLinearsFunction.apply(x.reshape(B * T, C), self.c_q.weight, self.c_k.weight,
                                                       self.c_v.weight)
        else:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = (t.to(q.dtype) for t in cos_sin)  # tables are float32; match bf16 under autocast
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        enable_gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = causal_attention(q, k, v, enable_gqa)
        else:
            mask = kv_cache.attention_mask(T)
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            y = cached_attention(q, k.to(q.dtype), v.to(q.dtype), enable_gqa, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        if use_fused_cpu_kernels(x):
            y = MLPFunction.apply(x.reshape(-1, x.size(-1)), self.c_fc.weight, self.c_proj.weight)
            return y.view(*x.shape[:-1], y.size(-1))
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    """Construct under `torch.device("meta")`, then `to_empty(device=...)` and `init_weights()`:
    __init__ only declares shapes, all values are written by init_weights (see `GPT.create`)."""

    def __init__(self, config: GPTConfig, pad_vocab_size_to: int = VOCAB_PAD_MULTIPLE):
        super().__init__()
        self.config = config
        # The embedding tables are padded (multiple of VOCAB_PAD_MULTIPLE: tensor-core friendly, and shards evenly across
        # ranks in DistAdamW); the padding rows are never looked up and their logits are cut off.
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, pad_vocab_size_to)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(self.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        self.rotary_seq_len = config.sequence_len * ROTARY_OVERCOMPUTE
        cos, sin = rotary_tables(self.rotary_seq_len, config.head_dim, device=self.lm_head.weight.device)
        self.register_buffer("cos", cos, persistent=False)  # recomputed, never checkpointed
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def create(cls, config: GPTConfig, device: torch.device | str) -> "GPT":
        """Declare on the meta device, allocate once on `device`, initialise in place."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's scheme: embedding N(0, 1); LM head N(0, 0.001); q/k/v and MLP-in uniform with
        std 1/sqrt(n_embd); both output projections zero, so every block starts as the identity."""
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0 / self.config.n_embd)  # uniform(-b, b) has std b / sqrt(3)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = rotary_tables(self.rotary_seq_len, self.config.head_dim, device=self.lm_head.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        # On CUDA the token embedding lives in bf16 (half the memory for it and its AdamW state); the
        # optimizer copes fine with it, as in nanochat.
        if self.transformer.wte.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    # --- sizes and cost ---------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Parameters counted for scaling laws (tokens = ratio * this): all of them, embeddings
        included, following Chinchilla as nanochat does."""
        return self.num_params()

    def param_counts(self) -> dict[str, int]:
        """Breakdown for logging."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == self.num_params(), f"parameter groups {counts} miss some parameters"
        return counts

    def estimate_flops(self) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight (the embedding is a lookup,
        not a matmul) plus 12 * layers * heads * head_dim * seq_len for the attention scores and their
        product with the values (PaLM paper, appendix B: https://arxiv.org/abs/2204.02311)."""
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        c = self.config
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    # --- optimisation -----------------------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr: float = _DEFAULT_RUN.unembedding_lr,
                         embedding_lr: float = _DEFAULT_RUN.embedding_lr, matrix_lr: float = _DEFAULT_RUN.matrix_lr,
                         weight_decay: float = _DEFAULT_RUN.weight_decay, adam_betas: tuple[float, float] = (0.8, 0.95)) -> list:
        """[AdamW for embedding and LM head, Muon for every transformer matrix]. The AdamW rates scale
        as 1/sqrt(width / 768); weight decay applies to the AdamW parameters only. Under
        torch.distributed with several ranks the returned optimizers average the gradients themselves
        (do not also wrap the model in DDP). Every param group records its `initial_lr`."""
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(matrix_params) + len(embedding_params) + len(lm_head_params) == len(list(self.parameters()))
        dmodel_lr_scale = (self.config.n_embd / REFERENCE_MODEL_DIM) ** -0.5
        print0(f"AdamW learning rates scaled by (n_embd / {REFERENCE_MODEL_DIM})^-0.5 = {dmodel_lr_scale:.6f}")
        adam_groups = [
            dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
        ]
        adam_kwargs = dict(betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        if is_distributed():
            adamw = DistAdamW(adam_groups, **adam_kwargs)
            muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95)
        else:
            fused = self.get_device().type in ("cuda", "cpu")  # one multi-tensor kernel for all of AdamW's tensors
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs)
            muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # --- forward and sampling ---------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab_size) float32 when targets is None, else the float32 cross-entropy
        (targets == -1 ignored; loss_reduction='none' gives a flat (B*T,) vector with 0 at ignored
        positions). With a kv_cache, idx holds the tokens after the cache's current position."""
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        assert T0 + T <= self.cos.size(1), (
            f"position {T0 + T} is past the rotary tables ({self.cos.size(1)} = {ROTARY_OVERCOMPUTE} x sequence_len)")
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

        x = self.transformer.wte(idx)
        if x.dtype != self.lm_head.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lm_head.weight.dtype)  # bf16 embedding used outside autocast
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)

        if targets is not None:  # the padding rows of the LM head are never scored
            weight = self.lm_head.weight[:self.config.vocab_size]
            return softcapped_cross_entropy(x.reshape(B * T, -1), weight, targets.reshape(-1), loss_reduction)
        logits = self.lm_head(x)
        if self.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        logits = logits.float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Sample a continuation of one prompt token by token, re-running the whole sequence each time
        (simple and cache-free; the chat engine is the fast path). temperature 0 means greedy."""
        assert isinstance(tokens, list) and tokens, "tokens must be a non-empty list of ints"
        assert temperature >= 0.0, f"temperature must be >= 0, got {temperature}"
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if (k := top_k_limit(top_k, logits.size(-1))) is not None:
                kth = torch.topk(logits, k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = logits.argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
