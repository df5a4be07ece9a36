"""
Pretraining batches: BOS-aligned best-fit packing over parquet shards, tokenised in a background thread.

    loader = BestFitLoader(tokenizer, shards.train, batch_size=32, seq_len=2048, device="cuda",
                           rank=rank, world_size=world_size)
    inputs, targets = next(loader)        # int64 [B, T] on the device
    state = loader.state_dict()           # resume point: the next batch after the one just returned
    loader = BestFitLoader(..., resume_state=state)   # yields exactly that next batch

Packing. Null and empty documents are skipped (counted in the state as `skipped_docs`): a row of BOS tokens
teaches nothing. Every other document is tokenised with a BOS token in front. Each row of a batch holds T+1 tokens (inputs
are the first T, targets the last T) and starts at a document boundary, so every token can attend back to
the BOS of its own document. Rows are filled from a buffer of whole documents: always the longest document
that still fits entirely; only when none fits is one document cropped to fill the row exactly, and then the
shortest one (least waste). No padding: every position is trained on.

Distribution. Row groups are numbered globally across the files (in file order) and rank r reads row groups
r, r+W, r+2W, ... of that numbering, so ranks never see the same document. Passes over the data repeat
forever, counted by `epoch` (1-based).

Exact resume. The state holds the read cursor (file, row group, next row, epoch) and the identity of every
document waiting in the packing buffer; restoring re-reads and re-tokenises those documents, so the packer
continues exactly as if it had never stopped. A checksum of the buffered token count catches shards that
changed underneath a checkpoint.

Degenerate data. Pass `planned_tokens` (what the whole run will draw) and the loader estimates, before the
first batch, how many passes over the data that is, and warns in one line past MANY_EPOCHS. A shard that
cannot be read mid-run raises a DataLoaderError naming the file and row group (a stage exits 2 on it).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanopipe.common import on_cleanup
from nanopipe.data.shards import TEXT_COLUMN, DataError, TextStats, read_texts, text_stats

STATE_VERSION = 1
MANY_EPOCHS = 10  # more passes than this over the training data is worth a warning

# Loaders whose producer thread may still run; stopped (and joined) by compute_cleanup, before the process
# group goes, and at interpreter exit at the latest, because a daemon thread killed in the middle of a native
# tokeniser or torch call aborts the process.
_LIVE_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
@on_cleanup
def _stop_all_loaders() -> None:
    for loader in list(_LIVE_LOADERS):
        loader.close()


class DataLoaderError(DataError, RuntimeError):
    """The shards cannot feed this loader (missing/malformed file, no data for a rank, changed data).

    A bad input (a DataError): a stage reports it in one line and exits with BAD_INPUT (2)."""


# -----------------------------------------------------------------------------
# Reading: a resumable walk over this rank's row groups

@dataclass
class Cursor:
    """Where the next unread document of this rank is."""
    epoch: int = 1          # 1-based pass over the data
    file_index: int = 0     # index into the file list
    row_group: int = 0      # row group inside that file (one of this rank's)
    row: int = 0            # next row (document) inside that row group
    first_global_rg: int = 0  # global number of row group 0 of `file_index`
    started: bool = False   # False until the walk has positioned itself on this rank's first row group
    skipped_docs: int = 0   # null or empty documents passed over so far (a running count, not a position)

    def as_dict(self) -> dict:
        return dict(epoch=self.epoch, file_index=self.file_index, row_group=self.row_group, row=self.row,
                    first_global_rg=self.first_global_rg, started=self.started, skipped_docs=self.skipped_docs)


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataLoaderError(f"data shard {path} does not exist") from None
    except (pa.ArrowException, OSError) as err:  # pyarrow raises several types for a corrupt footer
        raise DataLoaderError(f"data shard {path} is not a readable parquet file: {err}") from None
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise DataLoaderError(f"data shard {path} has no '{TEXT_COLUMN}' column (columns: {pf.schema_arrow.names})")
    return pf


class RowGroupReader:
    """Caches open parquet files; reads one row group's texts."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise DataLoaderError("the data loader was given no shard files")
        self._open: dict[int, pq.ParquetFile] = {}

    def parquet(self, file_index: int) -> pq.ParquetFile:
        if file_index not in self._open:
            self._open[file_index] = open_parquet(self.files[file_index])
        return self._open[file_index]

    def num_row_groups(self, file_index: int) -> int:
        return self.parquet(file_index).num_row_groups

    def texts(self, file_index: int, row_group: int) -> list[str | None]:
        """One row group's documents (None for a null row); a corrupt page or non-UTF-8 text is a DataError
        naming the file and the row group."""
        return read_texts(self.parquet(file_index), self.files[file_index], row_group)


