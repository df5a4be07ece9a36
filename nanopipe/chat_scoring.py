"""
Scoring a chat model on tasks: multiple choice from the logits of the answer letters, generative tasks by
sampling completions and checking them, and ChatCORE. Each loop returns (passed, total) over the problems of
one rank; the caller sums the ranks (`sum_across_ranks`).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from nanopipe.chat_format import render_for_completion
from nanopipe.engine import Engine


def letter_token_ids(tokenizer, letters, cache: dict) -> list[int]:
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}; "
                                 "multiple-choice scoring needs one token per letter")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def evaluate_categorical(task, model, tokenizer, num_problems: int, batch_size: int, rank: int = 0,
                         world_size: int = 1, on_progress=None) -> tuple[int, int]:
    """Multiple choice: the predicted answer is the letter whose token has the highest logit right after
    <|assistant_start|>, among the problem's letters only. Batches of prompts are right-padded with <|bos|>
    (causal attention: padding after a prompt cannot change its logits)."""
    device = model.get_device()
    pad = tokenizer.get_bos_token_id()
    letter_cache: dict = {}
    passed = total = 0
    num_batches = math.ceil(num_problems / batch_size)
    for b in range(rank, num_batches, world_size):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num_problems))]
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            choice_logits = logits[row, len(prompt) - 1, letter_token_ids(tokenizer, letters, letter_cache)]
            predicted = letters[int(choice_logits.argmax())]
            passed += int(task.evaluate(conversation, predicted))
            total += 1
        if on_progress is not None:
            on_progress(total)
    return passed, total


def evaluate_generative(task, engine: Engine, tokenizer, num_problems: int, num_samples: int, max_new_tokens: int,
                        temperature: float, top_k: int | None, seed: int, rank: int = 0, world_size: int = 1,
                        on_progress=None, batch_size: int = 1, on_problem=None) -> tuple[int, int]:
    """Sample completions per problem and check them exactly; a problem passes if any sample passes.
    Rank r takes problems r, r + world_size, ...; they are generated batch_size at a time (batch_size *
    num_samples rows per forward pass, prompts left-padded). Problem i is sampled with seed + i from its own
    generator, so results depend neither on how problems are split across ranks nor on the batch size (up to
    the float rounding of a batched forward pass, which can flip a near-tie)."""
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    mine = range(rank, num_problems, world_size)
    passed = total = 0
    for index, conversation, completions in sample_problems(task, engine, tokenizer, mine, num_samples, batch_size,
                                                            max_new_tokens, temperature, top_k, seed):
        solved = any(task.evaluate(conversation, completion) for completion in completions)
        passed += int(solved)
        total += 1
        if on_problem is not None:  # e.g. chat_eval: answer format, samples to show
            on_problem(index, conversation, completions, solved)
        if on_progress is not None and (total % batch_size == 0 or total == len(mine)):   # once per batch
            on_progress(total)
    return passed, total


def sample_problems(task, engine: Engine, tokenizer, indices: Sequence[int], num_samples: int, problems_per_batch: int,
                    max_new_tokens: int, temperature: float, top_k: int | None,
                    seed: int) -> Iterator[tuple[int, dict, list[str]]]:
    """(index, conversation, num_samples decoded completions) for each problem of `indices`, decoded
    problems_per_batch at a time; problem i samples from its own generator seeded with seed + i."""
    indices = list(indices)
    for b0 in range(0, len(indices), problems_per_batch):
        batch = indices[b0:b0 + problems_per_batch]
        conversations = [task[i] for i in batch]
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        results, _ = engine.generate_multi(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seeds=[seed + i for i in batch])
        for j, (index, conversation, prompt) in enumerate(zip(batch, conversations, prompts)):
            rows = results[j * num_samples:(j + 1) * num_samples]
            yield index, conversation, [tokenizer.decode(tokens[len(prompt):]) for tokens in rows]


def sum_across_ranks(counts: tuple[int, int], device: torch.device, world_size: int) -> tuple[int, int]:
    if world_size == 1:
        return counts
    tensor = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor[0]), int(tensor[1])


def chatcore(accuracies: dict[str, float], chance: dict[str, float]) -> float:
    """Mean of (accuracy - chance) / (1 - chance) over the given tasks."""
    assert accuracies, "ChatCORE needs at least one task"
    return sum((acc - chance[name]) / (1.0 - chance[name]) for name, acc in accuracies.items()) / len(accuracies)
