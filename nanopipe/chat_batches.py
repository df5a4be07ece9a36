"""
How conversations become training batches for the chat stages, each layout with an exact-resume state, and the
chat loss over such batches.

    loader = PackedChatLoader(tokenizer, mixture, batch_size=32, seq_len=2048, rank=r, world_size=W)
    inputs, targets = next(loader)    # whole conversations best-fit packed into BOS-aligned rows; pads -1
    batcher = PaddedChatBatcher(tokenizer, mixture, batch_size=4, max_tokens=2048, rank=r, world_size=W)
    inputs, targets = next(batcher)   # one conversation per row, targets only on the assistant's tokens
    state = loader.state_dict(); PackedChatLoader(..., resume_state=state)   # continues exactly
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from nanopipe.chat_format import render_conversation
from nanopipe.exit_codes import ExitCode, StageError

LOADER_STATE_VERSION = 1


class ChatDataError(StageError, ValueError):
    """The chat data cannot make the batches asked for: a loader state saved for other data or another layout,
    or no example that keeps a supervised token. Bad input (exit 2), in one line."""

    exit_code = ExitCode.BAD_INPUT


# -----------------------------------------------------------------------------
# The rank's view of a dataset: positions 0, 1, 2, ... are examples rank, rank + W, rank + 2W, ..., wrapping
# around at the end (the next pass). A position is all the loaders need to resume.

class RankStride:
    def __init__(self, dataset_len: int, rank: int, world_size: int):
        assert 0 <= rank < world_size, f"rank {rank} is not in [0, {world_size})"
        self.per_pass = len(range(rank, dataset_len, world_size))
        if self.per_pass == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no examples from a dataset of {dataset_len}: "
                             f"use fewer processes or more data")
        self.rank, self.world_size = rank, world_size

    def index(self, position: int) -> int:
        return self.rank + (position % self.per_pass) * self.world_size

    def epoch(self, position: int) -> int:
        """1-based pass over the data that `position` belongs to."""
        return position // self.per_pass + 1


def _check_state(state: dict, kind: str, rank: int, world_size: int, dataset_len: int) -> None:
    if state.get("version") != LOADER_STATE_VERSION or state.get("kind") != kind:
        raise ChatDataError(f"loader state {state.get('kind')!r} v{state.get('version')!r} is not a {kind} "
                            f"state v{LOADER_STATE_VERSION}: the checkpoint was written by another stage")
    if (state["rank"], state["world_size"]) != (rank, world_size):
        raise ValueError(f"loader state was saved by rank {state['rank']} of {state['world_size']}, this is rank "
                         f"{rank} of {world_size}: resume with the same number of processes")
    if state["dataset_len"] != dataset_len:
        raise ChatDataError(f"loader state is for a mixture of {state['dataset_len']} examples, this one has "
                            f"{dataset_len}: the training data changed since the checkpoint (resume with the "
                            f"same data flags, or start a new run in another --out_dir)")


def _to_device(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device):
    if device.type == "cuda":
        return (inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True))
    return inputs.to(device), targets.to(device)


# -----------------------------------------------------------------------------
# Mid-training batches: whole conversations best-fit packed into BOS-aligned rows

class PackedChatLoader:
    """Infinite iterator of (inputs, targets) int64 [B, T]: every row holds T+1 tokens of whole conversations.

    Conversations (each begins with <|bos|>) wait in a buffer of `buffer_size`; a row is filled with the
    longest one that still fits entirely, again and again. When none fits, the rest of the row is padding
    (<|bos|> inputs, -1 targets) instead of a cropped conversation, so no conversation that fits in a row is
    ever cut. Only a conversation longer than a whole row is cropped (to T+1 tokens, counted in `cropped`).
    Every token of a conversation is a target (mid-training learns the format, not just the answers).

    state_dict() is the resume point after the last batch returned: the rank's read position and the
    dataset indices waiting in the buffer, in order (they are re-rendered on resume: rendering is
    deterministic). `consumed` counts the conversations this rank has placed in rows.
    """

    def __init__(self, tokenizer, dataset, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", buffer_size: int = 100, resume_state: dict | None = None):
        assert batch_size >= 1 and seq_len >= 1 and buffer_size >= 1, (batch_size, seq_len, buffer_size)
        self.tokenizer, self.dataset = tokenizer, dataset
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.stride = RankStride(len(dataset), rank, world_size)
        self.position = 0                              # next read position of this rank
        self.buffer: list[tuple[int, list[int]]] = []  # (dataset index, token ids), in arrival order
        self.consumed = self.cropped = self.pad_tokens = self.rows = 0
        if resume_state is not None:
            self._restore(resume_state)

    def _render(self, index: int) -> list[int]:
        ids, _ = render_conversation(self.tokenizer, self.dataset[index], max_tokens=None)
        if len(ids) > self.T + 1:
            self.cropped += 1
            ids = ids[:self.T + 1]
        return ids

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            index = self.stride.index(self.position)
            self.buffer.append((index, self._render(index)))
            self.position += 1

    def _take_best_fit(self, space: int) -> list[int] | None:
        best = -1
        for i, (_, ids) in enumerate(self.buffer):  # the longest that fits; the earliest among equals
            if len(ids) <= space and (best < 0 or len(ids) > len(self.buffer[best][1])):
                best = i
        if best < 0:
            return None
        self.consumed += 1
        return self.buffer.pop(best)[1]

    def _row(self) -> tuple[list[int], int]:
        """One row of T+1 tokens and the length of its content (the rest is padding)."""
        capacity, row = self.T + 1, []
        while len(row) < capacity:
            self._refill()
            ids = self._take_best_fit(capacity - len(row))
            if ids is None:
                break
            row.extend(ids)
        content = len(row)
        assert content > 0, f"no conversation fits an empty row of {capacity} tokens (they are cropped to it)"
        self.pad_tokens += capacity - content
        return row + [self.bos] * (capacity - content), content

    def __iter__(self) -> "PackedChatLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, contents = zip(*(self._row() for _ in range(self.B)))
        self.rows += self.B
        batch = torch.tensor(rows, dtype=torch.long)
        inputs, targets = batch[:, :-1].clone(), batch[:, 1:].clone()
        for i, content in enumerate(contents):
            targets[i, content - 1:] = -1  # predicting padding teaches nothing
        return _to_device(inputs, targets, self.device)

    @property
    def epoch(self) -> int:
        """1-based pass over this rank's share of the data, by conversations placed in rows."""
        return self.consumed // self.stride.per_pass + 1

    def state_dict(self) -> dict:
        return {"version": LOADER_STATE_VERSION, "kind": "packed", "rank": self.rank, "world_size": self.world_size,
                "dataset_len": len(self.dataset), "position": self.position,
                "buffer": [index for index, _ in self.buffer], "consumed": self.consumed, "cropped": self.cropped,
                "pad_tokens": self.pad_tokens, "rows": self.rows}

    def _restore(self, state: dict) -> None:
        _check_state(state, "packed", self.rank, self.world_size, len(self.dataset))
        cropped = state["cropped"]
        self.buffer = [(index, self._render(index)) for index in state["buffer"]]
        self.position, self.consumed, self.cropped = state["position"], state["consumed"], cropped
        self.pad_tokens, self.rows = state["pad_tokens"], state["rows"]

    def pad_fraction(self) -> float:
        return self.pad_tokens / (self.rows * (self.T + 1)) if self.rows else 0.0