def walk_documents(reader: RowGroupReader, cursor: Cursor, rank: int, world_size: int,
                   chunk_docs: int) -> Iterator[tuple[list[tuple[int, int, int, int]], list[str]]]:
    """Yield (doc ids, texts) chunks of at most chunk_docs non-empty documents, advancing `cursor` in place.

    A doc id is (epoch, file_index, row_group, row). After each yield the cursor points at the first document not
    yet yielded, so a walk restarted from a saved cursor continues with the same chunks. Null and empty
    documents are skipped and counted in cursor.skipped_docs.
    """
    # a rank that walks one whole pass from its very beginning without a document would loop forever
    pass_from_start = cursor.file_index == 0 and cursor.row == 0 and (
        not cursor.started or cursor.row_group == rank % world_size)
    docs_this_pass = 0
    while True:
        if cursor.file_index >= len(reader.files):
            if pass_from_start and docs_this_pass == 0:
                names = ", ".join(str(f) for f in reader.files[:3]) + (" ..." if len(reader.files) > 3 else "")
                raise DataLoaderError(
                    f"rank {rank} of {world_size} gets no documents from {len(reader.files)} shard(s) "
                    f"({names}; {cursor.skipped_docs:,} null or empty skipped so far): they hold no text, or fewer "
                    f"non-empty row groups than ranks; use real text, smaller row groups or fewer ranks")
            cursor.epoch += 1
            cursor.file_index, cursor.first_global_rg, cursor.started = 0, 0, False
            pass_from_start, docs_this_pass = True, 0
            continue
        if not cursor.started:
            # this rank's first row group in the file: the one whose global number is congruent to rank
            cursor.row_group = (rank - cursor.first_global_rg) % world_size
            cursor.row = 0
            cursor.started = True
        n_groups = reader.num_row_groups(cursor.file_index)
        if cursor.row_group >= n_groups:
            cursor.first_global_rg += n_groups
            cursor.file_index += 1
            cursor.started = False
            continue
        texts = reader.texts(cursor.file_index, cursor.row_group)
        while cursor.row < len(texts):
            start = cursor.row
            stop = min(start + chunk_docs, len(texts))
            cursor.row = stop
            rows = [r for r in range(start, stop) if texts[r]]
            cursor.skipped_docs += (stop - start) - len(rows)
            if not rows:
                continue
            docs_this_pass += len(rows)
            ids = [(cursor.epoch, cursor.file_index, cursor.row_group, r) for r in rows]
            yield ids, [texts[r] for r in rows]
        cursor.row_group += world_size
        cursor.row = 0


# -----------------------------------------------------------------------------
# Packing: best fit from a buffer of whole documents

DocId = tuple[int, int, int, int]   # (epoch, file_index, row_group, row)


class BestFitPacker:
    """A buffer of tokenised documents, taken out by best fit.

    Documents are bucketed by length (FIFO inside a bucket) with a sorted list of the lengths present, so
    "longest that fits" and "shortest" are a bisect away instead of a scan of the whole buffer.
    """

    def __init__(self):
        self.lengths: list[int] = []                                   # sorted, distinct
        self.buckets: dict[int, collections.deque] = {}                # length -> deque[(doc_id, tokens)]
        self.order: dict[DocId, int] = {}                              # buffered ids, insertion order -> length
        self.num_tokens = 0

    def __len__(self) -> int:
        return len(self.order)

    def add(self, doc_id: DocId, tokens: list[int]) -> None:
        n = len(tokens)
        assert n > 0, f"document {doc_id} tokenised to nothing (not even BOS)"
        assert doc_id not in self.order, f"document {doc_id} is already buffered"
        bucket = self.buckets.get(n)
        if bucket is None:
            bucket = self.buckets[n] = collections.deque()
            bisect.insort(self.lengths, n)
        bucket.append((doc_id, tokens))
        self.order[doc_id] = n
        self.num_tokens += n

    def _pop(self, n: int) -> list[int]:
        bucket = self.buckets[n]
        doc_id, tokens = bucket.popleft()
        if not bucket:
            del self.buckets[n]
            del self.lengths[bisect.bisect_left(self.lengths, n)]
        del self.order[doc_id]
        self.num_tokens -= n
        return tokens

    def take(self, space: int) -> tuple[list[int], int]:
        """The tokens to place in `space` free slots, and how many tokens were cropped away (0 if none)."""
        assert self.lengths, "take() from an empty buffer"
        i = bisect.bisect_right(self.lengths, space) - 1
        if i >= 0:
            return self._pop(self.lengths[i]), 0
        tokens = self._pop(self.lengths[0])   # nothing fits: crop the shortest, wasting the least
        return tokens[:space], len(tokens) - space

    def doc_ids(self) -> list[DocId]:
        return list(self.order)


# -----------------------------------------------------------------------------
# Before training: how many passes over the data a run implies

