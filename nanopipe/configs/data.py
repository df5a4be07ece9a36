"""`DataFlags`: where a stage's pretraining text comes from (mixed into every stage config that reads text)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from nanopipe.configs.base import NanoConfig, Off

# nanochat's pretraining data: FineWeb-Edu 100BT, reshuffled into shard_00000..shard_01822.parquet.
DEFAULT_HF_REPO = "karpathy/fineweb-edu-100b-shuffle"
HF_REPO_PATTERN = r"^[\w.-]+/[\w.-]+$"


def bare_parquet_name(value: str | None) -> str | None:
    if value is not None and (Path(value).name != value or not value.endswith(".parquet")):
        raise ValueError("must be a bare file name ending in .parquet, e.g. shard_01822.parquet")
    return value


class DataFlags(NanoConfig):
    """Where a stage's pretraining text comes from. Mixed into stage configs: `class X(CommonConfig, DataFlags)`.

    Every field is part of the cache key, `data_dir` included: for `local` the directory *is* the data,
    and a spurious cache miss (same shards under another path) costs a recompute, while a spurious hit
    would silently train on other text. `ShardSet.fingerprint()` identifies the shard contents.
    """

    data_source: Literal["builtin", "local", "hf"] = Field(
        "builtin", description="where the text comes from: builtin (offline corpus), local (parquet dir), hf (hub)")
    data_dir: str | None = Field(
        None, description="directory of parquet shards (default: NANOPIPE_HOME/base_data/<source>)")
    hf_repo_id: str = Field(
        DEFAULT_HF_REPO, pattern=HF_REPO_PATTERN, description="Hugging Face dataset repo of the hf source (owner/name)")
    num_shards: Off[int] = Field(
        None, ge=1, description="training shards to use, the first N by name; none or -1 = all present "
                                "(for hf: N are downloaded if missing)")
    val_shard: str | None = Field(
        None, description="file name of the pinned validation shard (default: val.parquet; for hf the "
                          "repo's known last shard)")

    _val_name = field_validator("val_shard")(bare_parquet_name)
