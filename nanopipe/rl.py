"""
On-policy policy gradient for chat models, the pieces chat_rl is made of: sampling a group of completions
per question (KV-cache engine, calculator tool), rewards, group-mean advantages, the masked token-level loss,
and pass@k.

    group = sample_group(engine, tokenizer, task, conversation, num_samples=16, device_batch_size=8,
                         max_new_tokens=256, temperature=1.0, top_k=50, rng=random.Random(0))
    groups = sample_groups(engine, tokenizer, task, conversations, num_samples=4, device_batch_size=32, ...)
    advantages = group_advantages(group.rewards)                 # reward - the group's mean
    advantages = group_advantages(group.rewards, baseline="zero")  # the reward itself
    inputs, targets = policy_batch(group.sequences, group.masks, pad_id)
    loss = policy_loss_sum(model, inputs, targets, advantages) / (pass_tokens * passes * questions)

The recipe is nanochat's simplified GRPO, i.e. REINFORCE with a group baseline: no value network, no KL
penalty to a reference model, no ratio clipping (the samples come from the current weights, so the ratio is
1), advantages are reward - group mean (not divided by the group's standard deviation), and the loss is a
mean over the tokens the model sampled in each forward pass of a question's samples, averaged over the passes
and the rank's questions, as nanochat normalises it: the prompt and the calculator's forced output tokens carry
no loss.

The baseline is nanochat's group mean by default. With baseline "zero" the advantage is the reward itself
(plain REINFORCE): every correct sample is reinforced, also in a group that got everything right, and wrong
ones are not pushed down. That sharpens the policy (the answers it already gives most often become more
likely) much faster, which is what a small model sampled at temperature 1 needs: its sampled answers fail on
tail tokens its greedy answers avoid.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from nanopipe.chat_format import render_for_completion
from nanopipe.chat_scoring import sample_problems


# -----------------------------------------------------------------------------
# Rollouts

@dataclass
class Group:
    """num_samples completions of one question: sequences are prompt + completion token ids (the final
    <|assistant_end|> left out), masks are 1 where the model sampled the token, 0 for prompt and tool output."""

    prompt_len: int
    sequences: list[list[int]] = field(default_factory=list)
    masks: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def sampled_tokens(self) -> int:
        """Tokens that carry loss: those the model sampled (mask 1), over all completions."""
        return sum(sum(mask) for mask in self.masks)


def draw_seed(rng: random.Random) -> int:
    """A seed for one generate call, from the rank's sampling generator (checkpointed for exact resume)."""
    return rng.randrange(2**31)


@torch.no_grad()
def sample_group(engine, tokenizer, task, conversation: dict, num_samples: int, device_batch_size: int,
                 max_new_tokens: int, temperature: float, top_k: int | None, rng: random.Random) -> Group:
    """Sample num_samples completions of a question in batches of at most device_batch_size, and score them
    with task.reward. Each batch gets its own seed from `rng`."""
    return sample_groups(engine, tokenizer, task, [conversation], num_samples, device_batch_size, max_new_tokens,
                         temperature, top_k, rng)[0]


def _seeded_chunks(num_questions: int, num_samples: int, device_batch_size: int,
                   rng: random.Random) -> list[tuple[int, int, int]]:
    """(question, samples, seed) per chunk: each question's samples in chunks of at most device_batch_size,
    question after question, a seed drawn from `rng` per chunk."""
    chunks = []
    for question in range(num_questions):
        remaining = num_samples
        while remaining > 0:
            n = min(device_batch_size, remaining)
            chunks.append((question, n, draw_seed(rng)))
            remaining -= n
    return chunks


@torch.no_grad()
def sample_groups(engine, tokenizer, task, conversations: Sequence[dict], num_samples: int, device_batch_size: int,
                  max_new_tokens: int, temperature: float, top_k: int | None, rng: random.Random) -> list[Group]:
    """The groups of several questions, sampled side by side: each generate call decodes the samples of as many
    questions as fit in device_batch_size rows (a question's samples in chunks of at most device_batch_size).

    Seeds: one draw_seed(rng) per chunk, question after question, i.e. what sample_group draws for each question
    in turn; each chunk samples from its own generator. So the groups (and the rng's state after) are those of
    sample_group called per question, up to the float rounding of a batched forward pass."""
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    groups = [Group(prompt_len=len(p)) for p in prompts]
    chunks = _seeded_chunks(len(conversations), num_samples, device_batch_size, rng)
    start = 0
    while start < len(chunks):  # consecutive chunks of one size, as many as fit in device_batch_size rows
        n = chunks[start][1]
        end = start + 1
        while end < len(chunks) and chunks[end][1] == n and (end - start + 1) * n <= device_batch_size:
            end += 1
        batch = chunks[start:end]
        sequences, masks = engine.generate_multi([prompts[q] for q, _, _ in batch], num_samples=n,
                                                 max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                                 seeds=[seed for _, _, seed in batch])
        for j, (q, _, _) in enumerate(batch):
            groups[q].sequences += sequences[j * n:(j + 1) * n]
            groups[q].masks += masks[j * n:(j + 1) * n]
        start = end
    for conversation, group in zip(conversations, groups):
        for sequence in group.sequences:
            completion = tokenizer.decode(sequence[group.prompt_len:])
            group.rewards.append(float(task.reward(conversation, completion)))
    return groups


# -----------------------------------------------------------------------------
# Advantages and loss

BASELINES = ("mean", "zero")


