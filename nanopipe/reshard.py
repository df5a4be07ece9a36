"""
Resuming on another number of ranks: a checkpoint written by W processes, loaded by W' processes.

Optimizer state. Each rank's optimizer file holds that rank's shard (nanopipe.optim):
- Muon / DistMuon: a momentum buffer per matrix; under DistMuon only for the matrices the rank owns (within a
  shape group, matrix i belongs to rank i % W). Gathering takes each buffer from the rank that has it;
  splitting keeps the ones rank r' owns under W' (all of them for W' = 1, where the stage runs plain Muon).
- AdamW / DistAdamW: step, exp_avg and exp_avg_sq per parameter; under DistAdamW rank r holds rows
  [r*n, (r+1)*n) of a parameter whose first dim divides by W (n = rows / W), and the whole of any other
  parameter (replicated). Gathering concatenates the rows in rank order (or takes rank 0's replica); splitting
  cuts them for W' the same way. W' = 1 runs torch's AdamW, whose step is a float32 tensor, not an int.
The result is the state dict that a W'-rank optimizer holding the same (unsharded) state would save: the
param groups are the new optimizer's own (its implementation flags: fused, foreach, ...) with the values the
schedules and the run set (lr, initial_lr, momentum, ...) taken from the checkpoint.

Data position. Rank r of W reads global row groups r, r+W, ... (nanopipe.dataloader). Every rank's cursor is
mapped to a linear position (pass, global row group, row); the frontier F is one row group past the furthest
rank. Everything a W'-rank loader must still see is (a) the documents waiting in the W packing buffers, (b)
each old rank's unread rows before F (the rest of its current row group, its row groups before F), and (c)
every row group from F on. (a) and (b) are dealt round-robin, in data order, into the W' new buffers; (c) is
read with the W' layout (rank r' takes the row groups from F on that are congruent to r' mod W'). So no
document is read twice and none is skipped: the only tokens never trained on are the cropped tails of rows,
as in any run. The running statistics (cropped, packed tokens) are split evenly, the skipped-documents count
goes to rank 0.
"""

from __future__ import annotations

import bisect
import os
from typing import Sequence

import torch

from nanopipe.common import print0
from nanopipe.dataloader import STATE_VERSION, DataLoaderError, RowGroupReader
from nanopipe.exit_codes import ExitCode, StageError
from nanopipe.optim import DistAdamW, DistMuon, Muon

# param-group values a resume carries over (the rest of a group describes the implementation, not the run)
CARRIED_GROUP_KEYS = ("lr", "initial_lr", "momentum", "betas", "eps", "weight_decay", "nesterov", "ns_steps")


class ReshardError(StageError, ValueError):
    """Optimizer or loader state that cannot be re-sharded: the files do not describe this model or data."""

    exit_code = ExitCode.BAD_INPUT


# -----------------------------------------------------------------------------
# Optimizer state

def _params(opt: torch.optim.Optimizer) -> list[tuple[int, int, torch.Tensor]]:
    """(group index, position in the group, parameter) in state-dict index order."""
    return [(g, j, p) for g, group in enumerate(opt.param_groups) for j, p in enumerate(group["params"])]


def _check_groups(opt: torch.optim.Optimizer, states: Sequence[dict]) -> None:
    sizes = [len(group["params"]) for group in opt.param_groups]
    for rank, state in enumerate(states):
        found = [len(group["params"]) for group in state["param_groups"]]
        if found != sizes:
            raise ReshardError(f"the optimizer file of rank {rank} has param groups of sizes {found}, the model's "
                               f"{type(opt).__name__} has {sizes}: not this model's optimizer")


