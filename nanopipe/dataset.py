"""
Pretraining text: parquet shards with a `text` column (the FineWeb-Edu / ClimbMix layout), one shard of
which, pinned by name, is the validation split.

    python -m nanopipe.dataset builtin                      # materialise the offline corpus, print where
    python -m nanopipe.dataset prepare --input a.txt b.jsonl --out DIR [--val_fraction=0.05]
    python -m nanopipe.dataset info --data_source=local --data_dir=DIR
    nanopipe data builtin                                   # the same commands through the console script

Two sources, chosen with --data_source (the `DataFlags` mixin every data-reading stage has):
- `builtin`: an offline corpus of real English text that every Python installation carries, the
  documentation in `pydoc_data.topics` plus the docstrings of the standard library (read by parsing its
  sources with `ast`, nothing imported). Built deterministically into NANOPIPE_HOME/base_data/builtin.
- `local`: a directory of parquet shards, e.g. written by `prepare` from .txt/.jsonl/.parquet files.

A shard directory holds `*.parquet` files; the validation shard is the one named by --val_shard (default
`val.parquet`), every other parquet file is a training shard, used in name order.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import gc
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from pydantic import Field, field_validator

from nanopipe.common import atomic_directory, atomic_write_json, get_base_dir, print0
from nanopipe.config import ConfigError, NanoConfig, parse_cli

# -----------------------------------------------------------------------------
# Constants

VAL_SHARD_NAME = "val.parquet"  # the pinned validation shard of builtin and local directories
MANIFEST_NAME = "manifest.json"  # written last into directories that `builtin` and `prepare` build
TEXT_COLUMN = "text"


class DataError(ValueError):
    """A shard, input file or data directory is missing, empty or malformed. The message names the file."""


# -----------------------------------------------------------------------------
# Config mixin

class DataFlags(NanoConfig):
    """Where a stage's pretraining text comes from. Mixed into stage configs: `class X(CommonConfig, DataFlags)`.

    Every field is part of the cache key, `data_dir` included: for `local` the directory *is* the data,
    and a spurious cache miss (same shards under another path) costs a recompute, while a spurious hit
    would silently train on other text. `ShardSet.fingerprint()` identifies the shard contents.
    """

    data_source: Literal["builtin", "local"] = Field(
        "builtin", description="where the text comes from: builtin (offline corpus) or local (parquet dir)")
    data_dir: str | None = Field(
        None, description="directory of parquet shards (default: NANOPIPE_HOME/base_data/<source>)")
    num_shards: int | None = Field(
        None, ge=1, description="training shards to use, the first N by name; none or -1 = all present")
    val_shard: str | None = Field(
        None, description="file name of the pinned validation shard (default: val.parquet)")

    @field_validator("num_shards", mode="before")
    @classmethod
    def _minus_one_is_all(cls, value):
        return None if value in (-1, "-1") else value

    @field_validator("val_shard")
    @classmethod
    def _bare_parquet_name(cls, value):
        if value is not None and (Path(value).name != value or not value.endswith(".parquet")):
            raise ValueError("must be a bare file name ending in .parquet, e.g. shard_01822.parquet")
        return value


@dataclass
class ShardSet:
    """The shards a stage reads: training shards in order, the pinned validation shard, their directory."""

    train: list[Path]
    val: Path
    data_dir: Path

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
    """flags.data_dir, or the default NANOPIPE_HOME/base_data/<source>."""
    if flags.data_dir:
        return Path(flags.data_dir).expanduser()
    return get_base_dir() / "base_data" / flags.data_source


def resolve_val_shard(flags: DataFlags, data_dir: Path | None = None) -> str:
    """The pinned validation shard's file name: --val_shard, else the directory's manifest, else a default."""
    if flags.val_shard:
        return flags.val_shard
    manifest = (data_dir / MANIFEST_NAME) if data_dir is not None else None
    if manifest is not None and manifest.is_file():
        return read_json(manifest).get("val_shard", VAL_SHARD_NAME)
    return VAL_SHARD_NAME


def ensure_shards(flags: DataFlags) -> ShardSet:
    """The validated shards `flags` describe, materialising the builtin corpus if needed."""
    data_dir = resolve_data_dir(flags)
    if flags.data_source == "builtin":
        ensure_builtin(data_dir)
        return select_shards(data_dir, flags.num_shards, resolve_val_shard(flags, data_dir))
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist (--data_dir; create shards with "
                        f"`python -m nanopipe.dataset prepare --input FILES --out {data_dir}`)")
    return select_shards(data_dir, flags.num_shards, resolve_val_shard(flags, data_dir))


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
        with pq.ParquetFile(path) as pf:
            offsets.append(offsets[-1] + pf.num_row_groups)
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
                    open_index, open_file = file_index, pq.ParquetFile(files[file_index])
                texts = open_file.read_row_group(row_group, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()
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


def iter_documents(files: Iterable[str | os.PathLike], max_chars: int | None = None,
                   doc_cap: int | None = None) -> Iterator[str]:
    """Documents of `files` in order, each cropped to `doc_cap` characters, `max_chars` characters in all.

    The last document is cropped so that exactly `max_chars` characters are yielded when there are enough.
    """
    remaining = max_chars
    for texts, _ in iter_row_groups(files):
        for doc in texts:
            if doc_cap is not None:
                doc = doc[:doc_cap]
            if remaining is not None:
                doc = doc[:remaining]
                remaining -= len(doc)
            yield doc
            if remaining is not None and remaining <= 0:
                return


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
# builtin: the documentation that ships with Python

BUILTIN_VERSION = 1  # bump when the corpus recipe changes
BUILTIN_VAL_FRACTION = 0.05
BUILTIN_ROW_GROUP_DOCS = 16
BUILTIN_SHARD_CHARS = 500_000
BUILTIN_DOC_CHARS = 12_000  # long modules are cut into documents of about this size, at docstring boundaries
# stdlib folders without prose: test suites, generated codecs, the pydoc topics (read through their table)
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "encodings",
              "pydoc_data"}


def _pydoc_topic_documents() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately
        print0("builtin corpus: pydoc_data is not installed, using the standard library docstrings only")
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= 200:
            yield f"pydoc-topic:{name}", text


def _docstring_sections(tree: ast.Module, module: str) -> list[str]:
    """'qualified.name\\n\\ndocstring' for the module, its classes, functions and methods, in source order."""
    sections = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 3:
            sections.append(f"{qualname}\n\n{doc}")
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{qualname}.{child.name}")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not isinstance(node, ast.FunctionDef):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return sections


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: parsing allocates millions of acyclic AST nodes and the collector's passes
    over them would double the build time. Refcounting still frees every tree."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stdlib_docstring_documents() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        sources += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    for path in sorted(sources, key=lambda p: p.relative_to(stdlib).as_posix()):
        parts = path.relative_to(stdlib).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            with _gc_paused():
                sections = _docstring_sections(ast.parse(path.read_bytes(), filename=str(path)), module)
        except (SyntaxError, ValueError, OSError):  # a few stdlib files are deliberately unparsable
            continue
        document = []
        for section in sections + [None]:
            if document and (section is None or sum(map(len, document)) + len(section) > BUILTIN_DOC_CHARS):
                text = "\n\n".join(document)
                if len(text) >= 200:
                    # the key is the module, so all parts of one module land in the same split
                    yield module, text
                document = []
            if section is not None:
                document.append(section)


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(key, text) documents of the offline corpus, in a fixed order (same Python install, same corpus)."""
    yield from _pydoc_topic_documents()
    yield from _stdlib_docstring_documents()