def group_advantages(rewards: Sequence[float] | torch.Tensor, baseline: str = "mean") -> torch.Tensor:
    """reward - baseline (float32): the mean reward of the group, or zero. With the mean, all-equal rewards give
    all-zero advantages: no signal; with zero, only a group whose rewards are all 0 gives none."""
    assert baseline in BASELINES, f"baseline must be one of {BASELINES}, got {baseline!r}"
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    assert rewards.ndim == 1 and rewards.numel() > 0, f"rewards must be a non-empty vector, got {tuple(rewards.shape)}"
    return rewards - rewards.mean() if baseline == "mean" else rewards.clone()


def policy_batch(sequences: Sequence[list[int]], masks: Sequence[list[int]], pad_id: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T-1) for the longest sequence's T: sequences right-padded with pad_id,
    targets -1 (no loss) wherever the predicted token was not sampled by the model (prompt, tool output,
    padding)."""
    assert len(sequences) == len(masks) and sequences, f"{len(sequences)} sequences but {len(masks)} masks"
    width = max(len(s) for s in sequences)
    for s, m in zip(sequences, masks):
        assert len(s) == len(m), f"a sequence of {len(s)} tokens has a mask of {len(m)}"
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)
    mask = torch.tensor([list(m) + [0] * (width - len(m)) for m in masks], dtype=torch.long)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return inputs.to(device), targets.to(device)


def policy_loss_sum(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-sum over scored tokens of advantage * log p(token): the policy-gradient loss before normalisation.
    The model's cross-entropy is -log p with 0 at ignored targets (-1), so ignored tokens add nothing."""
    nll = model(inputs, targets, loss_reduction="none").view_as(inputs)  # (B, T)
    return (nll * advantages.to(nll.device, nll.dtype).unsqueeze(-1)).sum()


def accumulate_policy_gradient(model, groups: Sequence[Group], pad_id: int, device_batch_size: int,
                               autocast=contextlib.nullcontext(), baseline: str = "mean") -> float:
    """Backward of the policy-gradient loss of this rank's `groups` (one per question), normalised per forward
    pass as nanochat's RL normalises it: a pass over device_batch_size sequences of one group contributes
    -sum(advantage * log p) over its sampled tokens / (those tokens x the group's passes x the rank's groups).
    The distributed optimizers then average the ranks' gradients. Groups whose advantages (against `baseline`)
    are all zero are skipped, as they add exactly nothing (they still count among the rank's groups).
    Every parameter ends with a gradient (zeros if none flowed), so all ranks step all parameters alike.
    Returns this rank's loss."""
    device = model.get_device()
    loss_sum = 0.0
    for group in groups:
        advantages = group_advantages(group.rewards, baseline)
        if not advantages.any():
            continue
        starts = range(0, len(group.sequences), device_batch_size)
        for b0 in starts:
            b1 = b0 + device_batch_size
            inputs, targets = policy_batch(group.sequences[b0:b1], group.masks[b0:b1], pad_id, device)
            scored = max(int((targets >= 0).sum()), 1)
            with autocast:
                loss = policy_loss_sum(model, inputs, targets, advantages[b0:b1]) / (scored * len(starts) * len(groups))
            loss.backward()
            loss_sum += loss.item()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return loss_sum


# -----------------------------------------------------------------------------
# Evaluation

def pass_at_k_counts(outcomes: Sequence[Sequence[bool]], k: int) -> list[int]:
    """For j = 1..k, how many problems have a correct completion among their first j samples."""
    for row in outcomes:
        assert len(row) >= k, f"pass@{k} needs {k} samples per problem, got {len(row)}"
    return [sum(any(row[:j]) for row in outcomes) for j in range(1, k + 1)]


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, num_problems: int, k: int, max_new_tokens: int,
                       temperature: float, top_k: int | None, seed: int, rank: int = 0,
                       world_size: int = 1, rows_per_batch: int | None = None) -> tuple[list[int], int]:
    """(pass@1..k counts, problems) over this rank's share of the first num_problems problems, k samples
    each, several problems per forward pass (at most rows_per_batch rows; default k: one problem at a
    time). Problem i is sampled with seed + i from its own generator: the result depends neither on the
    ranks nor on how problems are batched."""
    per_batch = max(1, (rows_per_batch or k) // k)
    outcomes = [[bool(task.evaluate(conversation, completion)) for completion in completions]
                for _, conversation, completions in sample_problems(
                    task, engine, tokenizer, range(rank, num_problems, world_size), k, per_batch, max_new_tokens,
                    temperature, top_k, seed)]
    return pass_at_k_counts(outcomes, k), len(outcomes)


# -----------------------------------------------------------------------------
# Which questions a rank samples at a step

def step_questions(step: int, examples_per_step: int, num_questions: int, rank: int, world_size: int) -> list[int]:
    """Task indices of this rank's questions at `step`: the step takes the next examples_per_step questions
    in task order (cycling over epochs) and rank r takes every world_size-th of them, starting at r. A pure
    function of the step, so a resumed run picks up exactly where the interrupted one was."""
    assert examples_per_step % world_size == 0, f"{examples_per_step} questions do not split over {world_size} ranks"
    first = step * examples_per_step
    return [(first + i) % num_questions for i in range(rank, examples_per_step, world_size)]


def rng_state_to_json(rng: random.Random) -> list:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def rng_from_json(state: list) -> random.Random:
    rng = random.Random()
    version, internal, gauss_next = state
    rng.setstate((version, tuple(internal), gauss_next))
    return rng
