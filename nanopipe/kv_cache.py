"""
The KV cache of incremental decoding (nanopipe/engine.py) and the attention over it that GPT's attention
layers call when given a cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for incremental decoding, laid out (layer, B, H_kv, T, D).

    The model writes into it during forward; the position advances once the last layer has written.
    It grows by itself when decoding runs past `seq_len`.

    Rows of different lengths share one cache by left padding: `set_key_mask(valid)` marks the padding
    positions, which no query then attends to (rotary embeddings are relative, so a left-padded prompt gives
    the logits of the prompt alone, up to float rounding). Without a mask attention is plain causal.
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.batch_size, self.n_heads, self.head_dim, self.n_layers = batch_size, num_heads, head_dim, num_layers
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.key_valid: torch.Tensor | None = None  # (B, max_seq_len) bool, False at padding; None: no padding
        self._mask_for: tuple[int, int] | None = None  # (pos, Tq) of the memoised attention mask
        self._mask: torch.Tensor | None = None

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.size(3)

    def get_pos(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0
        self.key_valid, self._mask_for, self._mask = None, None, None

    def _grow(self, needed: int) -> None:
        new_len = -(-(needed + 1024) // 1024) * 1024  # headroom, rounded up to a multiple of 1024
        extra = list(self.k_cache.shape)
        extra[3] = new_len - self.max_seq_len
        pad = self.k_cache.new_zeros(extra)
        self.k_cache = torch.cat([self.k_cache, pad], dim=3)
        self.v_cache = torch.cat([self.v_cache, pad], dim=3)
        if self.key_valid is not None:
            more = self.key_valid.new_ones(self.batch_size, extra[3])
            self.key_valid = torch.cat([self.key_valid, more], dim=1)

    def set_key_mask(self, valid: torch.Tensor) -> None:
        """Mark which of the next T positions of each row hold real tokens: valid (B, T) bool, False for
        padding (left padding: a row's prompt ends where the others' do). Positions after them are valid."""
        B, T = valid.shape
        assert B == self.batch_size and valid.dtype == torch.bool, (
            f"valid must be ({self.batch_size}, T) bool, got {tuple(valid.shape)} {valid.dtype}")
        t0, t1 = self.pos, self.pos + T
        if t1 > self.max_seq_len:
            self._grow(t1)
        if self.key_valid is None:
            self.key_valid = torch.ones(B, self.max_seq_len, dtype=torch.bool, device=self.k_cache.device)
        self.key_valid[:, t0:t1] = valid.to(self.key_valid.device)
        self._mask_for = None

    def attention_mask(self, num_queries: int) -> torch.Tensor | None:
        """None without padding; else the (B, 1, Tq, Tk) bool mask of the Tq queries about to be inserted at
        this position: causal, and no padding key. A padding query sees itself only (a row with every key
        masked would be NaN, and NaN values poison the rows that give them weight 0). Computed once per forward
        pass: every layer asks at the same position."""
        if self.key_valid is None:
            return None
        if self._mask_for != (self.pos, num_queries):
            t0, t1 = self.pos, self.pos + num_queries
            if t1 > self.max_seq_len:
                self._grow(t1)
            keys = self.key_valid[:, None, :t1]  # (B, 1, Tk)
            if num_queries == 1:  # decoding: the new token sees every real key, itself included
                self._mask = keys[:, None]
            else:
                device = self.key_valid.device
                causal = torch.ones(num_queries, t1, dtype=torch.bool, device=device).tril(diagonal=t0)
                own = torch.zeros_like(causal)
                own[torch.arange(num_queries, device=device), torch.arange(t0, t1, device=device)] = True
                self._mask = ((causal & keys) | own)[:, None]
            self._mask_for = (self.pos, num_queries)
        return self._mask

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H_kv, T_new, D) of one layer; return that layer's keys and values so far."""
        assert k.size(0) == self.batch_size, f"batch {k.size(0)} does not match the cache's {self.batch_size}"
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.max_seq_len:
            self._grow(t1)
        self.k_cache[layer_idx, :, :, t0:t1] = k
        self.v_cache[layer_idx, :, :, t0:t1] = v
        if layer_idx == self.n_layers - 1:
            self.pos = t1
        return self.k_cache[layer_idx, :, :, :t1], self.v_cache[layer_idx, :, :, :t1]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order, and drop the others (rows whose decoding has finished stop
        costing compute). Copies the kept rows' keys and values to the front, within the same buffers."""
        assert rows and all(0 <= r < self.batch_size for r in rows), (
            f"rows to keep must be in [0, {self.batch_size}), got {rows}")
        index = torch.tensor(rows, dtype=torch.long, device=self.k_cache.device)
        n, B = self.pos, len(rows)
        for cache in (self.k_cache, self.v_cache):
            cache[:, :B, :, :n] = cache[:, index, :, :n]  # the index gathers a copy first: overlap is safe
        self.k_cache, self.v_cache = self.k_cache[:, :B], self.v_cache[:, :B]
        if self.key_valid is not None:
            self.key_valid = self.key_valid[index]
        self.batch_size, self._mask_for = B, None

    def prefill(self, other: "KVCache") -> None:
        """Copy another cache's contents (and padding mask) into this empty one, each of its rows repeated
        batch_size / other.batch_size times: one prompt prefilled once, or several prompts once each, then
        decoded as num_samples rows per prompt (rows prompt-major: row r holds other's row r // num_samples)."""
        assert self.pos == 0, f"prefill needs an empty cache, this one is at position {self.pos}"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim), (
            f"cache shapes differ: layers/heads/head_dim {(self.n_layers, self.n_heads, self.head_dim)} "
            f"vs {(other.n_layers, other.n_heads, other.head_dim)}")
        assert self.batch_size % other.batch_size == 0, (
            f"cannot broadcast a batch of {other.batch_size} to {self.batch_size}")
        n, repeats = other.pos, self.batch_size // other.batch_size
        if n > self.max_seq_len:
            self._grow(n)
        for mine, theirs in ((self.k_cache, other.k_cache), (self.v_cache, other.v_cache)):
            # (L, B, H, n, D) viewed as (L, other B, repeats, H, n, D): each source row fills its repeats
            mine[:, :, :, :n].unflatten(1, (other.batch_size, repeats)).copy_(theirs[:, :, None, :, :n])
        if other.key_valid is not None:
            self.set_key_mask(other.key_valid[:, :n].repeat_interleave(repeats, dim=0))
        self.pos = n


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of Tq new queries over Tk cached keys, the queries being the last Tq positions. `mask`:
    the cache's attention_mask (padding), None when no row is padded."""
    Tq, Tk = q.size(2), k.size(2)
    if Tq == 1 and q.device.type == "cpu":
        return _decode_attention(q, k, v, mask)
    if mask is not None:  # padded rows: causality and padding in one explicit (B, 1, Tq, Tk) mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    if Tq == Tk:  # prefill of an empty cache: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:  # one new token sees everything before it
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    # Several new tokens: each sees the whole prefix plus the new tokens up to itself. (SDPA's is_causal
    # aligns the triangle to the top-left corner, which would hide the prefix, hence an explicit mask.)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One new query per row over the cache, on a CPU: two batched matmuls. In a process that decodes and trains
    (chat_rl), SDPA's CPU kernel spent ~3.5 ms a call here (B 32, 4 heads, ~150 keys; much of it in oneDNN's
    per-call matmul setup and allocations) against ~0.3 ms in a fresh process; with these matmuls demo-cpu's RL
    step takes 29 % less (4.0 -> 2.8 s on 2 processes), the samples unchanged.
    Grouped-query heads share their key head by a view (query head h reads key head h // group, as SDPA's
    enable_gqa), so keys and values are never repeated."""
    B, H, _, D = q.shape
    H_kv = k.size(1)
    grouped = q.reshape(B, H_kv, H // H_kv, D)
    # keys on the left: their rows are contiguous in the cache (~8 % faster RL steps than grouped @ k^T)
    scores = torch.matmul(k, grouped.transpose(-1, -2)).transpose(-1, -2) * D ** -0.5   # (B, H_kv, group, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                  # mask (B, 1, 1, Tk)
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(B, H, 1, D)
