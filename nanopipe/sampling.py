"""Samples from a base model: fixed prompts and greedy (or sampled) continuations through the KV-cache engine."""

from __future__ import annotations

from nanopipe.engine import Engine

# Prompts with one obvious continuation: a quick look at what a base model has learned.
SAMPLE_PROMPTS = [
    "The capital of Italy is",
    "Water freezes at a temperature of",
    "The opposite of up is",
    "Monday, Tuesday, Wednesday,",
    "The largest planet in the solar system is",
    "If 2*x + 4 = 10, then x is",
    "My favourite food is",
]


def generate_samples(model, tokenizer, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
                     num_samples: int = 1, seed: int = 42) -> list[str]:
    """Continuations of each prompt (greedy at temperature 0) from the KV-cache engine, prompt in front."""
    engine = Engine(model, tokenizer)
    out = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        rows, _ = engine.generate_batch(tokens, num_samples=num_samples, max_tokens=max_tokens,
                                        temperature=temperature, seed=seed)
        out += [prompt + tokenizer.decode(row[len(tokens):]) for row in rows]
    return out
