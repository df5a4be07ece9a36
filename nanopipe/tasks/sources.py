"""
Where a real task's rows come from: the Hugging Face hub through `datasets`, or local files in the same
schema. Either way a task sees `Rows`: a sequence of plain dicts that can say where each row came from.

Local paths may be a single .jsonl / .json / .parquet file, or a directory holding the split's files in
any of these layouts (the hub's own layout included, so a `huggingface-cli download` folder works as is):

    <dir>/<split>.jsonl          <dir>/<subset>/<split>.jsonl
    <dir>/<split>-*.parquet      <dir>/<subset>/<split>-00000-of-00001.parquet      <dir>/data/<split>-*.parquet
"""

from __future__ import annotations

import abc
import bisect
import json
from pathlib import Path
from typing import Any, Sequence

from nanopipe.tasks.base import TaskDataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class Rows(abc.ABC):
    """Read-only rows with provenance, optionally in a seeded shuffled order."""

    def __init__(self) -> None:
        self._order: list[int] | None = None

    @abc.abstractmethod
    def _count(self) -> int:
        """Number of stored rows."""

    @abc.abstractmethod
    def _row(self, index: int) -> dict:
        """The stored row at a physical index."""

    @abc.abstractmethod
    def _where(self, index: int) -> str:
        """Where the stored row at a physical index comes from."""

    def __len__(self) -> int:
        return self._count()

    def __getitem__(self, index: int) -> dict:
        return self._row(self._physical(index))

    def where(self, index: int) -> str:
        """Human-readable location of a row, for error messages (file and line, or hub dataset and row)."""
        return self._where(self._physical(index))

    def shuffle(self, seed: int | None) -> "Rows":
        """Put the rows in the order `datasets.Dataset.shuffle(seed=seed)` gives them (None keeps the stored
        order); returns self."""
        self._order = None if seed is None else datasets_permutation(self._count(), seed)
        return self

    def _physical(self, index: int) -> int:
        return self._order[index] if self._order is not None else index


def datasets_permutation(num_rows: int, seed: int) -> list[int]:
    """The row order of `datasets.Dataset.shuffle(seed=seed)` over num_rows rows (numpy's default_rng, not
    Python's random). nanochat shuffles each hub split this way as it loads it, so taking the first N rows of
    ours (SFT's 10K SmolTalk rows, --max_problems, ...) picks the rows nanochat picks. The permutation depends on
    the row count and the seed only; it is drawn by `datasets` itself, on a one-column table of row numbers."""
    import datasets

    rows = datasets.Dataset.from_dict({"row": list(range(num_rows))}).shuffle(seed=seed)
    return [int(i) for i in rows["row"]]


class ListRows(Rows):
    """Rows parsed from JSON files, each remembering its file and line."""

    def __init__(self, rows: list[dict], origins: list[tuple[Path, int]]):
        super().__init__()
        self.rows, self.origins = rows, origins

    def _count(self) -> int:
        return len(self.rows)

    def _row(self, index: int) -> dict:
        return self.rows[index]

    def _where(self, index: int) -> str:
        path, line = self.origins[index]
        return f"{path} line {line}"


class ParquetRows(Rows):
    """Rows of parquet files, read lazily one row at a time."""

    def __init__(self, paths: Sequence[Path]):
        import pyarrow.parquet as pq

        super().__init__()
        self.paths = list(paths)
        self.tables = [pq.read_table(p) for p in self.paths]
        self._offsets = [0]
        for table in self.tables:
            self._offsets.append(self._offsets[-1] + table.num_rows)

    def _locate(self, index: int) -> tuple[int, int]:
        file_index = bisect.bisect_right(self._offsets, index) - 1
        return file_index, index - self._offsets[file_index]

    def _count(self) -> int:
        return self._offsets[-1]

    def _row(self, index: int) -> dict:
        file_index, local = self._locate(index)
        return self.tables[file_index].slice(local, 1).to_pylist()[0]

    def _where(self, index: int) -> str:
        file_index, local = self._locate(index)
        return f"{self.paths[file_index]} row {local}"


class HubRows(Rows):
    """Rows of a `datasets.Dataset` loaded from the hub."""

    def __init__(self, dataset: Any, label: str):
        super().__init__()
        self.dataset, self.label = dataset, label

    def _count(self) -> int:
        return len(self.dataset)

    def _row(self, index: int) -> dict:
        return self.dataset[index]

    def _where(self, index: int) -> str:
        return f"{self.label} row {index}"


