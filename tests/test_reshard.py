"""Re-sharding a checkpoint for another number of ranks: the optimizer state a W'-rank run would hold (bit for
bit, against optimizers that stepped on W' gloo ranks) and the data position (every document exactly once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanopipe.gpt as gpt_module
from nanopipe.dataloader import BestFitLoader, RowGroupReader
from nanopipe.gpt import GPT, GPTConfig
from nanopipe.optim import DistAdamW, DistMuon, Muon
from nanopipe.reshard import ReshardError, reshard_loader_states, reshard_optimizer_state
from tests.fixtures.tiny_corpus import write_shard

pytestmark = pytest.mark.usefixtures("one_thread")

# vocab 130 pads to 192 rows: split by 2 and 3 ranks in DistAdamW; width 64 (64 rows) splits by 2, not by 3
CONFIG = dict(sequence_len=32, vocab_size=130, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
STEPS = 2


def optimizers_for(world: int) -> list:
    """The optimizers setup_optimizers builds on `world` ranks, over the same seeded tiny model."""
    torch.manual_seed(0)
    model = GPT.create(GPTConfig(**CONFIG), device="cpu")
    real = gpt_module.is_distributed
    gpt_module.is_distributed = lambda: world > 1  # the kind of optimizer, without a process group
    try:
        return model.setup_optimizers()
    finally:
        gpt_module.is_distributed = real


def step_on_identical_gradients(optimizers: list) -> None:
    """STEPS steps on gradients of a few bits (k/16): averaging W identical copies over gloo is then exact, so
    every world size sees the same gradient and any difference in the state is the layout's."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randint(-8, 9, p.shape, generator=gen).float() / 16
        for opt in optimizers:
            opt.step()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        optimizers = optimizers_for(world)
        step_on_identical_gradients(optimizers)
        torch.save([opt.state_dict() for opt in optimizers], Path(out_dir) / f"w{world}_r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained_states(tmp_path_factory) -> dict[int, list[list[dict]]]:
    """{world size: [rank r's [AdamW state, Muon state]]} after stepping on 1, 2 and 3 ranks."""
    out = tmp_path_factory.mktemp("optim")
    optimizers = optimizers_for(1)
    step_on_identical_gradients(optimizers)
    states = {1: [[opt.state_dict() for opt in optimizers]]}
    for world in (2, 3):
        mp.spawn(_worker, args=(world, str(out / f"init{world}"), str(out)), nprocs=world, join=True)
        states[world] = [torch.load(out / f"w{world}_r{r}.pt", weights_only=True) for r in range(world)]
    return states


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got["state"]) == sorted(want["state"])
    for index, entry in want["state"].items():
        assert sorted(got["state"][index]) == sorted(entry), index
        for name, value in entry.items():
            other = got["state"][index][name]
            if torch.is_tensor(value):
                assert torch.is_tensor(other) and other.dtype == value.dtype, (index, name)
                assert torch.equal(other, value), (index, name)  # bit for bit
            else:
                assert type(other) is type(value) and other == value, (index, name)
    assert got["param_groups"] == want["param_groups"]


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (3, 2), (3, 1)])
def test_resharded_state_is_the_state_the_new_world_holds(trained_states, old, new):
    fresh = optimizers_for(new)
    assert isinstance(fresh[0], DistAdamW if new > 1 else torch.optim.AdamW)
    assert isinstance(fresh[1], DistMuon if new > 1 else Muon)
    for rank in range(new):
        for i, opt in enumerate(fresh):
            got = reshard_optimizer_state(opt, [states[i] for states in trained_states[old]], rank, new)
            assert_same_state(got, trained_states[new][rank][i])
    # and it loads: the optimizer then saves exactly that state
    opt = optimizers_for(new)[0]
    opt.load_state_dict(reshard_optimizer_state(opt, [s[0] for s in trained_states[old]], new - 1, new))
    assert_same_state(opt.state_dict(), trained_states[new][new - 1][0])


def test_a_foreign_optimizer_file_is_refused(trained_states):
    adamw, muon = optimizers_for(2)
    with pytest.raises(ReshardError, match="param groups of sizes"):
        reshard_optimizer_state(muon, [states[0] for states in trained_states[2]], 0, 2)  # AdamW's files
    with pytest.raises(ReshardError, match="does not run on 1 rank"):
        reshard_optimizer_state(adamw, [states[0] for states in trained_states[2]], 0, 1)


