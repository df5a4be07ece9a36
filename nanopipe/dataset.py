"""
Pretraining text: parquet shards with a `text` column (the FineWeb-Edu / ClimbMix layout), one shard of
which, pinned by name, is the validation split.

    python -m nanopipe.dataset download -n 8                # hf: first 8 training shards + the validation shard
    python -m nanopipe.dataset builtin                      # materialise the offline corpus, print where
    python -m nanopipe.dataset prepare --input a.txt b.jsonl --out DIR [--val_fraction=0.05]
    python -m nanopipe.dataset info --data_source=local --data_dir=DIR
    nanopipe data builtin                                   # the same commands through the console script

Three sources, chosen with --data_source (the `DataFlags` mixin every data-reading stage has):
- `builtin`: an offline corpus of real English text that every Python installation carries, the
  documentation in `pydoc_data.topics` plus the docstrings of the standard library (read by parsing its
  sources with `ast`, nothing imported). Built deterministically into NANOPIPE_HOME/base_data/builtin.
- `local`: a directory of parquet shards, e.g. written by `prepare` from .txt/.jsonl/.parquet files.
- `hf`: shards of a Hugging Face dataset repo (default: nanochat's FineWeb-Edu shuffle), fetched with
  huggingface-hub: parallel, resumable, retried with backoff, checked against the repo's sizes and sha256.

A shard directory holds `*.parquet` files; the validation shard is the one named by --val_shard (default
`val.parquet`), every other parquet file is a training shard, used in name order.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import functools
import gc
import hashlib
import importlib
import json
import os
import random
import re
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from pydantic import Field, field_validator

from nanopipe.common import atomic_directory, atomic_write_json, get_base_dir, print0
from nanopipe.config import ConfigError, NanoConfig, parse_cli
from nanopipe.configs.base import Off
from nanopipe.configs.data import DEFAULT_HF_REPO, HF_REPO_PATTERN, DataFlags, bare_parquet_name
from nanopipe.exit_codes import StageError

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


class DataError(StageError, ValueError):
    """A shard, input file or data directory is missing, empty or malformed. The message names the file."""


# -----------------------------------------------------------------------------
# Shard sets

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
    if flags.data_source == "builtin":
        ensure_builtin(data_dir)
        return select_shards(data_dir, flags.num_shards, resolve_val_shard(flags, data_dir))
    if flags.data_source == "local":
        if not data_dir.is_dir():
            raise DataError(f"data directory {data_dir} does not exist (--data_dir; create shards with "
                            f"`python -m nanopipe.dataset prepare --input FILES --out {data_dir}`)")
        return select_shards(data_dir, flags.num_shards, resolve_val_shard(flags, data_dir))
    return ensure_hf_shards(flags.hf_repo_id, data_dir, flags.num_shards, resolve_val_shard(flags))


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

BUILTIN_VERSION = 2  # bump when the corpus recipe changes
BUILTIN_VAL_FRACTION = 0.05
BUILTIN_ROW_GROUP_DOCS = 16
BUILTIN_SHARD_CHARS = 500_000
# Long topics and modules are cut into documents of at most about this size, at paragraph/docstring
# boundaries: web-text sized documents, so the best-fit packer fills short rows (CPU presets use 256-token
# rows, ~800 characters) from whole documents instead of cropping one long document per row.
BUILTIN_DOC_CHARS = 2_000
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
        for text in split_text_documents(topics[name].strip(), BUILTIN_DOC_CHARS):
            if len(text) >= 200:
                # the key is the topic, so all parts of one topic land in the same split
                yield f"pydoc-topic:{name}", text


def _docstring_sections(tree: ast.Module, module: str) -> list[str]:
    """'qualified.name\\n\\ndocstring' for the module, its classes, functions and methods, in source order."""
    sections = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 3:
            sections.append(f"{qualname}\n\n{doc}")
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{qualname}.{child.name}")
            elif isinstance(child, functions) and not isinstance(node, functions):  # not nested helpers
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
# hf: shards of a Hugging Face dataset repo, through huggingface-hub

HF_SOURCE_NAME = "hf_source.json"  # the repo listing (commit, names, sizes, hashes) the shards came from


class DownloadError(DataError):
    """A shard could not be downloaded intact. The message names the file."""


class _CorruptDownload(Exception):
    """The bytes on disk are not the file the repo lists: start that file again from scratch."""


@dataclass(frozen=True)
class RemoteFile:
    name: str  # local file name: the repo path with "/" as "__" (shards live flat in one directory)
    path: str  # path inside the repo
    size: int
    sha256: str | None = None  # LFS files (every real shard)
    git_sha1: str | None = None  # small files kept in git: the blob id


def hf_endpoint(endpoint: str | None = None) -> str:
    """The hub to talk to: the argument, else $HF_ENDPOINT read now (not at import), else huggingface-hub's."""
    from huggingface_hub import constants
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors worth a retry, for whichever HTTP client huggingface-hub is built on."""
    classes: list[type[BaseException]] = [OSError]  # HfHubHTTPError, ConnectionError and timeouts are OSErrors
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retryable(err: BaseException) -> bool:
    """Server errors, throttling and broken connections are worth another try; 4xx answers are not."""
    status = _http_status(err)
    return status is None or status >= 500 or status in (408, 429)


def _backoff(attempt: int, backoff_s: float) -> float:
    return backoff_s * 2 ** (attempt - 1) * random.uniform(1.0, 1.25)  # jitter: parallel workers spread out


def list_hf_shards(repo_id: str, revision: str = "main", endpoint: str | None = None, max_attempts: int = 5,
                   backoff_s: float = 2.0) -> tuple[str, dict[str, RemoteFile]]:
    """(commit, {file name: RemoteFile}) of the parquet files of a dataset repo, sizes and hashes included."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hf_endpoint(endpoint))
    for attempt in range(1, max_attempts + 1):
        try:
            info = api.dataset_info(repo_id, revision=revision, files_metadata=True)
            break
        except _transient_errors() as err:
            if not _retryable(err) or attempt == max_attempts:
                raise DataError(f"cannot list hf dataset repo {repo_id}@{revision} at {hf_endpoint(endpoint)}: "
                                f"{_one_line(err)}") from None
            wait = _backoff(attempt, backoff_s)
            print0(f"listing {repo_id}: attempt {attempt}/{max_attempts} failed ({_one_line(err)}); "
                   f"retrying in {wait:.1f}s")
            time.sleep(wait)
    files = {}
    for sibling in info.siblings or []:
        if not sibling.rfilename.endswith(".parquet"):
            continue
        if sibling.size is None:
            raise DataError(f"hf repo {repo_id}: the listing gives no size for {sibling.rfilename}")
        name = sibling.rfilename.replace("/", "__")
        files[name] = RemoteFile(name, sibling.rfilename, sibling.size, sibling.lfs.sha256 if sibling.lfs else None,
                                 None if sibling.lfs else sibling.blob_id)
    return info.sha, files


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


