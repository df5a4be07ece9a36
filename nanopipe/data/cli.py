"""
Pretraining text: parquet shards with a `text` column (the FineWeb-Edu / ClimbMix layout), one shard of
which, pinned by name, is the validation split.

    python -m nanopipe.data download -n 8                # hf: first 8 training shards + the validation shard
    python -m nanopipe.data builtin                      # materialise the offline corpus, print where
    python -m nanopipe.data prepare --input a.txt b.jsonl --out DIR [--val_fraction=0.05]
    python -m nanopipe.data info --data_source=local --data_dir=DIR [--verify]
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

Exit codes as for the stages: 2 for a bad flag or a bad input (a missing, corrupt or empty shard, named in one
line with the fix), 1 for a download that failed after its retries (worth retrying later).
"""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
from pydantic import Field, field_validator

from nanopipe.common import get_base_dir
from nanopipe.configs.base import NanoConfig, Off
from nanopipe.configs.data import DEFAULT_HF_REPO, HF_REPO_PATTERN, DataFlags, bare_parquet_name
from nanopipe.configs.flags import parse_config
from nanopipe.data.builtin import ensure_builtin
from nanopipe.data.hub import download_shards
from nanopipe.data.shards import MANIFEST_NAME, DataError, ensure_shards, read_json, verify_shard
from nanopipe.data.write import prepare_shards
from nanopipe.exit_codes import StageError

# -----------------------------------------------------------------------------
# Command line: python -m nanopipe.data <command> [--flag=value ...]  (also `nanopipe data <command>`)

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

    verify: bool = Field(False, description="also read and decompress every page of every shard and check its "
                                            "text is UTF-8 (a full read; without it only footers and schemas)")


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
    for split, paths, stats in (("train", shards.train, shards.train_stats), ("val", [shards.val], shards.val_stats)):
        groups = rows = size = 0
        for path in paths:
            with pq.ParquetFile(path) as pf:
                groups, rows = groups + pf.num_row_groups, rows + pf.metadata.num_rows
            size += path.stat().st_size
        names = paths[0].name + (f" .. {paths[-1].name}" if len(paths) > 1 else "")
        print(f"{split:>5}: {len(paths)} shards ({names}), {groups} row groups, {rows:,} documents, "
              f"{size / 1e6:.1f} MB; {stats.describe()}")
    if cfg.verify:
        _verify(shards.train + [shards.val])
    print(f"fingerprint: {shards.fingerprint()}")


def _verify(paths: list) -> None:
    """Read every page of every shard; name every bad one (file and row group), then fail with the first."""
    errors = []
    for path in paths:
        try:
            verify_shard(path)
        except DataError as err:
            errors.append(err)
            print(f"  corrupt: {err}")
    if errors:
        raise DataError(f"{len(errors)} of {len(paths)} shards failed verification; first: {errors[0]}")
    print(f"verified: every page of {len(paths)} shards reads back, text is UTF-8")


COMMANDS = {
    "download": (DownloadCommand, _cmd_download),
    "builtin": (BuiltinCommand, _cmd_builtin),
    "prepare": (PrepareCommand, _cmd_prepare),
    "info": (InfoCommand, _cmd_info),
}


def main(argv: list[str] | None = None, prog: str = "python -m nanopipe.data") -> None:
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
    cfg = parse_config(cls, rest, prog=prog, short_aliases={"-n": "num_shards", "-w": "num_workers"})
    if cls is PrepareCommand and not cfg.input:
        print(f"{prog}: error: --input: give at least one .txt/.md/.jsonl/.parquet file", file=sys.stderr)
        raise SystemExit(2)
    try:
        run(cfg)
    except StageError as err:  # the stages' convention: one line, its exit code (2 bad input, 1 failed download)
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code)


if __name__ == "__main__":
    main()