def builtin_dir() -> Path:
    return get_base_dir() / "base_data" / "builtin"


def ensure_builtin(data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Materialise the builtin corpus into `data_dir` once; safe when several processes race to do it.

    A file lock serialises builders; the directory is built under a temporary name and renamed into
    place whole, with manifest.json written last, so readers never see a partial corpus.
    """
    target = Path(data_dir) if data_dir else builtin_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / MANIFEST_NAME).is_file() and not force:
            return target
        if target.exists() and not force:
            raise DataError(f"{target} exists but holds no complete builtin corpus (no {MANIFEST_NAME}); "
                            f"remove it or rebuild with `python -m nanopipe.dataset builtin --force`")
        print0(f"building the builtin corpus (Python {sys.version.split()[0]} documentation) into {target} ...")
        t0 = time.time()
        with atomic_directory(target, overwrite=True) as tmp:
            _permissions_like_parent(tmp)
            manifest = write_split_shards(
                builtin_documents(), tmp, BUILTIN_VAL_FRACTION, BUILTIN_ROW_GROUP_DOCS, BUILTIN_SHARD_CHARS,
                {"source": "builtin", "version": BUILTIN_VERSION, "python": sys.version.split()[0],
                 "implementation": sys.implementation.name})
        docs, chars = manifest["documents"], manifest["chars"]
        print0(f"builtin corpus: {docs['train']:,} train / {docs['val']:,} val documents, "
               f"{chars['train'] + chars['val']:,} characters, {len(manifest['train_shards'])} train shards "
               f"in {time.time() - t0:.1f}s")
    return target


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


def read_input_documents(path: Path, doc_chars: int, text_field: str = "text") -> Iterator[str]:
    """Documents of one input file: .txt (paragraphs packed), .jsonl (one per line), .parquet (one per row)."""
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        yield from split_text_documents(path.read_text(encoding="utf-8", errors="replace"), doc_chars)
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
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
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
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


# -----------------------------------------------------------------------------
# Command line: python -m nanopipe.dataset <command> [--flag=value ...]  (also `nanopipe data <command>`)

class BuiltinCommand(NanoConfig):
    """Materialise the offline builtin corpus (Python's own documentation) and print where it is."""

    data_dir: str | None = Field(None, description="where to write it (default: NANOPIPE_HOME/base_data/builtin)")
    force: bool = Field(False, description="rebuild even if a complete corpus is already there")


class PrepareCommand(NanoConfig):
    """Turn .txt/.md, .jsonl and .parquet files into parquet shards plus a pinned validation shard."""

    input: list[str] = Field(default_factory=list, description="input files, several after one --input")
    out: str | None = Field(None, description="output directory (default: NANOPIPE_HOME/base_data/local)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="fraction of documents that go to val.parquet")
    doc_chars: int = Field(10_000, ge=100, description=".txt/.md: paragraphs are packed into documents of at "
                                                       "most this many characters")
    text_field: str = Field("text", min_length=1, description="JSON field / parquet column holding the text")
    row_group_docs: int = Field(1024, ge=1, description="documents per parquet row group")
    shard_chars: int = Field(250_000_000, ge=1, description="characters per training shard (about)")
    overwrite: bool = Field(False, description="replace the output directory if it exists")


class InfoCommand(DataFlags):
    """Validate a shard directory and summarise it (shards, row groups, documents, bytes)."""


def _take_list_flag(argv: list[str], name: str) -> tuple[list[str], list[str]]:
    """Pull `--name a b c` (or `--name=a,b`) out of argv: the values, and the other arguments."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    values, rest, i = [], [], 0
    while i < len(argv):
        key, has_value, value = argv[i].partition("=")
        i += 1
        if key not in spellings:
            rest.append(argv[i - 1])
            continue
        if has_value:
            values += [v for v in value.split(",") if v]
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
    return values, rest


def _cmd_builtin(cfg: BuiltinCommand) -> None:
    path = ensure_builtin(cfg.data_dir, force=cfg.force)
    manifest = read_json(path / MANIFEST_NAME)
    print(f"builtin corpus (Python {manifest['python']}, {sum(manifest['chars'].values()):,} characters): {path}")


def _cmd_prepare(cfg: PrepareCommand) -> None:
    out = cfg.out or str(get_base_dir() / "base_data" / "local")
    shards = prepare_shards(cfg.input, out, cfg.val_fraction, cfg.doc_chars, cfg.text_field,
                            cfg.row_group_docs, cfg.shard_chars, cfg.overwrite)
    print(f"use it with --data_source=local --data_dir={shards.data_dir}")


def _cmd_info(cfg: InfoCommand) -> None:
    shards = ensure_shards(cfg)
    print(f"data directory: {shards.data_dir}")
    for split, paths in (("train", shards.train), ("val", [shards.val])):
        groups = rows = size = 0
        for path in paths:
            with pq.ParquetFile(path) as pf:
                groups, rows = groups + pf.num_row_groups, rows + pf.metadata.num_rows
            size += path.stat().st_size
        names = paths[0].name + (f" .. {paths[-1].name}" if len(paths) > 1 else "")
        print(f"{split:>5}: {len(paths)} shards ({names}), {groups} row groups, {rows:,} documents, "
              f"{size / 1e6:.1f} MB")
    print(f"fingerprint: {shards.fingerprint()}")


COMMANDS = {
    "builtin": (BuiltinCommand, _cmd_builtin),
    "prepare": (PrepareCommand, _cmd_prepare),
    "info": (InfoCommand, _cmd_info),
}


def main(argv: list[str] | None = None, prog: str = "python -m nanopipe.dataset") -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: {prog} {{{','.join(COMMANDS)}}} [--flag=value ...]   ({prog} <command> --help for flags)\n"
             + "\n".join(f"  {name:<9} {cls.__doc__.splitlines()[0]}" for name, (cls, _) in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{prog}: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n{usage}",
              file=sys.stderr)
        raise SystemExit(2)
    cls, run = COMMANDS[command]
    prog = f"{prog} {command}"
    inputs = None
    if cls is PrepareCommand:
        inputs, rest = _take_list_flag(rest, "input")
    cfg = parse_cli(cls, rest, prog=prog, short_aliases={"-n": "num_shards"})
    if inputs is not None:
        if not inputs:
            print(f"{prog}: error: --input: give at least one .txt/.md/.jsonl/.parquet file", file=sys.stderr)
            raise SystemExit(2)
        cfg.input = inputs
    try:
        run(cfg)
    except (DataError, ConfigError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
