"""
Shard directories: which parquet shards a stage reads (the validation shard pinned by name), their validation,
and reading them back as row groups with resumable positions or as documents.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nanopipe.common import get_base_dir
from nanopipe.configs.base import ConfigError
from nanopipe.configs.data import DataFlags
from nanopipe.exit_codes import ExitCode, StageError

# -----------------------------------------------------------------------------
# Constants

# Validation shards pinned by name for the repos we know (the last shard of each, as in nanochat).
KNOWN_HF_VAL_SHARDS = {
    "karpathy/fineweb-edu-100b-shuffle": "shard_01822.parquet",
    "karpathy/climbmix-400b-shuffle": "shard_06542.parquet",
}
VAL_SHARD_NAME = "val.parquet"  # the pinned validation shard of builtin and local directories
MANIFEST_NAME = "manifest.json"  # written last into directories that `builtin` and `prepare` build
TEXT_COLUMN = "text"
# Below this much uncompressed text, the documents of a shard set are counted exactly at stage start (a
# fraction of a second); above it, from the parquet footers (row counts, null counts, column sizes).
EXACT_STATS_BYTES = 64 * 2**20


class DataError(StageError, ValueError):
    """A shard, input file or data directory is missing, empty or malformed. The message names the file.

    A bad input: the stage exits with BAD_INPUT (2), since retrying cannot fix it."""

    exit_code = ExitCode.BAD_INPUT


def verify_hint(data_dir: Path) -> str:
    return f"check every shard with `python -m nanopipe.data info --verify --data_source=local --data_dir={data_dir}`"


# -----------------------------------------------------------------------------
# Shard sets

@dataclass
class ShardSet:
    """The shards a stage reads: training shards in order, the pinned validation shard, their directory."""

    train: list[Path]
    val: Path
    data_dir: Path
    train_stats: TextStats | None = None  # filled by ensure_shards (require_documents)
    val_stats: TextStats | None = None

    def fingerprint(self) -> str:
        """Cheap content identity: names, sizes and parquet footers (row-group layout) of every shard."""
        digest = hashlib.sha256()
        for split, paths in (("train", self.train), ("val", [self.val])):
            for path in paths:
                size = path.stat().st_size
                with open(path, "rb") as f:
                    f.seek(max(0, size - 65536))
                    tail = f.read()
                digest.update(f"{split}\0{path.name}\0{size}\0".encode())
                digest.update(hashlib.sha256(tail).digest())
        return digest.hexdigest()[:16]


def resolve_data_dir(flags: DataFlags) -> Path:
    """flags.data_dir, or the default NANOPIPE_HOME/base_data/<source> (hf: one subfolder per repo)."""
    if flags.data_dir:
        return Path(flags.data_dir).expanduser()
    base = get_base_dir() / "base_data" / flags.data_source
    if flags.data_source == "hf":
        # two repos in one folder would mix their shards and their validation shards
        base = base / flags.hf_repo_id.replace("/", "__")
    return base


def resolve_val_shard(flags: DataFlags, data_dir: Path | None = None) -> str:
    """The pinned validation shard's file name: --val_shard, else the directory's manifest, else a default."""
    if flags.val_shard:
        return flags.val_shard
    if flags.data_source == "hf":
        if flags.hf_repo_id not in KNOWN_HF_VAL_SHARDS:
            raise ConfigError(
                f"--val_shard is required with --hf_repo_id={flags.hf_repo_id}: no validation shard is known for "
                f"that repo (known: {', '.join(sorted(KNOWN_HF_VAL_SHARDS))}); name one of its parquet files")
        return KNOWN_HF_VAL_SHARDS[flags.hf_repo_id]
    manifest = (data_dir / MANIFEST_NAME) if data_dir is not None else None
    if manifest is not None and manifest.is_file():
        return read_json(manifest).get("val_shard", VAL_SHARD_NAME)
    return VAL_SHARD_NAME


def ensure_shards(flags: DataFlags) -> ShardSet:
    """The validated shards `flags` describe, materialising the builtin corpus or downloading hf shards if needed."""
    data_dir = resolve_data_dir(flags)
    from nanopipe.data.builtin import ensure_builtin  # the sources build on the shard functions below
    from nanopipe.data.hub import ensure_hf_shards
    if flags.data_source == "builtin":
        ensure_builtin(data_dir)
        shards = select_shards(data_dir, flags.num_shards, resolve_val_shard(flags, data_dir))
    elif flags.data_source == "local":
        if not data_dir.is_dir():
            raise DataError(f"data directory {data_dir} does not exist (--data_dir; create shards with "
                            f"`python -m nanopipe.data prepare --input FILES --out {data_dir}`)")
        shards = select_shards(data_dir, flags.num_shards, resolve_val_shard(flags, data_dir))
    else:
        shards = ensure_hf_shards(flags.hf_repo_id, data_dir, flags.num_shards, resolve_val_shard(flags))
    require_documents(shards)
    return shards


# -----------------------------------------------------------------------------
# Shard directories: listing and validation

def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


def list_parquet_files(data_dir: str | os.PathLike) -> list[Path]:
    """The parquet files of a directory in name order (hidden and temporary files excluded)."""
    data_dir = Path(data_dir)
    return sorted(p for p in data_dir.iterdir()
                  if p.suffix == ".parquet" and not p.name.startswith(".") and p.is_file())


def validate_shard(path: str | os.PathLike) -> int:
    """Check one shard is a readable parquet file with a non-empty string `text` column; return its rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} is missing")
    if path.stat().st_size == 0:
        raise DataError(f"shard {path} is empty (0 bytes); delete it and fetch or prepare it again")
    try:
        with pq.ParquetFile(path) as pf:
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"shard {path} is not a readable parquet file: {err}") from None
    if TEXT_COLUMN not in schema.names:
        raise DataError(f"shard {path} has no '{TEXT_COLUMN}' column (columns: {schema.names})")
    column_type = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"shard {path}: column '{TEXT_COLUMN}' has type {column_type}, expected string")
    if num_rows == 0:
        raise DataError(f"shard {path} has no rows")
    return num_rows


