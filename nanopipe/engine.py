"""
Inference engine for chat models: batched sampling with a KV cache, and calculator tool use.

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=256,
                                                     temperature=1.0, top_k=50, seed=42):
        ...   # one token per sample per step; mask 1 = sampled by the model, 0 = forced by a tool
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256)

The prompt is prefilled once with batch size 1; its KV cache is then copied into a cache of
`num_samples` rows, which decode together. A row ends on <|assistant_end|> or <|bos|>, or when its own
token budget is spent.

Tool use: when a row writes <|python_start|> expr <|python_end|>, `expr` goes to `use_calculator` (an AST
evaluator for arithmetic and `'word'.count('l')`, never `eval`); if it yields a value, the row is fed
<|output_start|> value <|output_end|> instead of sampling, and those tokens carry mask 0 so that RL can
leave them out of the loss.
"""

from __future__ import annotations

import ast
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from nanopipe.gpt import KVCache

# -----------------------------------------------------------------------------
# Calculator: a whitelist walk over Python's AST. Nothing is ever passed to eval/exec.

CALC_MAX_CHARS = 1000       # longer "expressions" are rejected before parsing
CALC_MAX_INT_BITS = 1024    # integers up to ~308 digits, operands and results alike
CALC_MAX_STRING_CHARS = 10_000

_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class CalculatorError(ValueError):
    """The expression is outside what the calculator evaluates (or its value is out of range)."""


def _check_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"not a real number: {value!r}")
    if isinstance(value, int) and value.bit_length() > CALC_MAX_INT_BITS:
        raise CalculatorError(f"integer over {CALC_MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"non-finite result {value}")
    return value


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # |base ** exponent| has about bit_length(base) * exponent bits: refuse before computing it
        if abs(base) > 1 and base.bit_length() * exponent > CALC_MAX_INT_BITS + 64:
            raise CalculatorError(f"{base} ** {exponent} is too large")
        if abs(base) <= 1 and exponent > CALC_MAX_INT_BITS:
            raise CalculatorError(f"exponent {exponent} is too large")
    elif abs(exponent) > CALC_MAX_INT_BITS:
        raise CalculatorError(f"exponent {exponent} is too large")
    return base ** exponent  # float overflow raises OverflowError; a complex result fails _check_number


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            if len(node.value) > CALC_MAX_STRING_CHARS:
                raise CalculatorError("string literal too long")
            return node.value
        return _check_number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _check_number(_evaluate(node.operand))
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY_OPS or isinstance(node.op, ast.Pow)):
        left = _check_number(_evaluate(node.left))
        right = _check_number(_evaluate(node.right))
        if isinstance(node.op, ast.Pow):
            return _check_number(_power(left, right))
        return _check_number(_BINARY_OPS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return _evaluate(node.func.value).count(_evaluate(node.args[0]))
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def evaluate_expression(expr: str) -> int | float:
    """Value of an arithmetic expression (+ - * / // % **, parentheses, unary minus) or of
    `'literal'.count('literal')`. Raises CalculatorError for anything else."""
    if len(expr) > CALC_MAX_CHARS:
        raise CalculatorError(f"expression longer than {CALC_MAX_CHARS} characters")
    if "'" not in expr and '"' not in expr:
        expr = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr)  # thousands separators: 1,200 -> 1200
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CalculatorError(f"cannot parse {expr!r}: {err}") from None
    try:
        value = _evaluate(tree)
    except (ArithmeticError, RecursionError) as err:  # ZeroDivisionError, OverflowError
        raise CalculatorError(f"{type(err).__name__}: {err}") from None
    return _check_number(value)


def format_number(value: int | float) -> str:
    """How a result is shown to the model: integers plainly (48/2 -> '24', as GSM8K writes it), other
    floats rounded to 6 decimals."""
    if isinstance(value, float):
        rounded = round(value, 6)
        if rounded.is_integer() and abs(rounded) < 1e15:
            return str(int(rounded))
        return repr(rounded)
    return str(value)


def use_calculator(expr: str) -> str | None:
    """The tool: the formatted value of `expr`, or None when the calculator does not evaluate it."""
    try:
        return format_number(evaluate_expression(expr))
    except CalculatorError:
        return None


# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V) -> (B, 1). temperature 0 is greedy (argmax)."""
    assert temperature >= 0.0, f"temperature must be >= 0, got {temperature}"
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and 0 < top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        probs = F.softmax(values.float() / temperature, dim=-1)
        return indices.gather(1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


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

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
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

    def _budgets(self, prompt_len: int, num_samples: int, max_tokens) -> list[int]:
        if max_tokens is None:  # until a stop token or the end of the model's context
            budget = self.model.config.sequence_len - prompt_len
            assert budget > 0, (f"the prompt ({prompt_len} tokens) fills the model's context "
                                f"({self.model.config.sequence_len}); pass max_tokens explicitly")
            return [budget] * num_samples
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * num_samples
        budgets = list(max_tokens)
        assert len(budgets) == num_samples and all(b >= 0 for b in budgets), (
            f"max_tokens must be an int >= 0 or {num_samples} of them (one per sample), got {max_tokens}")
        return budgets

    def _advance_row(self, row: _Row, token: int) -> None:
        """Account for `token` just emitted by `row`: stop tokens, budget, the python/output state machine."""
        row.budget -= 1
        if token in (self.assistant_end, self.bos) or row.budget <= 0:
            row.done = True
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens)) if row.python_tokens else None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.python_tokens = []
        elif row.in_python:
            row.python_tokens.append(token)

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | Sequence[int] | None = None,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks) per step: one token per sample; mask 1 sampled, 0 forced.

        max_tokens: one budget for every sample, or one per sample; None = up to the model's context.
        Once a sample has finished, its entries are <|assistant_end|> with mask 0 until all have finished.
        """
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), (
            "tokens must be a non-empty list of ints")
        assert num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"
        rows = [_Row(budget=b) for b in self._budgets(len(tokens), num_samples, max_tokens)]
        for row in rows:
            row.done = row.budget <= 0
        if all(row.done for row in rows):
            return
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1) prefill the prompt once, batch 1; 2) copy that cache into one row per sample
        prefill_cache = self._new_cache(1, len(tokens), device)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :].expand(num_samples, -1)
        decode_cache = self._new_cache(num_samples, len(tokens) + max(row.budget for row in rows), device)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        # 3) decode: sample a column, substitute forced tool tokens, feed the column back
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled):
                if row.done:
                    column.append(self.assistant_end)
                    masks.append(0)
                    continue
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self._advance_row(row, token)
            yield column, masks
            if all(row.done for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model(ids, kv_cache=decode_cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """All samples to the end: (results, masks), each row prompt + completion. The terminal token
        (<|assistant_end|> / <|bos|>) is left out; prompt positions have mask 0."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if finished[i]:
                    continue
                if token in (self.assistant_end, self.bos):
                    finished[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks
