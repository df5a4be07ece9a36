"""The BOS-aligned best-fit loader: whole documents, minimal cropping, disjoint ranks, exact resume."""

from __future__ import annotations

import gc
import json
import random
import re
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanopipe.dataloader import BestFitLoader, BestFitPacker, Cursor, DataLoaderError, RowGroupReader, walk_documents
from tests.fixtures.tiny_corpus import build_tokenizer, shakespeare_paragraphs, write_shard

B, T = 4, 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def marked_docs():
    """Shakespeare paragraphs, each tagged with a unique marker so that a row tells which document it holds."""
    paragraphs = shakespeare_paragraphs()[:600]
    return [f"doc{i:04d}x {p}" for i, p in enumerate(paragraphs)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, marked_docs):
    root = tmp_path_factory.mktemp("shards")
    return [write_shard(root / f"shard_{i:05d}.parquet", marked_docs[i * 200:(i + 1) * 200], row_group_docs=25)
            for i in range(3)]


def take(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


def segments(row: list[int], bos: int) -> list[list[int]]:
    """Split a row at its BOS tokens: one segment per document (piece)."""
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


# -----------------------------------------------------------------------------
# Packing

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 150), min_size=1, max_size=60), capacity=st.integers(1, 120))
def test_packer_takes_longest_fit_and_crops_only_when_nothing_fits(lengths, capacity):
    packer = BestFitPacker()
    for i, n in enumerate(lengths):
        packer.add((1, 0, 0, i), list(range(n)))
    while len(packer):
        buffered = list(packer.order.values())
        fits = [n for n in buffered if n <= capacity]
        tokens, cropped = packer.take(capacity)
        if fits:  # the longest document that fits, whole
            assert cropped == 0 and len(tokens) == max(fits)
        else:  # nothing fits: the shortest document, cropped to fill the space exactly
            assert len(tokens) == capacity and capacity + cropped == min(buffered)


def test_rows_start_with_bos_and_hold_whole_documents(tok, shards, marked_docs):
    bos = tok.get_bos_token_id()
    encoded = {tuple(ids) for ids in tok.encode(marked_docs, prepend=bos)}
    with BestFitLoader(tok, shards, B, T) as loader:
        batches = take(loader, 20)
        crop_fraction = loader.crop_fraction()
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
        rows = torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
        for row in rows:
            assert row[0] == bos
            pieces = segments(row, bos)
            # every document but the last of a row is whole; the last may be cropped to fill the row
            for piece in pieces[:-1]:
                assert tuple(piece) in encoded
            assert any(doc[:len(pieces[-1])] == tuple(pieces[-1]) for doc in encoded)
    # 28% of these paragraphs are longer than a row (40% of their tokens lie past one row), yet best fit,
    # preferring the short ones, loses far less than that
    assert 0 < crop_fraction < 0.25


def test_best_fit_crops_less_than_sequential_packing(tok, shards, marked_docs):
    """The same documents packed in reading order (crop whatever does not fit) waste far more."""
    with BestFitLoader(tok, shards, B, T) as loader:
        take(loader, 30)
        best_fit = loader.crop_fraction()
    cropped = total = filled = 0
    for doc in tok.encode(marked_docs, prepend=tok.get_bos_token_id()):
        keep = min(len(doc), T + 1 - filled)
        cropped, total, filled = cropped + len(doc) - keep, total + len(doc), (filled + keep) % (T + 1)
        if total >= 30 * B * (T + 1):
            break
    sequential = cropped / total
    assert best_fit < 0.5 * sequential, (best_fit, sequential)


# -----------------------------------------------------------------------------
# Distribution

def markers(batches, tok) -> set[str]:
    found = set()
    for inputs, _ in batches:
        for row in inputs.tolist():
            found.update(re.findall(r"doc\d{4}x", tok.decode(row)))
    return found


def test_ranks_read_disjoint_documents(tok, shards):
    seen = []
    for rank in range(2):
        with BestFitLoader(tok, shards, B, T, rank=rank, world_size=2) as loader:
            seen.append(markers(take(loader, 25), tok))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_walk_deals_every_row_group_to_exactly_one_rank(shards):
    reader = RowGroupReader(shards)
    world = 3
    per_rank = []
    for rank in range(world):
        cursor, ids = Cursor(), []
        for chunk_ids, _ in walk_documents(reader, cursor, rank, world, chunk_docs=7):
            if chunk_ids[0][0] > 1:  # epoch 2 begins
                break
            ids += [doc_id[1:] for doc_id in chunk_ids]
        per_rank.append(ids)
    everything = sorted(i for ids in per_rank for i in ids)
    expected = sorted((f, rg, row) for f in range(3) for rg in range(8) for row in range(25))
    assert everything == expected  # each document of the epoch exactly once, over the three ranks
    groups = [{(f, rg) for f, rg, _ in ids} for ids in per_rank]
    assert all(len(g) == 8 for g in groups)  # 24 row groups dealt evenly