def select_shards(data_dir: str | os.PathLike, num_shards: int | None = None,
                  val_shard: str = VAL_SHARD_NAME) -> ShardSet:
    """Validate a shard directory: the named validation shard plus the first `num_shards` other shards."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    files = list_parquet_files(data_dir)
    val = data_dir / val_shard
    if val not in files:
        present = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "") or "none"
        raise DataError(f"validation shard {val} is missing: the validation split is pinned by name "
                        f"(--val_shard); parquet files present: {present}")
    train = [p for p in files if p != val]
    if not train:
        raise DataError(f"no training shards in {data_dir}: only the validation shard {val_shard} is there")
    if num_shards is not None:
        if len(train) < num_shards:
            raise DataError(f"--num_shards={num_shards} but {data_dir} holds only {len(train)} training shards")
        train = train[:num_shards]
    for path in train + [val]:
        validate_shard(path)
    return ShardSet(train=train, val=val, data_dir=data_dir)


# -----------------------------------------------------------------------------
# What the shards hold: documents that are not empty, and their size, before any training

@dataclass
class TextStats:
    """Documents of some shards: all rows, rows that are null or empty (never trained on), UTF-8 bytes of text.

    exact: counted from the text itself; otherwise estimated from the parquet footers (empty_documents is
    then 0, and `text_bytes` is the uncompressed size of the text column less 4 length bytes per row)."""

    files: int
    documents: int
    null_documents: int
    empty_documents: int
    text_bytes: int
    exact: bool

    @property
    def usable_documents(self) -> int:
        return self.documents - self.null_documents - self.empty_documents

    def describe(self) -> str:
        skipped = self.null_documents + self.empty_documents
        return (f"{self.usable_documents:,} non-empty documents{'' if self.exact else ' (estimated)'}, "
                f"{'' if self.exact else '~'}{self.text_bytes:,} bytes of text"
                + (f" ({skipped:,} null or empty documents skipped)" if skipped else ""))


def read_column(pf: pq.ParquetFile, path: Path, row_group: int) -> pa.ChunkedArray:
    """The `text` column of one row group, every page decompressed; a read error is a DataError naming both."""
    try:
        return pf.read_row_group(row_group, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"shard {path} row group {row_group} cannot be read ({type(err).__name__}: "
                        f"{_one_line(err)}): the file is corrupt; fetch or prepare it again, and "
                        f"{verify_hint(path.parent)}") from None


def _not_utf8(path: Path, row_group: int, detail: str) -> DataError:
    return DataError(f"shard {path} row group {row_group} holds text that is not valid UTF-8 ({detail}); write the "
                     f"shard again from clean text (`python -m nanopipe.data prepare`)")


def _check_utf8(column: pa.ChunkedArray, path: Path, row_group: int) -> None:
    try:
        column.validate(full=True)  # for strings: offsets in bounds and valid UTF-8
    except pa.ArrowInvalid as err:
        raise _not_utf8(path, row_group, _one_line(err)) from None


def read_texts(pf: pq.ParquetFile, path: Path, row_group: int) -> list[str | None]:
    """The documents of one row group (None for a null row); errors name the file and the row group."""
    column = read_column(pf, path, row_group)
    try:
        return column.to_pylist()
    except UnicodeDecodeError as err:
        raise _not_utf8(path, row_group, f"{err.reason} at byte {err.start}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def verify_shard(path: str | os.PathLike) -> TextStats:
    """Read and decompress every page of every row group of a shard, checking the text is valid UTF-8.

    Costs a full read: for `info --verify`, not for stage start. Raises DataError naming file and row group."""
    path = Path(path)
    validate_shard(path)
    totals = [0, 0, 0, 0]
    with open_shard(path) as pf:
        for row_group in range(pf.num_row_groups):
            column = read_column(pf, path, row_group)
            _check_utf8(column, path, row_group)
            totals = [a + b for a, b in zip(totals, _count(column))]
    return TextStats(1, *totals, exact=True)


def _count(column: pa.ChunkedArray) -> tuple[int, int, int, int]:
    """(rows, null rows, empty rows, UTF-8 bytes of text) of a text column."""
    lengths = pc.binary_length(column)
    return (len(column), column.null_count, int(pc.sum(pc.equal(lengths, 0)).as_py() or 0),
            int(pc.sum(lengths).as_py() or 0))


def _footer_stats(path: Path) -> tuple[int, int, int]:
    """(rows, null rows, uncompressed bytes of the text column) from a shard's footer; nulls 0 if not recorded."""
    with open_shard(path) as pf:
        md = pf.metadata
        column = [md.schema.column(i).path for i in range(md.num_columns)].index(TEXT_COLUMN)
        nulls = size = 0
        for i in range(md.num_row_groups):
            chunk = md.row_group(i).column(column)
            size += chunk.total_uncompressed_size
            if chunk.statistics is not None and chunk.statistics.has_null_count:
                nulls += chunk.statistics.null_count
        return md.num_rows, nulls, size