class _DownloadProgress:
    """Aggregate progress of parallel downloads as log lines: one per finished file, one every few seconds."""

    def __init__(self, files: list[RemoteFile], interval_s: float = 5.0):
        self.total_bytes, self.total_files = sum(f.size for f in files), len(files)
        self.interval_s, self.files_done = interval_s, 0
        self._on_disk: dict[str, int] = {}
        self._lock = threading.Lock()
        self._t0 = self._last_print = time.time()
        self._start_bytes: int | None = None

    def set(self, name: str, on_disk: int) -> None:
        with self._lock:
            self._on_disk[name] = on_disk

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self._on_disk[name] = self._on_disk.get(name, 0) + n
            if time.time() - self._last_print >= self.interval_s:
                self._last_print = time.time()
                print0(self.line())

    def file_done(self, file: RemoteFile) -> None:
        with self._lock:
            self._on_disk[file.name] = file.size
            self.files_done += 1
            print0(f"  [{self.files_done}/{self.total_files}] {file.name} ({file.size / 1e6:.1f} MB)")

    def line(self) -> str:
        done = sum(self._on_disk.values())
        seconds = max(time.time() - self._t0, 1e-6)
        return (f"download: {done / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB "
                f"({100 * done / max(self.total_bytes, 1):.0f}%), {done / 1e6 / seconds:.1f} MB/s, "
                f"{self.files_done}/{self.total_files} files")


class _ProgressSink:
    """Stands where huggingface-hub's http_get expects a tqdm bar; forwards byte counts to _DownloadProgress."""

    def __init__(self, progress: _DownloadProgress, name: str, initial: int = 0, **_: object):
        self.progress, self.name = progress, name
        progress.set(name, initial)

    def update(self, n: int = 1) -> None:
        self.progress.add(self.name, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_ProgressSink":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _verify_download(path: Path, file: RemoteFile) -> None:
    size = path.stat().st_size
    if size != file.size:
        raise _CorruptDownload(f"size mismatch: got {size} bytes, the repo lists {file.size}")
    if file.sha256 or file.git_sha1:
        digest = hashlib.sha256() if file.sha256 else hashlib.sha1(f"blob {size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        expected = file.sha256 or file.git_sha1
        if digest.hexdigest() != expected:
            kind = "sha256" if file.sha256 else "git blob sha1"
            raise _CorruptDownload(f"{kind} mismatch: got {digest.hexdigest()}, the repo lists {expected}")


def _fetch_once(url: str, partial: Path, file: RemoteFile, progress: _DownloadProgress) -> None:
    """One attempt: continue `partial` from where it stops (HTTP Range) until it has every byte."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    have = partial.stat().st_size if partial.exists() else 0
    if have > file.size:
        partial.unlink()
        have = 0
    progress.set(file.name, have)
    if have == file.size:
        return  # complete already (the last run stopped before checking and renaming it)
    with open(partial, "ab") as f:
        # the size check is ours (against the repo listing, after the transfer), so none is passed here
        http_get(url, f, resume_size=have, headers=build_hf_headers(), displayed_filename=file.name,
                 tqdm_class=functools.partial(_ProgressSink, progress, file.name))


def download_file(url: str, dest: Path, file: RemoteFile, progress: _DownloadProgress, max_attempts: int = 5,
                  backoff_s: float = 2.0) -> None:
    """Download one shard to `dest`: resumable, retried with exponential backoff, checked against the listing.

    Bytes accumulate in a hidden `.NAME.partial` file that survives a crash, so the next run resumes it;
    a file lock keeps two processes from writing the same shard; the checked file is renamed into place.
    """
    partial = dest.with_name(f".{dest.name}.partial")
    with FileLock(str(dest.with_name(f".{dest.name}.lock"))):
        if dest.is_file() and dest.stat().st_size == file.size:
            progress.file_done(file)  # another process finished it while we waited
            return
        error: BaseException | None = None
        for attempt in range(1, max_attempts + 1):
            try:
                _fetch_once(url, partial, file, progress)
                _verify_download(partial, file)
                os.replace(partial, dest)
                progress.file_done(file)
                return
            except _CorruptDownload as err:
                partial.unlink(missing_ok=True)
                error = err
            except _transient_errors() as err:
                if _http_status(err) == 416:  # the partial file is longer than what the server has
                    partial.unlink(missing_ok=True)
                elif not _retryable(err):
                    raise DownloadError(f"{file.name}: {_one_line(err)}") from None
                error = err
            if attempt < max_attempts:
                wait = _backoff(attempt, backoff_s)
                print0(f"  {file.name}: attempt {attempt}/{max_attempts} failed ({_one_line(error)}); "
                       f"retrying in {wait:.2f}s")
                time.sleep(wait)
        raise DownloadError(f"{file.name}: download failed after {max_attempts} attempts: {_one_line(error)}")


def download_shards(repo_id: str = DEFAULT_HF_REPO, data_dir: str | os.PathLike | None = None,
                    num_shards: int | None = 8, val_shard: str | None = None, revision: str = "main",
                    num_workers: int = 4, max_attempts: int = 5, backoff_s: float = 2.0,
                    endpoint: str | None = None) -> ShardSet:
    """Download the first `num_shards` training shards (None: all) of a dataset repo plus its pinned
    validation shard, in parallel; files already complete on disk are kept."""
    flags = DataFlags(data_source="hf", hf_repo_id=repo_id, val_shard=val_shard,
                      data_dir=str(data_dir) if data_dir else None)
    data_dir, val_shard = resolve_data_dir(flags), resolve_val_shard(flags)
    from huggingface_hub import constants, hf_hub_url
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise DataError(f"HF_HUB_OFFLINE is set: cannot download {repo_id} shards into {data_dir}")
    commit, remote = list_hf_shards(repo_id, revision, endpoint, max_attempts, backoff_s)
    if val_shard not in remote:
        examples = ", ".join(sorted(remote)[-3:]) or "none"
        raise DataError(f"validation shard {val_shard} (--val_shard) is not in hf repo {repo_id}@{commit[:12]}: "
                        f"{len(remote)} parquet files, the last ones {examples}")
    train_names = sorted(n for n in remote if n != val_shard)
    if num_shards is not None and num_shards > len(train_names):
        print0(f"{repo_id} has {len(train_names)} training shards, fewer than the {num_shards} asked for")
    train_names = train_names[:num_shards]
    wanted = [remote[n] for n in train_names + [val_shard]]
    data_dir.mkdir(parents=True, exist_ok=True)
    # the listing goes down first: later runs can then check what is on disk without the network
    atomic_write_json(data_dir / HF_SOURCE_NAME, {
        "repo_id": repo_id, "revision": revision, "commit": commit, "val_shard": val_shard,
        "files": {f.name: {"size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1} for f in remote.values()}})
    todo = [f for f in wanted if not _complete(data_dir / f.name, f.size)]
    progress = _DownloadProgress(todo)
    print0(f"hf {repo_id}@{commit[:12]}: {len(train_names)} training shards + validation {val_shard}; "
           f"{len(todo)} to download ({progress.total_bytes / 1e6:.1f} MB) with {num_workers} workers into {data_dir}")
    endpoint = hf_endpoint(endpoint)
    urls = [hf_hub_url(repo_id, f.path, repo_type="dataset", revision=commit, endpoint=endpoint) for f in todo]
    for url in urls:  # never let a download wander off to another host than the one that listed the repo
        if not url.startswith(endpoint + "/"):
            raise DataError(f"download URL {url} is not on the hub endpoint {endpoint} (check HF_ENDPOINT)")
    failures = []
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = [pool.submit(download_file, url, data_dir / f.name, f, progress, max_attempts, backoff_s)
                   for f, url in zip(todo, urls)]
        for future in futures:
            try:
                future.result()
            except DownloadError as err:
                failures.append(str(err))
    if failures:
        raise DownloadError(f"{len(failures)} of {len(todo)} shards failed (the others are in {data_dir}, "
                            f"run again to resume): " + "; ".join(failures))
    if todo:
        print0(progress.line())
    shards = ShardSet(train=[data_dir / n for n in train_names], val=data_dir / val_shard, data_dir=data_dir)
    for path in shards.train + [shards.val]:
        validate_shard(path)
    return shards


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def ensure_hf_shards(repo_id: str, data_dir: Path, num_shards: int | None, val_shard: str) -> ShardSet:
    """hf shards for a stage: checked against the recorded repo listing offline, downloaded when missing.

    With num_shards None, the training shards already complete on disk are used (at least one).
    """
    source = data_dir / HF_SOURCE_NAME
    listing = read_json(source) if source.is_file() else {}
    files = listing.get("files", {}) if listing.get("repo_id") == repo_id else {}
    train_names = sorted(n for n in files if n != val_shard)
    if num_shards is None:
        train_names = [n for n in train_names if _complete(data_dir / n, files[n]["size"])]
    else:
        train_names = train_names[:num_shards]
    ready = (val_shard in files and train_names and (num_shards is None or len(train_names) == num_shards)
             and all(_complete(data_dir / n, files[n]["size"]) for n in train_names + [val_shard]))
    if ready:
        shards = ShardSet(train=[data_dir / n for n in train_names], val=data_dir / val_shard, data_dir=data_dir)
        for path in shards.train + [shards.val]:
            validate_shard(path)
        return shards
    if num_shards is None:
        raise DataError(f"no complete shards of hf repo {repo_id} in {data_dir} (training shards and the "
                        f"validation shard {val_shard}): pass --num_shards=N to download the first N, or run "
                        f"`python -m nanopipe.dataset download -n N --hf_repo_id={repo_id}`")
    return download_shards(repo_id, data_dir, num_shards, val_shard)


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


class DownloadCommand(NanoConfig):
    """Download the first N training shards of a Hugging Face dataset repo plus its pinned validation shard."""

    num_shards: Off[int] = Field(8, ge=1, description="training shards to download, the first N by name; "
                                                        "-1 = all of them")
    hf_repo_id: str = Field(DEFAULT_HF_REPO, pattern=HF_REPO_PATTERN, description="dataset repo (owner/name)")
    val_shard: str | None = Field(None, description="file name of the pinned validation shard (default: the "
                                                    "repo's known last shard)")
    data_dir: str | None = Field(None, description="where the shards go (default: NANOPIPE_HOME/base_data/hf/"
                                                   "<owner>__<name>)")
    revision: str = Field("main", min_length=1, description="repo branch, tag or commit to download")
    num_workers: int = Field(4, ge=1, le=64, description="parallel downloads")
    max_attempts: int = Field(5, ge=1, le=20, description="tries per file before giving up")
    backoff_s: float = Field(2.0, ge=0, le=600, description="seconds before the first retry; doubles each time")

    _val_name = field_validator("val_shard")(bare_parquet_name)


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


def _cmd_download(cfg: DownloadCommand) -> None:
    shards = download_shards(cfg.hf_repo_id, cfg.data_dir, cfg.num_shards, cfg.val_shard, cfg.revision,
                             cfg.num_workers, cfg.max_attempts, cfg.backoff_s)
    print(f"{len(shards.train)} training shards + validation {shards.val.name} in {shards.data_dir}; use them "
          f"with --data_source=hf --hf_repo_id={cfg.hf_repo_id} --num_shards={len(shards.train)}")


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
    "download": (DownloadCommand, _cmd_download),
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
    cfg = parse_cli(cls, rest, prog=prog, short_aliases={"-n": "num_shards", "-w": "num_workers"})
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