def test_a_rank_without_row_groups_is_an_error_not_a_hang(tok, tmp_path):
    shard = write_shard(tmp_path / "one.parquet", ["a single tiny document"] * 3, row_group_docs=10)
    loader = BestFitLoader(tok, [shard], B, T, rank=1, world_size=2)
    with pytest.raises(DataLoaderError, match=r"rank 1 of 2 gets no documents.*one\.parquet"):
        next(loader)
    loader.close()


# -----------------------------------------------------------------------------
# Resume

@pytest.mark.parametrize("skip, buffer_docs", [(1, 1000), (13, 1000), (70, 50)])
def test_resume_continues_with_exactly_the_next_batch(tok, shards, skip, buffer_docs):
    kwargs = dict(rank=1, world_size=2, buffer_docs=buffer_docs)
    with BestFitLoader(tok, shards, B, T, **kwargs) as loader:
        take(loader, skip)
        state = json.loads(json.dumps(loader.state_dict()))  # it must survive the meta.json round trip
        expected = take(loader, 8)
        epoch = loader.epoch
    if skip == 70:
        assert epoch == 2  # the resume point lies past the end of the data: the second pass
    with BestFitLoader(tok, shards, B, T, resume_state=state, **kwargs) as resumed:
        got = take(resumed, 8)
    for (x0, y0), (x1, y1) in zip(expected, got):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_state_of_a_fresh_loader_restarts_from_the_beginning(tok, shards):
    with BestFitLoader(tok, shards, B, T) as loader:
        state = loader.state_dict()
        first = take(loader, 3)
    with BestFitLoader(tok, shards, B, T, resume_state=state) as again:
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, take(again, 3)))


def test_resume_refuses_another_world_size(tok, shards):
    with BestFitLoader(tok, shards, B, T, rank=0, world_size=2) as loader:
        next(loader)
        state = loader.state_dict()
    with pytest.raises(DataLoaderError, match="rank 0 of 2.*same number of processes"):
        BestFitLoader(tok, shards, B, T, rank=0, world_size=1, resume_state=state)


def test_resume_detects_changed_shards(tok, shards, tmp_path, marked_docs):
    with BestFitLoader(tok, shards, B, T) as loader:
        take(loader, 3)
        state = loader.state_dict()
    shuffled = list(marked_docs[:200])
    random.Random(0).shuffle(shuffled)
    changed = [write_shard(tmp_path / "shard_00000.parquet", shuffled, row_group_docs=25), *shards[1:]]
    with pytest.raises(DataLoaderError, match="changed"):
        BestFitLoader(tok, changed, B, T, resume_state=state)


# -----------------------------------------------------------------------------
# Files and threads

def test_bad_shards_are_named(tok, tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataLoaderError, match="nope.parquet does not exist"):
        next(BestFitLoader(tok, [missing], B, T))
    import pyarrow as pa
    import pyarrow.parquet as pq
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), wrong)
    with pytest.raises(DataLoaderError, match="wrong.parquet has no 'text' column"):
        next(BestFitLoader(tok, [wrong], B, T))


def test_background_thread_stops_when_closed_or_dropped(tok, shards):
    def producers():
        return [t for t in threading.enumerate() if t.name.startswith("bestfit-loader")]

    before = len(producers())
    loader = BestFitLoader(tok, shards, B, T)
    next(loader)
    loader.close()
    dropped = BestFitLoader(tok, shards, B, T)
    next(dropped)
    del dropped
    gc.collect()
    deadline = time.time() + 5
    while len(producers()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(producers()) == before


def test_compute_cleanup_stops_live_loaders(tok, shards):
    from nanopipe.common import compute_cleanup
    loader = BestFitLoader(tok, shards, B, T)
    next(loader)
    compute_cleanup()  # not distributed here: only its cleanup hooks run
    assert not loader._thread.is_alive()
    with pytest.raises(DataLoaderError, match="closed"):  # not a hang on the empty queue
        next(loader)
