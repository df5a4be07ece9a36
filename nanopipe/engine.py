"""
Inference engine for chat models: batched sampling with a KV cache, and calculator tool use.

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=256,
                                                     temperature=1.0, top_k=50, seed=42):
        ...   # one token per sample per step; mask 1 = sampled by the model, 0 = forced by a tool
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256)
    results, masks = engine.generate_multi([prompt_a, prompt_b], num_samples=4, max_tokens=256, seeds=[7, 8])

Each prompt is prefilled once; its KV cache is then copied into one row per sample, and all rows decode
together. Several different prompts (`generate_multi`, `stream_multi`) are left-padded to the longest and
prefilled in one batch, the padding masked out of attention, so that a prompt gives the same logits as alone
(up to float rounding). Every prompt samples from its own generator, seeded with its own seed and drawn as if
it were generated alone: a prompt's completions do not depend on the other prompts of its batch, and one
prompt through generate_multi equals generate_batch. A row ends on <|assistant_end|> or <|bos|>, or when its
own token budget is spent.

Tool use: when a row writes <|python_start|> expr <|python_end|>, `expr` goes to `use_calculator`
(nanopipe.calculator: nanochat's outputs and refusals, from an AST walk, never `eval`; `extended_calculator=True`
for nanopipe's own); if it yields a value, the row is fed
<|output_start|> value <|output_end|> instead of sampling, and those tokens carry mask 0 so that RL can
leave them out of the loss.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from nanopipe.calculator import (CalculatorError, evaluate_expression, format_number,  # noqa: F401
                                 use_calculator)
from nanopipe.gpt import top_k_limit
from nanopipe.kv_cache import KVCache

# -----------------------------------------------------------------------------
# Sampling

def _multinomial(probs: torch.Tensor, rng: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    if rng is None or isinstance(rng, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=rng)
    if len(rng) == 1:
        return torch.multinomial(probs, num_samples=1, generator=rng[0])
    assert probs.size(0) % len(rng) == 0, f"{probs.size(0)} rows do not split into {len(rng)} equal groups"
    groups = probs.split(probs.size(0) // len(rng))
    return torch.cat([torch.multinomial(g, num_samples=1, generator=r) for g, r in zip(groups, rng)])


def sample_next_token(logits: torch.Tensor, rng: torch.Generator | Sequence[torch.Generator] | None,
                      temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V) -> (B, 1). temperature 0 is greedy (argmax).

    rng: one generator for all rows, or G generators for G equal groups of consecutive rows (group g drawn
    from rng[g] exactly as if its rows were sampled alone: one prompt's samples in a batch of prompts)."""
    assert temperature >= 0.0, f"temperature must be >= 0, got {temperature}"
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if (k := top_k_limit(top_k, logits.size(-1))) is not None:
        values, indices = torch.topk(logits, k, dim=-1)
        probs = F.softmax(values.float() / temperature, dim=-1)
        return indices.gather(1, _multinomial(probs, rng))
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return _multinomial(probs, rng)


# -----------------------------------------------------------------------------
# The engine

@dataclass
class _Row:
    """Decoding state of one sample."""

    budget: int                                   # tokens this row may still emit
    forced: deque = field(default_factory=deque)  # tool output waiting to be fed instead of sampling
    in_python: bool = False
    python_tokens: list = field(default_factory=list)
    done: bool = False