# -----------------------------------------------------------------------------
# Loading

def read_json_records(path: Path) -> ListRows:
    """A .jsonl file (one JSON value per line, blank lines skipped) or a .json file holding a list."""
    rows: list[dict] = []
    origins: list[tuple[Path, int]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(data, list):
            raise TaskDataError(f"{path}: a .json task file must hold a list of rows, got {type(data).__name__}")
        return ListRows(data, [(path, i + 1) for i in range(len(data))])
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path} line {line_number}: invalid JSON ({e.msg})") from e
        origins.append((path, line_number))
    return ListRows(rows, origins)


def _split_files(directory: Path, subset: str | None, split: str) -> list[Path]:
    """The files of `split` in a local directory, looked for in <dir>/<subset>, <dir>/data, then <dir>."""
    candidates = [directory / subset] if subset else []
    candidates += [directory / "data", directory]
    for folder in candidates:
        if not folder.is_dir():
            continue
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES
                       and (p.stem == split or p.name.startswith(split + "-")))
        if found:
            suffixes = {p.suffix for p in found}
            if len(suffixes) > 1:
                raise TaskDataError(f"{folder}: split {split!r} has files of several formats {sorted(suffixes)}; "
                                    f"keep one")
            return found
    looked = ", ".join(str(c) for c in candidates)
    raise TaskDataError(f"no files for split {split!r} under {directory} (looked for {split}.jsonl, {split}.json, "
                        f"{split}.parquet or {split}-*.parquet in {looked})")


def load_local_rows(path: str | Path, subset: str | None, split: str) -> Rows:
    """Rows of a local file or directory (see the module docstring for the layouts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TaskDataError(f"task data path {path} does not exist")
    files = [path] if path.is_file() else _split_files(path, subset, split)
    for file in files:
        if file.suffix not in LOCAL_SUFFIXES:
            raise TaskDataError(f"{file}: unsupported task file type (use one of {', '.join(LOCAL_SUFFIXES)})")
    if files[0].suffix == ".parquet":
        rows: Rows = ParquetRows(files)
    else:
        parts = [read_json_records(f) for f in files]
        rows = ListRows([r for p in parts for r in p.rows], [o for p in parts for o in p.origins])
    if len(rows) == 0:  # caught here: an empty split would fail much later (a division by its size, ...)
        names = ", ".join(str(f) for f in files)
        raise TaskDataError(f"{names} hold{'s' if len(files) == 1 else ''} no rows for split {split!r}: "
                            f"the dataset file is empty")
    return rows


def load_hub_rows(repo_id: str, subset: str | None, split: str, local_flag: str | None = None) -> Rows:
    """Rows of a hub dataset through `datasets.load_dataset` (which honours HF_ENDPOINT, HF_HOME and
    HF_DATASETS_OFFLINE as usual). `local_flag` is the stages' flag for a local copy, named in the error."""
    import datasets

    label = f"{repo_id} ({subset or 'default'}, split {split})"
    try:
        dataset = datasets.load_dataset(repo_id, subset, split=split)
    except Exception as e:  # re-raised with what we tried and how to work offline; nothing is swallowed
        how = f"{local_flag}=PATH" if local_flag else "the stage's --<dataset>_path flag"
        raise TaskDataError(f"could not load {label} from the Hugging Face hub: {type(e).__name__}: {e}. "
                            f"Give a local copy in the same schema with {how} (data_path= in Python) "
                            f"instead.") from e
    return HubRows(dataset, label)


def load_rows(repo_id: str, subset: str | None, split: str, data_path: str | Path | None = None,
              shuffle_seed: int | None = 42, local_flag: str | None = None) -> Rows:
    """A split from `data_path` when given, else from the hub; shuffled with shuffle_seed (None: as stored)."""
    if data_path is not None:
        rows = load_local_rows(data_path, subset, split)
    else:
        rows = load_hub_rows(repo_id, subset, split, local_flag)
    return rows.shuffle(shuffle_seed)


def require_keys(row: Any, keys: Sequence[str], rows: Rows, index: int) -> dict:
    """The row, after checking it is a dict with every key (the error names the file and line)."""
    if not isinstance(row, dict):
        raise TaskDataError(f"{rows.where(index)}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise TaskDataError(f"{rows.where(index)}: missing field(s) {missing} (has {sorted(row)})")
    return row
