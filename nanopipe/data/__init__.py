"""
Pretraining text: parquet shards with a `text` column, one of which, pinned by name, is the validation split.

    nanopipe.data.shards    which shards a stage reads (--data_source builtin | local | hf), validation, reading
    nanopipe.data.write     writing shard directories; `prepare` from .txt/.md, .jsonl, .parquet files
    nanopipe.data.builtin   the offline corpus built from Python's own documentation
    nanopipe.data.hub       shards of a Hugging Face dataset repo (download, resume, retries, checksums)
    nanopipe.data.cli       `python -m nanopipe.data {download,builtin,prepare,info}` (also `nanopipe data`)
"""

from nanopipe.configs.data import DEFAULT_HF_REPO, DataFlags
from nanopipe.data.builtin import builtin_dir, builtin_documents, ensure_builtin
from nanopipe.data.hub import DownloadError, download_shards, ensure_hf_shards, list_hf_shards
from nanopipe.data.shards import (KNOWN_HF_VAL_SHARDS, MANIFEST_NAME, TEXT_COLUMN, VAL_SHARD_NAME, DataError, ShardSet,
                                  ensure_shards, iter_documents, iter_row_groups, list_parquet_files, read_json,
                                  resolve_data_dir, resolve_val_shard, select_shards, validate_shard)
from nanopipe.data.write import ShardWriter, prepare_shards, split_text_documents, write_split_shards

__all__ = ["DEFAULT_HF_REPO", "KNOWN_HF_VAL_SHARDS", "MANIFEST_NAME", "TEXT_COLUMN", "VAL_SHARD_NAME", "DataError",
           "DataFlags", "DownloadError", "ShardSet", "ShardWriter", "builtin_dir", "builtin_documents",
           "download_shards", "ensure_builtin", "ensure_hf_shards", "ensure_shards", "iter_documents",
           "iter_row_groups", "list_hf_shards", "list_parquet_files", "prepare_shards", "read_json",
           "resolve_data_dir", "resolve_val_shard", "select_shards", "split_text_documents", "validate_shard",
           "write_split_shards"]