class Engine:
    """Generation for a GPT (nanopipe.gpt) and its Tokenizer (special tokens drive the tool state machine)."""

    def __init__(self, model, tokenizer, extended_calculator: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.extended_calculator = extended_calculator  # nanochat's calculator unless asked (nanopipe.calculator)
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()

    def _cache_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.model.lm_head.weight.dtype

    def _new_cache(self, batch_size: int, seq_len: int, device: torch.device) -> KVCache:
        c = self.model.config
        return KVCache(batch_size=batch_size, num_heads=c.n_kv_head, seq_len=seq_len, head_dim=c.n_embd // c.n_head,
                       num_layers=c.n_layer, device=device, dtype=self._cache_dtype(device))

    def _budgets(self, prompt_lens: list[int], max_tokens) -> list[int]:
        """One token budget per row, from the rows' prompt lengths."""
        if max_tokens is None:  # until a stop token or the end of the model's context
            budgets = [self.model.config.sequence_len - n for n in prompt_lens]
            assert min(budgets) > 0, (f"a prompt ({max(prompt_lens)} tokens) fills the model's context "
                                      f"({self.model.config.sequence_len}); pass max_tokens explicitly")
            return budgets
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * len(prompt_lens)
        budgets = list(max_tokens)
        assert len(budgets) == len(prompt_lens) and all(b >= 0 for b in budgets), (
            f"max_tokens must be an int >= 0 or {len(prompt_lens)} of them (one per row), got {max_tokens}")
        return budgets

    def _prefill(self, prompts: list[list[int]], num_samples: int, max_budget: int,
                 device: torch.device) -> tuple[torch.Tensor, KVCache]:
        """Prefill the prompts once, in one batch left-padded to the longest (the padding masked out), and
        copy that cache into num_samples rows per prompt: (next-token logits of every row, the decode cache)."""
        width = max(len(p) for p in prompts)
        prefill_cache = self._new_cache(len(prompts), width, device)
        if any(len(p) < width for p in prompts):
            valid = [[False] * (width - len(p)) + [True] * len(p) for p in prompts]
            prefill_cache.set_key_mask(torch.tensor(valid, dtype=torch.bool, device=device))
        ids = torch.tensor([[self.bos] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]
        if len(prompts) == 1:
            logits = logits.expand(num_samples, -1)
        else:
            logits = logits.repeat_interleave(num_samples, dim=0)
        decode_cache = self._new_cache(len(prompts) * num_samples, width + max_budget, device)
        decode_cache.prefill(prefill_cache)
        return logits, decode_cache

    def _advance_row(self, row: _Row, token: int) -> None:
        """Account for `token` just emitted by `row`: stop tokens, budget, the python/output state machine."""
        row.budget -= 1
        if token in (self.assistant_end, self.bos) or row.budget <= 0:
            row.done = True
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            expr = self.tokenizer.decode(row.python_tokens) if row.python_tokens else None
            result = use_calculator(expr, self.extended_calculator) if expr is not None else None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.python_tokens = []
        elif row.in_python:
            row.python_tokens.append(token)

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | Sequence[int] | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step: one token per sample; mask 1 sampled, 0 forced.

        max_tokens: one budget for every sample, or one per sample; None = up to the model's context.
        Once a sample has finished, its entries are <|assistant_end|> with mask 0 until all have finished.
        """
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), (
            "tokens must be a non-empty list of ints")
        return self.stream_multi([tokens], num_samples, max_tokens, temperature, top_k, seeds=[seed])

    @torch.inference_mode()
    def stream_multi(self, prompts: list[list[int]], num_samples: int = 1,
                     max_tokens: int | Sequence[int] | None = None, temperature: float = 1.0,
                     top_k: int | None = None, seeds: Sequence[int] | None = None,
                     ) -> Iterator[tuple[list[int], list[int]]]:
        """generate() for several prompts at once: rows are prompt-major (row p * num_samples + s is sample s of
        prompt p), and each step yields one token per row. max_tokens: one budget for every row, or one per row.
        seeds: one per prompt (None: 42 each, generate's default); prompt p samples from its own generator
        seeded with seeds[p], so its rows are those generate(prompts[p], num_samples, seed=seeds[p]) gives,
        whatever else is in the batch (up to float rounding of the batched forward pass)."""
        assert prompts and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts), (
            "prompts must be a non-empty list of non-empty lists of ints")
        assert num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"
        seeds = [42] * len(prompts) if seeds is None else list(seeds)
        assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts (one per prompt)"
        rows = [_Row(budget=b) for b in self._budgets([len(p) for p in prompts for _ in range(num_samples)],
                                                      max_tokens)]
        for row in rows:
            row.done = row.budget <= 0
        if all(row.done for row in rows):
            return
        device = self.model.get_device()
        rngs = [torch.Generator(device=device) for _ in seeds]
        for rng, seed in zip(rngs, seeds):
            rng.manual_seed(seed)
        logits, cache = self._prefill(prompts, num_samples, max(row.budget for row in rows), device)

        # decode: sample a column, substitute forced tool tokens, feed the column back
        live = list(range(len(prompts)))  # prompts whose rows are in the cache, in its order
        while True:
            sampled = sample_next_token(logits, [rngs[p] for p in live], temperature, top_k)[:, 0].tolist()
            column, masks = [self.assistant_end] * len(rows), [0] * len(rows)  # what a finished row shows
            live_rows = [p * num_samples + s for p in live for s in range(num_samples)]
            for r, token in zip(live_rows, sampled):
                row = rows[r]
                if row.done:
                    continue
                forced = bool(row.forced)
                column[r] = row.forced.popleft() if forced else token
                masks[r] = 0 if forced else 1
                self._advance_row(row, column[r])
            yield column, masks
            if all(row.done for row in rows):
                return
            live = self._compact(cache, live, rows, num_samples)
            ids = [column[p * num_samples + s] for p in live for s in range(num_samples)]
            logits = self.model(torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(1), kv_cache=cache)
            logits = logits[:, -1, :]

    @staticmethod
    def _compact(cache: KVCache, live: list[int], rows: list[_Row], num_samples: int) -> list[int]:
        """Drop from the cache the prompts whose samples have all finished, once they hold an eighth of its rows
        or more (each drop copies the kept rows' keys and values); return the prompts left in it. A prompt
        leaves as a whole, so each remaining prompt's generator keeps drawing as it would alone."""
        kept = [j for j, p in enumerate(live)
                if not all(rows[p * num_samples + s].done for s in range(num_samples))]
        if (len(live) - len(kept)) * 8 < len(live):
            return live
        cache.keep_rows([j * num_samples + s for j in kept for s in range(num_samples)])
        return [live[j] for j in kept]

    def _collect(self, prompts: list[list[int]], num_samples: int,
                 stream: Iterator[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[list[int]]]:
        """Run `stream` to the end: (results, masks), one per row, each prompt + completion without the
        terminal token; prompt positions have mask 0."""
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        finished = [False] * len(results)
        for column, column_masks in stream:
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if finished[i]:
                    continue
                if token in (self.assistant_end, self.bos):
                    finished[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """All samples to the end: (results, masks), each row prompt + completion. The terminal token
        (<|assistant_end|> / <|bos|>) is left out; prompt positions have mask 0."""
        return self._collect([tokens], num_samples, self.generate(tokens, num_samples, **kwargs))

    def generate_multi(self, prompts: list[list[int]], num_samples: int = 1,
                       max_tokens: int | Sequence[int] | None = None, temperature: float = 1.0,
                       top_k: int | None = None,
                       seeds: Sequence[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """generate_batch for several prompts in one batch: (results, masks) of len(prompts) * num_samples
        rows, prompt-major (row p * num_samples + s is sample s of prompt p). See stream_multi."""
        stream = self.stream_multi(prompts, num_samples, max_tokens, temperature, top_k, seeds)
        return self._collect(prompts, num_samples, stream)