def text_stats(files: Iterable[str | os.PathLike], exact_bytes: int = EXACT_STATS_BYTES) -> TextStats:
    """How much text `files` hold: counted exactly when small (or when the footers suggest nothing is there),
    estimated from the footers otherwise. A read error names the file (DataError)."""
    files = [Path(f) for f in files]
    footers = [_footer_stats(path) for path in files]
    rows, nulls, size = (sum(values) for values in zip(*footers)) if footers else (0, 0, 0)
    estimate = max(0, size - 4 * (rows - nulls))
    if size > exact_bytes and estimate > 0:
        return TextStats(len(files), rows, nulls, 0, estimate, exact=False)
    totals = [0, 0, 0, 0]
    for path in files:
        with open_shard(path) as pf:
            for row_group in range(pf.num_row_groups):
                column = read_column(pf, path, row_group)
                _check_utf8(column, path, row_group)
                totals = [a + b for a, b in zip(totals, _count(column))]
    return TextStats(len(files), *totals, exact=True)


def require_documents(shards: ShardSet) -> ShardSet:
    """Refuse (DataError, exit 2) a shard set whose training or validation shards hold no non-empty document;
    record what they hold in shards.train_stats / val_stats."""
    shards.train_stats, shards.val_stats = text_stats(shards.train), text_stats([shards.val])
    for what, stats in (("training shards", shards.train_stats), ("validation shard", shards.val_stats)):
        if stats.usable_documents <= 0 or stats.text_bytes <= 0:
            where = shards.data_dir if what.startswith("training") else shards.val
            raise DataError(f"the {what} in {where} hold no non-empty document ({stats.documents:,} rows: "
                            f"{stats.null_documents:,} null, {stats.empty_documents:,} empty): nothing to train or "
                            f"evaluate on; point --data_dir at real text or build shards with "
                            f"`python -m nanopipe.data prepare --input FILES --out DIR`")
    return shards


# -----------------------------------------------------------------------------
# Reading: row groups with resumable positions, documents for tokenizer training