def gather_optimizer_state(opt: torch.optim.Optimizer, states: Sequence[dict]) -> dict[int, dict]:
    """Every parameter's whole state (index -> {name: value}) from the W shard state dicts of `opt`'s kind,
    step as an int. A parameter no rank has state for (never stepped) is left out."""
    _check_groups(opt, states)
    world = len(states)
    full: dict[int, dict] = {}
    for index, (_, _, p) in enumerate(_params(opt)):
        shards = [state["state"][index] for state in states if index in state["state"]]
        if not shards:
            continue
        if isinstance(opt, Muon):
            full[index] = {"momentum_buffer": shards[0]["momentum_buffer"].clone()}
            continue
        entry = {"step": int(shards[0]["step"])}
        for name in ("exp_avg", "exp_avg_sq"):
            if world > 1 and p.size(0) % world == 0:  # row slices, in rank order
                if len(shards) != world:
                    raise ReshardError(f"AdamW state of a parameter of shape {tuple(p.shape)} is on {len(shards)} "
                                       f"of {world} ranks")
                value = torch.cat([shard[name] for shard in shards])
            else:  # whole on every rank (or the only rank)
                value = shards[0][name].clone()
            if tuple(value.shape) != tuple(p.shape):
                raise ReshardError(f"AdamW {name} gathered from {world} rank(s) has shape {tuple(value.shape)}, "
                                   f"the parameter {tuple(p.shape)}")
            entry[name] = value
        full[index] = entry
    return full


def split_optimizer_state(opt: torch.optim.Optimizer, full: dict[int, dict], rank: int, world: int,
                          param_groups: Sequence[dict]) -> dict:
    """The state dict rank `rank` of `world` ranks would hold in `opt` for the whole state `full`; the values
    of CARRIED_GROUP_KEYS come from `param_groups` (a saved state dict's)."""
    if isinstance(opt, (DistMuon, DistAdamW)) != (world > 1):
        raise ReshardError(f"a {type(opt).__name__} does not run on {world} rank(s)")
    state: dict[int, dict] = {}
    for index, (_, j, p) in enumerate(_params(opt)):
        if index not in full:
            continue
        entry = full[index]
        if isinstance(opt, Muon):
            if j % world == rank:
                state[index] = {"momentum_buffer": entry["momentum_buffer"].clone()}
            continue
        if isinstance(opt, DistAdamW):
            if p.size(0) % world == 0:
                n = p.size(0) // world
                rows = slice(rank * n, (rank + 1) * n)
                state[index] = {"step": entry["step"], "exp_avg": entry["exp_avg"][rows].clone(),
                                "exp_avg_sq": entry["exp_avg_sq"][rows].clone()}
            else:
                state[index] = {"step": entry["step"], "exp_avg": entry["exp_avg"].clone(),
                                "exp_avg_sq": entry["exp_avg_sq"].clone()}
            continue
        # torch.optim.AdamW on one rank: its step is a float32 scalar tensor
        state[index] = {"step": torch.tensor(float(entry["step"]), dtype=torch.float32),
                        "exp_avg": entry["exp_avg"].clone(), "exp_avg_sq": entry["exp_avg_sq"].clone()}
    groups = opt.state_dict()["param_groups"]
    for group, saved in zip(groups, param_groups):
        for key in CARRIED_GROUP_KEYS:
            if key in group and key in saved:
                group[key] = saved[key]
    return {"state": state, "param_groups": groups}


def reshard_optimizer_state(opt: torch.optim.Optimizer, states: Sequence[dict], rank: int, world: int) -> dict:
    """The state dict for rank `rank` of `world` ranks of `opt` (built for that world) from the W saved shards."""
    return split_optimizer_state(opt, gather_optimizer_state(opt, states), rank, world, states[0]["param_groups"])


def restore_optimizers(optimizers: Sequence[torch.optim.Optimizer], own: Sequence[dict] | None,
                       all_ranks: Sequence[Sequence[dict]] | None, rank: int, world: int) -> None:
    """Load the optimizers' state: this rank's saved states (`own`, same world size) or, re-sharded, every old
    rank's (`all_ranks[r][i]` is old rank r's state of optimizers[i])."""
    if all_ranks is None:
        for opt, state in zip(optimizers, own):
            opt.load_state_dict(state)
        return
    for i, opt in enumerate(optimizers):
        opt.load_state_dict(reshard_optimizer_state(opt, [states[i] for states in all_ranks], rank, world))


def resharded_line(point, world_size: int, grad_accum: int) -> str:
    """What a resume on another number of ranks did, in one line; the old gradient accumulation from the
    batch sizes in the meta (None where a stage has none)."""
    meta, old = point.meta, point.written_by
    ranks = lambda n: f"{n} rank{'s' if n != 1 else ''}"
    line = (f"resuming step {point.step:,} written by {ranks(old)} on {ranks(world_size)}: optimizer re-sharded")
    try:
        before = meta["total_batch_size"] // (meta["device_batch_size"] * meta["max_seq_len"] * old)
    except (KeyError, TypeError, ZeroDivisionError):
        before = None
    if grad_accum is not None:
        line += f", grad accumulation {before if before is not None else '?'} \u2192 {grad_accum}"
    return line