# -----------------------------------------------------------------------------
# Data position

class NumberTokenizer:
    """'d<i>:<n>' -> -(i + 1) in place of BOS, then n tokens: a row's negative tokens name the documents that start
    there (one cropped right after its first token included)."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, texts, prepend=None, num_threads=None):
        out = []
        for text in texts:
            index, length = (int(x) for x in text[1:].split(":"))
            out.append([-(index + 1)] + [index + 1] * length)
        return out


def documents_in(batch) -> list[int]:
    """Indices of the documents whose (possibly cropped) start lies in the rows of a batch."""
    inputs, targets = batch
    rows = torch.cat([inputs, targets[:, -1:]], dim=1)
    return [-int(token) - 1 for token in rows.flatten() if token < 0]


def remaining(states: list[dict], reader: RowGroupReader, texts: list[str | None]) -> list[int]:
    """Documents of the first pass the loaders with these states have still to place: buffered or unread."""
    counts = [reader.num_row_groups(fi) for fi in range(len(reader.files))]
    starts = [sum(counts[:fi]) for fi in range(len(counts))]
    per_group = 6
    docs = []
    for state in states:
        docs += [starts[fi] * per_group + rg * per_group + row for epoch, fi, rg, row in state["buffer"] if epoch == 1]
        c, rank, world = state["cursor"], state["rank"], state["world_size"]
        if c["epoch"] != 1 or c["file_index"] >= len(counts):
            continue
        first = c["first_global_rg"] + (c["row_group"] if c["started"] else (rank - c["first_global_rg"]) % world)
        row = c["row"] if c["started"] else 0
        for g in range(first, sum(counts), world):
            docs += [g * per_group + r for r in range(row if g == first else 0, per_group)
                     if texts[g * per_group + r]]
    return docs


@pytest.mark.parametrize("new", [1, 3])
def test_resharded_loaders_place_every_document_once(tmp_path, new):
    """Two ranks read unevenly far (3 and 5 batches), their states are re-dealt to `new` ranks, which read on:
    over the first pass, the documents placed in rows before and after, plus those the new loaders still hold
    or have not reached, are every non-empty document exactly once."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (180,), generator=gen).tolist()
    texts: list[str | None] = [f"d{i}:{n}" for i, n in enumerate(lengths)]
    texts[7], texts[50] = None, ""  # skipped, never placed
    files = [write_shard(tmp_path / "a.parquet", texts[:66], row_group_docs=6),
             write_shard(tmp_path / "b.parquet", texts[66:], row_group_docs=6)]
    kwargs = dict(batch_size=2, seq_len=24, buffer_docs=8, tokenizer_batch_docs=4, tokenizer_threads=1)
    placed, old_states = [], []
    for rank, batches in ((0, 3), (1, 5)):
        with BestFitLoader(NumberTokenizer(), files, rank=rank, world_size=2, **kwargs) as loader:
            for _ in range(batches):
                placed += documents_in(next(loader))
            old_states.append(loader.state_dict())
    new_states = reshard_loader_states(old_states, files, new)
    assert [s["rank"] for s in new_states] == list(range(new)) and {s["world_size"] for s in new_states} == {new}
    final_states = []
    for rank, state in enumerate(new_states):
        with BestFitLoader(NumberTokenizer(), files, rank=rank, world_size=new, resume_state=state, **kwargs) as loader:
            for _ in range(4):
                placed += documents_in(next(loader))
            final_states.append(loader.state_dict())
    assert all(s["cursor"]["epoch"] == 1 for s in final_states)  # still in the first pass: nothing wraps around
    left = remaining(final_states, RowGroupReader(files), texts)
    everything = sorted(placed + left)
    assert everything == [i for i, text in enumerate(texts) if text]  # none twice, none skipped
    assert len(placed) > 30 and left  # both sides of the resume did real work
    assert sum(s["cursor"]["skipped_docs"] for s in final_states) >= 1


def test_a_damaged_loader_state_is_refused(tmp_path):
    files = [write_shard(tmp_path / "a.parquet", [f"d{i}:5" for i in range(12)], row_group_docs=6)]
    with BestFitLoader(NumberTokenizer(), files, batch_size=1, seq_len=8, tokenizer_threads=1) as loader:
        next(loader)
        state = loader.state_dict()
    with pytest.raises(ReshardError, match="says rank 0 of 1, not rank 0 of 2"):
        reshard_loader_states([state, state], files, 1)