def iter_row_groups(files: Iterable[str | os.PathLike], rank: int = 0, world_size: int = 1,
                    start: dict | None = None, loop: bool = False) -> Iterator[tuple[list[str], dict]]:
    """Yield (texts of one row group, pos) for this rank's share of the row groups of `files`.

    Row groups are numbered globally across the files, in order; rank r reads those whose number is
    r modulo world_size, so the ranks together read every row group exactly once per epoch.
    `pos = {"file_index", "row_group", "epoch"}` is the row group this rank reads next, after the one
    just yielded: pass it back as `start` to resume exactly there (a different world size resumes from
    the same point with its own stride). With `loop`, iteration never ends and `epoch` (from 1) counts
    passes over the data.
    """
    files = [Path(f) for f in files]
    assert files, "iter_row_groups needs at least one file"
    assert 0 <= rank < world_size, f"rank {rank} out of range for world_size {world_size}"
    offsets = [0]  # offsets[i] = number of row groups in files[:i]
    for path in files:
        offsets.append(offsets[-1] + num_row_groups(path))
    total = offsets[-1]
    if total == 0:
        raise DataError(f"no row groups in {len(files)} files (first: {files[0]})")
    if loop and rank >= total:
        raise DataError(f"rank {rank} gets no data: {len(files)} files hold only {total} row groups for "
                        f"world_size {world_size} (first file: {files[0]})")

    def locate(index: int) -> tuple[int, int]:
        """(file_index, row_group) of a global row-group number; (len(files), 0) past the end."""
        if index >= total:
            return len(files), 0
        file_index = bisect.bisect_right(offsets, index) - 1  # skips files without row groups
        return file_index, index - offsets[file_index]

    start = start or {"file_index": 0, "row_group": 0, "epoch": 1}
    file_index, row_group, epoch = int(start["file_index"]), int(start["row_group"]), int(start["epoch"])
    assert 0 <= file_index <= len(files), f"start {start} names a file outside the {len(files)} files"
    groups_in_file = offsets[file_index + 1] - offsets[file_index] if file_index < len(files) else 0
    assert 0 <= row_group <= groups_in_file, f"start {start}: file {file_index} has {groups_in_file} row groups"
    index = offsets[file_index] + row_group
    open_index, open_file = -1, None
    try:
        while True:
            index += (rank - index) % world_size  # first row group at or after `index` that is ours
            while index < total:
                file_index, row_group = locate(index)
                if file_index != open_index:
                    if open_file is not None:
                        open_file.close()
                    open_index, open_file = file_index, open_shard(files[file_index])
                texts = read_texts(open_file, files[file_index], row_group)
                if index + world_size < total:
                    next_file, next_group = locate(index + world_size)
                    pos = {"file_index": next_file, "row_group": next_group, "epoch": epoch}
                elif loop:
                    next_file, next_group = locate(rank)
                    pos = {"file_index": next_file, "row_group": next_group, "epoch": epoch + 1}
                else:
                    pos = {"file_index": len(files), "row_group": 0, "epoch": epoch}
                yield texts, pos
                index += world_size
            if not loop:
                return
            index, epoch = 0, epoch + 1
    finally:
        if open_file is not None:
            open_file.close()


def open_shard(path: Path) -> pq.ParquetFile:
    """An open parquet file; a missing or unreadable one is a DataError naming it."""
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"shard {path} does not exist") from None
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"shard {path} is not a readable parquet file ({_one_line(err)}); fetch or prepare it "
                        f"again") from None


def num_row_groups(path: Path) -> int:
    with open_shard(path) as pf:
        return pf.num_row_groups


def iter_documents(files: Iterable[str | os.PathLike], max_chars: int | None = None,
                   doc_cap: int | None = None) -> Iterator[str]:
    """Non-empty documents of `files` in order, each cropped to `doc_cap` characters, `max_chars` in all.

    The last document is cropped so that exactly `max_chars` characters are yielded when there are enough.
    Null and empty documents are skipped (`text_stats` counts them).
    """
    remaining = max_chars
    for texts, _ in iter_row_groups(files):
        for doc in texts:
            if not doc:
                continue
            if doc_cap is not None:
                doc = doc[:doc_cap]
            if remaining is not None:
                doc = doc[:remaining]
                remaining -= len(doc)
            yield doc
            if remaining is not None and remaining <= 0:
                return