# -----------------------------------------------------------------------------
# Data loader state

class _Layout:
    """Global row-group numbering of the shard files, and linear positions over the passes."""

    def __init__(self, reader: RowGroupReader):
        self.reader = reader
        self.counts = [reader.num_row_groups(fi) for fi in range(len(reader.files))]
        self.starts = [sum(self.counts[:fi]) for fi in range(len(self.counts))]
        self.total = sum(self.counts)
        if self.total == 0:
            raise DataLoaderError(f"the shards in {reader.files[0].parent} have no row groups")

    def position(self, state: dict) -> tuple[int, int]:
        """(linear row group, row) of the next unread row of the rank whose loader state this is."""
        c, rank, world = state["cursor"], state["rank"], state["world_size"]
        epoch = c["epoch"]
        if c["file_index"] >= len(self.counts):
            g, row = self.total, 0
        elif not c["started"]:
            g, row = c["first_global_rg"] + (rank - c["first_global_rg"]) % world, 0
        else:
            g, row = c["first_global_rg"] + c["row_group"], c["row"]
        if g >= self.total:  # this pass is done: the rank's first row group of the next one
            epoch, g, row = epoch + 1, rank % world, 0
        return (epoch - 1) * self.total + g, row

    def doc_id(self, linear: int, row: int) -> tuple[int, int, int, int]:
        epoch, g = divmod(linear, self.total)
        fi = bisect.bisect_right(self.starts, g) - 1
        while self.counts[fi] == 0 or g >= self.starts[fi] + self.counts[fi]:  # files without row groups
            fi += 1
        return epoch + 1, fi, g - self.starts[fi], row

    def unread_docs(self, linear: int, first_row: int) -> tuple[list[tuple[int, int, int, int]], int]:
        """(ids of the non-empty documents of row group `linear` from `first_row` on, null/empty ones there)."""
        epoch, fi, rg, _ = self.doc_id(linear, 0)
        texts = self.reader.texts(fi, rg)
        rows = range(first_row, len(texts))
        ids = [(epoch, fi, rg, r) for r in rows if texts[r]]
        return ids, len(rows) - len(ids)

    def cursor_at(self, frontier: int, rank: int, world: int) -> dict:
        """The cursor of rank `rank` of `world` that reads its row groups from linear position `frontier` on."""
        epoch, g0 = divmod(frontier, self.total)
        g = g0 + (rank - g0) % world
        if g >= self.total:  # none left in this pass: the walk starts the next one
            return dict(epoch=epoch + 1, file_index=len(self.counts), row_group=0, row=0,
                        first_global_rg=self.total, started=False, skipped_docs=0)
        _, fi, rg, _ = self.doc_id(epoch * self.total + g, 0)
        return dict(epoch=epoch + 1, file_index=fi, row_group=rg, row=0, first_global_rg=self.starts[fi],
                    started=True, skipped_docs=0)