def bytes_per_token(tokenizer, files: Sequence[Path], sample_bytes: int = 200_000) -> float:
    """UTF-8 bytes per token of this tokenizer on the first non-empty documents of `files` (about sample_bytes)."""
    sample, size = [], 0
    reader = RowGroupReader(files)
    for file_index in range(len(reader.files)):
        for row_group in range(reader.num_row_groups(file_index)):
            for text in reader.texts(file_index, row_group):
                if text:
                    sample.append(text)
                    size += len(text.encode("utf-8"))
                if size >= sample_bytes:
                    break
            if size >= sample_bytes:
                break
        if size >= sample_bytes:
            break
    tokens = sum(len(row) for row in tokenizer.encode(sample)) if sample else 0
    return size / tokens if tokens else 1.0


def estimate_epochs(tokenizer, files: Sequence[str | os.PathLike], planned_tokens: int,
                    stats: TextStats | None = None) -> tuple[float, int, TextStats]:
    """(passes over the data, tokens available per pass, what the files hold) for a run that draws
    `planned_tokens` tokens: tokens per pass = text bytes / bytes per token (measured on a sample) + one BOS per
    document. A cheap estimate (exact document counts for small data, footers for large)."""
    files = [Path(f) for f in files]
    stats = stats or text_stats(files)
    if stats.usable_documents <= 0:
        raise DataLoaderError(f"the shards in {files[0].parent} hold no non-empty document ({stats.documents:,} "
                              f"rows, all null or empty): nothing to train on")
    available = max(1, round(stats.text_bytes / bytes_per_token(tokenizer, files)) + stats.usable_documents)
    return planned_tokens / available, available, stats


def warn_if_many_epochs(tokenizer, files: Sequence[str | os.PathLike], planned_tokens: int,
                        limit: float = MANY_EPOCHS) -> float:
    """Estimate the passes a run of `planned_tokens` makes over `files`; print one warning line past `limit`."""
    epochs, available, stats = estimate_epochs(tokenizer, files, planned_tokens)
    if epochs > limit:
        print(f"warning: this run draws {planned_tokens:,} tokens from training data of about {available:,} tokens "
              f"({stats.describe()} in {Path(files[0]).parent}): about {epochs:,.0f} passes over the same text, "
              f"which a model memorises; use more data or fewer iterations", flush=True)
    return epochs


# -----------------------------------------------------------------------------
# The loader

