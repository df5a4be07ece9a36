"""Writing shard directories: documents into train shards plus a pinned val.parquet and a manifest, and
`prepare` for your own .txt/.md, .jsonl and .parquet files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanopipe.common import atomic_directory, atomic_write_json, print0
from nanopipe.data.shards import MANIFEST_NAME, TEXT_COLUMN, VAL_SHARD_NAME, DataError, ShardSet, select_shards

# -----------------------------------------------------------------------------
# Writing shards

def _in_val_split(key: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the document's key: adding documents never moves existing ones."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return bucket < val_fraction


class ShardWriter:
    """Stream documents into `prefix_00000.parquet`, ... with `row_group_docs` documents per row group.

    A new shard starts once the current one holds `shard_chars` characters (at a row-group boundary);
    with `single_file` everything goes into `<prefix>.parquet`.
    """

    SCHEMA = pa.schema([(TEXT_COLUMN, pa.string())])

    def __init__(self, out_dir: Path, prefix: str, row_group_docs: int, shard_chars: int | None = None,
                 single_file: bool = False):
        self.out_dir, self.prefix, self.single_file = out_dir, prefix, single_file
        self.row_group_docs, self.shard_chars = row_group_docs, shard_chars
        self.paths: list[Path] = []
        self.documents = self.chars = 0
        self._buffer: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_chars_so_far = 0
        self._sha = hashlib.sha256()

    def add(self, text: str) -> None:
        self._buffer.append(text)
        self.documents += 1
        self.chars += len(text)
        self._shard_chars_so_far += len(text)
        self._sha.update(hashlib.sha256(text.encode("utf-8")).digest())
        if len(self._buffer) >= self.row_group_docs:
            self._flush_row_group()

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            name = f"{self.prefix}.parquet" if self.single_file else f"{self.prefix}_{len(self.paths):05d}.parquet"
            self.paths.append(self.out_dir / name)
            # no dictionary/statistics: plain long strings, as in the FineWeb-Edu shards
            self._writer = pq.ParquetWriter(self.paths[-1], self.SCHEMA, compression="zstd",
                                            use_dictionary=False, write_statistics=False)
        table = pa.Table.from_pydict({TEXT_COLUMN: self._buffer}, schema=self.SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self._buffer = []
        if not self.single_file and self.shard_chars and self._shard_chars_so_far >= self.shard_chars:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._shard_chars_so_far = 0

    def close(self) -> list[Path]:
        self._flush_row_group()
        self._close_shard()
        return self.paths

    def content_sha256(self) -> str:
        return self._sha.hexdigest()


def _permissions_like_parent(tmp_dir: Path) -> None:
    """Temporary directories are private (0700); a data directory should be as readable as its parent."""
    os.chmod(tmp_dir, tmp_dir.parent.stat().st_mode & 0o777)


def write_split_shards(documents: Iterable[tuple[str, str]], out_dir: Path, val_fraction: float,
                       row_group_docs: int, shard_chars: int, manifest: dict) -> dict:
    """Write (key, text) documents into train shards plus `val.parquet`, then manifest.json; return it.

    A document goes to validation when the hash of its key falls under `val_fraction`.
    """
    train = ShardWriter(out_dir, "shard", row_group_docs, shard_chars)
    val = ShardWriter(out_dir, "val", row_group_docs, single_file=True)
    for key, text in documents:
        (val if _in_val_split(key, val_fraction) else train).add(text)
    train.close()
    val.close()
    if train.documents == 0 or val.documents == 0:
        raise DataError(f"{train.documents} training and {val.documents} validation documents out of "
                        f"{train.documents + val.documents} (--val_fraction={val_fraction}): both splits need "
                        f"at least one; give more text or change --val_fraction")
    manifest = dict(manifest, val_shard=VAL_SHARD_NAME, train_shards=[p.name for p in train.paths],
                    documents={"train": train.documents, "val": val.documents},
                    chars={"train": train.chars, "val": val.chars},
                    content_sha256={"train": train.content_sha256(), "val": val.content_sha256()})
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


# -----------------------------------------------------------------------------
# local: prepare shards from .txt / .jsonl / .parquet files

def split_text_documents(text: str, doc_chars: int) -> Iterator[str]:
    """Pack the blank-line separated paragraphs of `text` into documents of at most `doc_chars` characters.

    A paragraph longer than that is cut at line ends (a single overlong line is cut hard).
    """
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        if not paragraph.strip():
            continue
        pieces = [paragraph] if len(paragraph) <= doc_chars else list(_cut_long(paragraph, doc_chars))
        for piece in pieces:
            if current and size + 2 + len(piece) > doc_chars:
                yield "\n\n".join(current)
                current, size = [], 0
            current.append(piece)
            size += len(piece) + (2 if len(current) > 1 else 0)
    if current:
        yield "\n\n".join(current)


def _cut_long(paragraph: str, doc_chars: int) -> Iterator[str]:
    piece = ""
    for line in paragraph.split("\n"):
        while len(line) > doc_chars:
            if piece:
                yield piece
                piece = ""
            yield line[:doc_chars]
            line = line[doc_chars:]
        if piece and len(piece) + 1 + len(line) > doc_chars:
            yield piece
            piece = line
        else:
            piece = f"{piece}\n{line}" if piece else line
    if piece:
        yield piece


def check_input_file(path: Path) -> None:
    """A DataError unless `path` is an existing file (a directory is named as one, not as missing)."""
    if path.is_dir():
        raise DataError(f"input {path} is a directory: give the files in it (e.g. --input {path}/*.jsonl)")
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")


def read_input_documents(path: Path, doc_chars: int, text_field: str = "text") -> Iterator[str]:
    """Documents of one input file: .txt (paragraphs packed), .jsonl (one per line), .parquet (one per row)."""
    check_input_file(path)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        yield from split_text_documents(path.read_text(encoding="utf-8", errors="replace"), doc_chars)
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named by its number, not a traceback
            for line_number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                    f"{err.start + 1}); re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else record
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_number}: expected a string or an object with a string "
                                    f"'{text_field}' field (--text_field), got {str(record)[:80]!r}")
                if text.strip():
                    yield text
    elif suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"input file {path} is not a readable parquet file: {err}") from None
        with pf:
            if text_field not in pf.schema_arrow.names:
                raise DataError(f"input file {path} has no '{text_field}' column (--text_field; columns: "
                                f"{pf.schema_arrow.names})")
            for i in range(pf.num_row_groups):
                for text in pf.read_row_group(i, columns=[text_field]).column(text_field).to_pylist():
                    if isinstance(text, str) and text.strip():
                        yield text
    else:
        raise DataError(f"input file {path}: unsupported type '{suffix}' (use .txt, .md, .jsonl or .parquet)")


def prepare_shards(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, val_fraction: float = 0.05,
                   doc_chars: int = 10_000, text_field: str = "text", row_group_docs: int = 1024,
                   shard_chars: int = 250_000_000, overwrite: bool = False) -> ShardSet:
    """Turn text files into a shard directory (train shards, val.parquet, manifest.json), atomically."""
    inputs = [Path(p) for p in inputs]
    for path in inputs:
        check_input_file(path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output directory {out_dir} already exists (pass --overwrite to replace it)")

    def documents() -> Iterator[tuple[str, str]]:
        for path in inputs:
            for text in read_input_documents(path, doc_chars, text_field):
                yield text, text  # keyed by content: duplicates share a split, so none leaks into val

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _permissions_like_parent(tmp)
        manifest = write_split_shards(documents(), tmp, val_fraction, row_group_docs, shard_chars, {
            "source": "prepare", "inputs": [p.name for p in inputs], "val_fraction": val_fraction,
            "doc_chars": doc_chars})
    print0(f"prepared {out_dir}: {manifest['documents']['train']:,} train / {manifest['documents']['val']:,} val "
           f"documents, {len(manifest['train_shards'])} train shards + {VAL_SHARD_NAME}")
    return select_shards(out_dir)