def reshard_loader_states(states: Sequence[dict], files: Sequence[str | os.PathLike], world_size: int) -> list[dict]:
    """BestFitLoader resume states for `world_size` ranks from the W states of a checkpoint (module docstring).
    Their buffer_tokens is None: the re-dealt buffers have no saved token count to check."""
    old_world = len(states)
    for r, state in enumerate(states):
        if state.get("version") != STATE_VERSION:
            raise DataLoaderError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["rank"] != r or state["world_size"] != old_world:
            raise ReshardError(f"loader state {r} of the checkpoint says rank {state['rank']} of "
                               f"{state['world_size']}, not rank {r} of {old_world}: the meta is damaged")
    layout = _Layout(RowGroupReader(files))
    positions = [layout.position(state) for state in states]
    frontier = max(linear for linear, _ in positions) + 1
    pending = [tuple(doc_id) for state in states for doc_id in state["buffer"]]
    skipped = sum(state["cursor"].get("skipped_docs", 0) for state in states)
    for r, (linear, row) in enumerate(positions):
        while linear < frontier:
            ids, empty = layout.unread_docs(linear, row)
            pending += ids
            skipped += empty
            linear, row = _next_owned(layout, linear, r, old_world), 0
    pending.sort(key=lambda d: ((d[0] - 1) * layout.total + layout.starts[d[1]] + d[2], d[3]))
    cropped = sum(state["cropped_tokens"] for state in states)
    packed = sum(state["packed_tokens"] for state in states)
    new_states = []
    for r in range(world_size):
        cursor = layout.cursor_at(frontier, r, world_size)
        if r == 0:
            cursor["skipped_docs"] = skipped
        new_states.append({"version": STATE_VERSION, "rank": r, "world_size": world_size, "cursor": cursor,
                           "buffer": [list(d) for d in pending[r::world_size]], "buffer_tokens": None,
                           "cropped_tokens": cropped // world_size, "packed_tokens": packed // world_size})
    return new_states


def _next_owned(layout: _Layout, linear: int, rank: int, world: int) -> int:
    """The linear position of rank `rank`'s row group after `linear` (row groups g = rank mod world, per pass)."""
    epoch, g = divmod(linear, layout.total)
    g += world
    if g >= layout.total:
        epoch, g = epoch + 1, rank % world
    return epoch * layout.total + g


# -----------------------------------------------------------------------------
# Chat loader states (nanopipe.chat_batches: rank r of W reads examples r, r+W, ... of each pass)

def _chat_linear(state: dict, position: int) -> tuple[int, int]:
    """(linear position over the passes, dataset index) of read position `position` of the rank of `state`."""
    n, rank, world = state["dataset_len"], state["rank"], state["world_size"]
    per_pass = len(range(rank, n, world))
    epoch, k = divmod(position, per_pass)
    index = rank + k * world
    return epoch * n + index, index


def _chat_position(frontier: int, n: int, rank: int, world: int) -> int:
    """The read position of rank `rank` of `world` whose next example is the first of its own from `frontier` on."""
    epoch, g0 = divmod(frontier, n)
    k = max(0, -(-(g0 - rank) // world))
    if rank + k * world >= n:
        epoch, k = epoch + 1, 0
    return epoch * len(range(rank, n, world)) + k


def reshard_chat_loader_states(states: Sequence[dict], world_size: int) -> list[dict]:
    """Chat loader resume states for `world_size` ranks from a checkpoint's W states. The new ranks read on from
    the example after the furthest rank's. A packed (mid-training) loader also gets the conversations waiting in
    the old buffers and those the slower ranks had not read yet, dealt round-robin: none twice, none skipped.
    A padded (SFT) batcher has no buffer: the examples the slower ranks had not reached are skipped, at most
    the difference in examples read between ranks (it reads one conversation per row, so ranks differ only by
    the unsupervised ones they dropped; with equal progress nothing is skipped)."""
    old_world = len(states)
    kinds = {state.get("kind") for state in states}
    if len(kinds) != 1 or kinds - {"packed", "padded"}:
        raise ReshardError(f"loader states of kinds {sorted(map(str, kinds))} cannot be re-sharded")
    kind = kinds.pop()
    for r, state in enumerate(states):
        if state["rank"] != r or state["world_size"] != old_world:
            raise ReshardError(f"loader state {r} of the checkpoint says rank {state['rank']} of "
                               f"{state['world_size']}, not rank {r} of {old_world}: the meta is damaged")
    n = states[0]["dataset_len"]
    # packed: just past the furthest rank's next example; padded: where ranks that read as many examples as the
    # furthest one would all be (rank r's next example is r past it), so equal progress loses nothing
    frontier = max(_chat_linear(state, state["position"])[0] - (r if kind == "padded" else 0)
                   for r, state in enumerate(states))
    pending = [index for state in states for index in state.get("buffer", [])]
    for state in states:
        position = state["position"]
        while (here := _chat_linear(state, position))[0] < frontier:
            pending.append(here[1])
            position += 1
    skipped = 0 if kind == "packed" else len(pending)
    new_states = []
    for r in range(world_size):
        state = {**states[0], "rank": r, "world_size": world_size,
                 "position": _chat_position(frontier, n, r, world_size)}
        for key in ("consumed", "cropped", "pad_tokens", "rows", "cut", "dropped"):
            if key in state:
                state[key] = sum(s[key] for s in states) // world_size
        if kind == "packed":
            state["buffer"] = pending[r::world_size]
        new_states.append(state)
    if skipped:
        print0(f"re-sharding the SFT data position skipped {skipped} example(s) the slower ranks had not reached")
    return new_states