# -----------------------------------------------------------------------------
# SFT batches: one conversation per row, padded to the longest of the micro-batch

class PaddedChatBatcher:
    """Infinite iterator of (inputs, targets) int64 [B, L], L = the longest conversation of the batch minus 1.

    Conversations are rendered and cut to max_tokens; targets are the next tokens where the assistant wrote
    them (render mask 1) and -1 everywhere else, padding included (inputs are padded with
    <|assistant_end|>, which the loss never sees). A conversation cut before any assistant token would teach
    nothing: with `drop_unsupervised` it is skipped. `cut` and `dropped` count both among the conversations
    read (`position`). state_dict() is the read position (and the counts) after the last batch.
    """

    def __init__(self, tokenizer, dataset, batch_size: int, max_tokens: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", resume_state: dict | None = None, drop_unsupervised: bool = True):
        assert batch_size >= 1 and max_tokens >= 2, (batch_size, max_tokens)
        self.tokenizer, self.dataset = tokenizer, dataset
        self.B, self.max_tokens = batch_size, max_tokens
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.drop_unsupervised = drop_unsupervised
        self.pad = tokenizer.encode_special("<|assistant_end|>")
        self.stride = RankStride(len(dataset), rank, world_size)
        self.position = self.cut = self.dropped = 0
        if resume_state is not None:
            _check_state(resume_state, "padded", rank, world_size, len(dataset))
            self.position = resume_state["position"]
            self.cut, self.dropped = resume_state.get("cut", 0), resume_state.get("dropped", 0)

    def __iter__(self) -> "PaddedChatBatcher":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rendered = [self._next_example() for _ in range(self.B)]
        return _to_device(*collate_supervised(rendered, self.pad), self.device)

    def _next_example(self) -> tuple[list[int], list[int]]:
        """(ids, mask) of the next conversation to train on, cut to max_tokens."""
        for _ in range(self.stride.per_pass):
            ids, mask = render_conversation(self.tokenizer, self.dataset[self.stride.index(self.position)],
                                            max_tokens=None)
            self.position += 1
            if len(ids) > self.max_tokens:
                self.cut += 1
                ids, mask = ids[:self.max_tokens], mask[:self.max_tokens]
            if any(mask[1:]) or not self.drop_unsupervised:
                return ids, mask
            self.dropped += 1
        raise ChatDataError(f"none of the {self.stride.per_pass} conversations of rank {self.rank}'s share of the "
                            f"data keeps an assistant token within {self.max_tokens} tokens (the model's context): "
                            f"every one is cut before its answer")

    @property
    def epoch(self) -> int:
        return self.stride.epoch(max(0, self.position - 1))

    def state_dict(self) -> dict:
        return {"version": LOADER_STATE_VERSION, "kind": "padded", "rank": self.rank, "world_size": self.world_size,
                "dataset_len": len(self.dataset), "position": self.position, "cut": self.cut,
                "dropped": self.dropped}


def collate_supervised(rendered: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, L] of rendered (ids, mask) pairs: targets -1 where the mask is 0 and on padding."""
    width = max(len(ids) for ids, _ in rendered) - 1
    assert width >= 1, "every conversation renders to at least two tokens"
    inputs = torch.full((len(rendered), width), pad, dtype=torch.long)
    targets = torch.full((len(rendered), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask[1:], dtype=torch.bool)
        inputs[row, :n] = ids_t[:-1]
        targets[row, :n] = torch.where(mask_t, ids_t[1:], -1)
    return inputs, targets


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_chat_loss(model, batches: Iterator, steps: int, token_bytes: torch.Tensor) -> dict:
    """Mean loss in nats per target token (targets -1 ignored) and bits per byte (special tokens, which have no
    bytes, left out of bpb only) over `steps` batches, summed over every rank; None where nothing was counted."""
    assert steps >= 1, f"evaluate_chat_loss needs at least one step, got {steps}"
    device = token_bytes.device
    acc = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(4, dtype=acc, device=device)  # nats (all targets), targets, nats (with bytes), bytes
    for _ in range(steps):
        inputs, targets = next(batches)
        losses = model(inputs, targets, loss_reduction="none").reshape(-1).to(acc)
        targets = targets.reshape(-1)
        valid = targets >= 0
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)
        counted = nbytes > 0
        sums += torch.stack([torch.where(valid, losses, 0.0).sum(), valid.sum().to(acc),
                             torch.where(counted, losses, 0.0).sum(), nbytes.sum().to(acc)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    nats, count, byte_nats, nbytes = sums.tolist()
    # no target token, no measurement: None (JSON null in metrics and progress lines), never NaN
    return {"loss": nats / count if count else None,
            "bpb": byte_nats / (math.log(2) * nbytes) if nbytes else None,
            "tokens": int(count)}


def show_metric(value: float | None, spec: str = ".6f") -> str:
    """A metric for a log line; 'n/a' for one that had nothing to measure (None)."""
    return "n/a" if value is None else format(value, spec)


def sum_across_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def supervised_loss(model, inputs: torch.Tensor, targets: torch.Tensor, per: str = "token") -> torch.Tensor:
    """Mean cross-entropy of the supervised targets; 0 (with a gradient of 0) when a batch has none.

    per="token" (nanochat's): the mean over every supervised token of the batch, so a long answer weighs as
    many times more as it has tokens. per="conversation": each row's mean, then the mean over the rows that
    have a supervised token, so a one-letter answer weighs as much as a long one.
    """
    assert per in ("token", "conversation"), f"per must be token or conversation, got {per!r}"
    supervised = targets >= 0
    if per == "token":
        return model(inputs, targets, loss_reduction="sum") / supervised.sum().clamp(min=1)
    losses = model(inputs, targets, loss_reduction="none").view_as(targets)
    per_row = supervised.sum(dim=1)
    row_means = losses.sum(dim=1) / per_row.clamp(min=1)
    return row_means.sum() / (per_row > 0).sum().clamp(min=1)