class BestFitLoader:
    """Infinite iterator of (inputs, targets) int64 [B, T] batches on `device`; see the module docstring.

    A background thread reads, tokenises and packs up to `prefetch_batches` batches ahead, so the training
    loop only ever waits on a queue. `state_dict()` is the resume point after the last batch returned.
    """

    def __init__(self, tokenizer, files: Sequence[str | os.PathLike], batch_size: int, seq_len: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 resume_state: dict | None = None, buffer_docs: int = 1000, tokenizer_threads: int = 4,
                 tokenizer_batch_docs: int = 128, prefetch_batches: int = 4, planned_tokens: int | None = None):
        assert batch_size >= 1 and seq_len >= 1, f"batch_size={batch_size}, seq_len={seq_len} must be >= 1"
        assert 0 <= rank < world_size, f"rank {rank} is not in [0, {world_size})"
        assert buffer_docs >= 1 and tokenizer_batch_docs >= 1, (buffer_docs, tokenizer_batch_docs)
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.buffer_docs = buffer_docs
        self.tokenizer_threads = tokenizer_threads
        self.chunk_docs = tokenizer_batch_docs
        self.pin = self.device.type == "cuda"
        self.reader = RowGroupReader(files)
        if planned_tokens is not None and rank == 0:  # every rank reads 1/world_size of the data: one estimate
            warn_if_many_epochs(tokenizer, self.reader.files, planned_tokens)
        self.packer = BestFitPacker()
        self.cursor = Cursor()
        self.cropped_tokens = 0     # running totals, for the cropping statistics
        self.packed_tokens = 0
        if resume_state is not None:
            self._restore(resume_state)
        self._state = self._snapshot()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=BestFitLoader._produce, args=(weakref.ref(self),),
                                        name=f"bestfit-loader-rank{rank}", daemon=True)
        self._thread.start()
        _LIVE_LOADERS.add(self)

    # --- producer side (background thread) ---------------------------------

    def _refill(self, docs: Iterator) -> None:
        ids, texts = next(docs)
        token_lists = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        for doc_id, tokens in zip(ids, token_lists):
            self.packer.add(doc_id, tokens)

    def _build_batch(self, docs: Iterator) -> torch.Tensor:
        B, T = self.B, self.T
        capacity = T + 1
        flat: list[int] = []
        for _ in range(B):
            filled = 0
            while filled < capacity:
                while len(self.packer) < self.buffer_docs:
                    self._refill(docs)
                tokens, cropped = self.packer.take(capacity - filled)
                flat.extend(tokens)
                filled += len(tokens)
                self.cropped_tokens += cropped
        self.packed_tokens += B * capacity
        rows = torch.tensor(flat, dtype=torch.long).view(B, capacity)
        # [inputs | targets] in one contiguous (pinned on CUDA) buffer: a single host-to-device copy
        staged = torch.empty(2 * B * T, dtype=torch.long, pin_memory=self.pin)
        staged[:B * T].view(B, T).copy_(rows[:, :-1])
        staged[B * T:].view(B, T).copy_(rows[:, 1:])
        return staged

    @staticmethod
    def _produce(ref: weakref.ref) -> None:
        """Producer loop. Holds the loader only weakly while it waits, so a dropped loader stops it."""
        loader = ref()
        docs = walk_documents(loader.reader, loader.cursor, loader.rank, loader.world_size, loader.chunk_docs)
        stop, out = loader._stop, loader._queue
        del loader
        while not stop.is_set():
            loader = ref()
            if loader is None:
                return
            try:
                item = (loader._build_batch(docs), loader._snapshot())
            except BaseException as err:  # handed to the consumer, which re-raises it in the training thread
                item = err
            del loader
            while True:
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    if stop.is_set() or ref() is None:
                        return
            if isinstance(item, BaseException):
                return

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "cursor": self.cursor.as_dict(),
            "buffer": [list(doc_id) for doc_id in self.packer.doc_ids()],
            "buffer_tokens": self.packer.num_tokens,
            "cropped_tokens": self.cropped_tokens,
            "packed_tokens": self.packed_tokens,
        }

    # --- resume --------------------------------------------------------------

    def _restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataLoaderError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise DataLoaderError(
                f"loader state was saved by rank {state['rank']} of {state['world_size']}, but this is rank "
                f"{self.rank} of {self.world_size}: resume with the same number of processes")
        self.cursor = Cursor(**state["cursor"])
        self.cropped_tokens = state["cropped_tokens"]
        self.packed_tokens = state["packed_tokens"]
        ids = [tuple(doc_id) for doc_id in state["buffer"]]
        by_group: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for _, fi, rg, row in ids:
            by_group[(fi, rg)].append(row)
        texts: dict[tuple[int, int, int], str] = {}
        for (fi, rg), rows in by_group.items():
            if fi >= len(self.reader.files):
                raise DataLoaderError(f"loader state refers to shard #{fi}, but only {len(self.reader.files)} "
                                      f"shard files were given: the data changed since the checkpoint")
            group = self.reader.texts(fi, rg)
            for row in rows:
                texts[(fi, rg, row)] = group[row]
        token_lists = self.tokenizer.encode([texts[i[1:]] for i in ids], prepend=self.bos,
                                            num_threads=self.tokenizer_threads) if ids else []
        for doc_id, tokens in zip(ids, token_lists):
            self.packer.add(doc_id, tokens)
        # None: a buffer re-dealt for another world size (nanopipe.reshard), no saved count to check
        if state["buffer_tokens"] is not None and self.packer.num_tokens != state["buffer_tokens"]:
            raise DataLoaderError(
                f"resuming the loader re-read {self.packer.num_tokens} buffered tokens, the checkpoint had "
                f"{state['buffer_tokens']}: the shards ({self.reader.files[0].parent}) or the tokenizer changed")

    # --- consumer side -----------------------------------------------------

    def __iter__(self) -> BestFitLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stop.is_set():  # closed, or its producer failed: waiting on the queue would hang
            raise DataLoaderError("this loader is closed: it yields no more batches")
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        staged, self._state = item
        if self.device.type != "cpu":
            # from pinned memory the copy is asynchronous: the training loop asks for the next batch right after
            # a backward it has only queued, and goes on queueing while the batch travels
            staged = staged.to(self.device, non_blocking=self.pin)
        B, T = self.B, self.T
        return staged[:B * T].view(B, T), staged[B * T:].view(B, T)

    def state_dict(self) -> dict:
        """Resume point: a loader built with this state yields the batch that would have come next."""
        return self._state

    @property
    def epoch(self) -> int:
        return self._state["cursor"]["epoch"]

    @property
    def skipped_docs(self) -> int:
        """Null or empty documents this rank passed over so far."""
        return self._state["cursor"].get("skipped_docs", 0)

    def crop_fraction(self) -> float:
        """Fraction of the tokens read that were cropped away (not trained on), so far."""
        total = self._state["packed_tokens"] + self._state["cropped_tokens"]
        return self._state["cropped_tokens"] / total if total else 0.0

    def close(self) -> None:
        self._stop.set()
        # drain so a producer blocked on put() sees the stop flag
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
        _LIVE_LOADERS.discard(self)

    def __enter__(self) -> BestFitLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
