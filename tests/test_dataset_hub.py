"""Data layer, the Hub path: real huggingface-hub downloads against a local stand-in for the Hub on
127.0.0.1 (parallel download, resume of a dropped or killed download, retries, checksums, listing mismatches)."""

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.configs.base import ConfigError
from nanopipe.data import (DataError, DataFlags, DownloadError, download_shards, ensure_shards, iter_row_groups,
                           read_json)
from nanopipe.data.cli import main
from tests.fake_hub import FakeHub

SCHEMA = pa.schema([("text", pa.string())])


def all_texts(paths) -> list[str]:
    return [doc for texts, _ in iter_row_groups(paths) for doc in texts]


# -----------------------------------------------------------------------------
# hf: real huggingface-hub calls against a local stand-in for the Hub on 127.0.0.1

def parquet_bytes(docs: list[str], per_group: int) -> bytes:
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, SCHEMA, compression="none") as writer:
        for i in range(0, len(docs), per_group):
            writer.write_table(pa.table({"text": docs[i:i + per_group]}, schema=SCHEMA), row_group_size=per_group)
    return sink.getvalue().to_pybytes()


VAL = "shard_01822.parquet"  # the default repo's pinned validation shard


@pytest.fixture
def hub(monkeypatch):
    """nanochat's default repo id served from 127.0.0.1: shard_00000..00005 plus the validation shard."""
    files = {f"shard_{i:05d}.parquet": parquet_bytes([f"shard {i} doc {d} " + "lorem ipsum " * 40
                                                      for d in range(24)], per_group=8) for i in range(6)}
    files[VAL] = parquet_bytes([f"validation doc {d} " + "dolor sit amet " * 30 for d in range(16)], per_group=8)
    server = FakeHub(DataFlags().hf_repo_id, files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False, raising=False)
    # huggingface-hub's log handler holds whatever stderr was current at import; give it this test's
    for handler in logging.getLogger("huggingface_hub").handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", sys.stderr)
    yield server
    server.close()


def on_disk(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.glob("*.parquet"))


def test_hf_parallel_download_then_more_shards_keeps_validation(hub, home, capsys):
    hub.delay_s = 0.2
    main(["download", "-n", "3", "-w", "4", "--backoff_s=0.01"])
    data_dir = home / "base_data" / "hf" / "karpathy__fineweb-edu-100b-shuffle"
    assert on_disk(data_dir) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", VAL]
    assert all((data_dir / n).read_bytes() == hub.files[n] for n in on_disk(data_dir))
    assert hub.max_inflight >= 2  # the files really came down in parallel
    out = capsys.readouterr().out
    assert "[4/4]" in out and f"validation {VAL}" in out and "download:" in out
    assert read_json(data_dir / "hf_source.json")["commit"] == hub.commit
    # a stage asking for what is on disk works offline: no request reaches the hub
    requests_so_far = len(hub.log)
    shards = ensure_shards(DataFlags(data_source="hf", num_shards=2))
    assert [p.name for p in shards.train] == ["shard_00000.parquet", "shard_00001.parquet"] and shards.val.name == VAL
    assert len(ensure_shards(DataFlags(data_source="hf")).train) == 3
    assert len(hub.log) == requests_so_far
    # more training shards: only the new ones are fetched; validation is the same file, untouched
    val_before = (data_dir / VAL).stat()
    more = ensure_shards(DataFlags(data_source="hf", num_shards=5))
    assert [p.name for p in more.train][3:] == ["shard_00003.parquet", "shard_00004.parquet"]
    assert more.val == shards.val and (data_dir / VAL).stat().st_mtime_ns == val_before.st_mtime_ns
    assert len(hub.gets(VAL)) == 1 and len(hub.gets("shard_00000.parquet")) == 1
    assert all_texts([more.val]) == all_texts([shards.val])


def test_hf_resumes_a_dropped_connection_from_the_last_chunk_written(hub, tmp_path):
    chunk = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE  # huggingface-hub writes (and so resumes) in chunks
    name = "shard_00001.parquet"
    rng = random.Random(0)
    hub.files[name] = parquet_bytes([rng.randbytes(chunk // 8).hex() for _ in range(5)], per_group=2)
    assert len(hub.files[name]) > chunk + 1000
    hub.cut_after[name] = chunk + 1000  # the connection drops once, past the first chunk
    download_shards(data_dir=tmp_path, num_shards=2, backoff_s=0.01)
    assert (tmp_path / name).read_bytes() == hub.files[name]
    assert hub.gets(name) == [None, f"bytes={chunk}-"]  # one download, resumed within the same call
    assert hub.served[name] == chunk + 1000 + len(hub.files[name]) - chunk


def test_hf_a_killed_download_resumes_with_the_shards_it_lacks(hub, tmp_path):
    stalled, done = "shard_00001.parquet", ["shard_00000.parquet", "shard_00002.parquet", VAL]
    hub.stall_after[stalled] = 1000  # its server goes quiet mid-file; the process is killed meanwhile
    code = f"from nanopipe.data import download_shards; download_shards(data_dir={str(tmp_path)!r}, num_shards=3)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})  # HF_ENDPOINT: the fake hub
    try:
        deadline = time.time() + 120
        while hub.served[stalled] < 1000 or on_disk(tmp_path) != done:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, f"no progress: {on_disk(tmp_path)}, {hub.served}"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert on_disk(tmp_path) == done  # nothing under the unfinished shard's name
    assert len(list(tmp_path.rglob("*.incomplete"))) == 1  # huggingface-hub's temporary file, left by the kill
    download_shards(data_dir=tmp_path, num_shards=3, backoff_s=0.01)
    assert all((tmp_path / n).read_bytes() == hub.files[n] for n in on_disk(tmp_path))
    assert on_disk(tmp_path) == sorted(done + [stalled])
    assert all(len(hub.gets(n)) == 1 for n in done)  # finished shards are never fetched again
    # the unfinished one starts over: huggingface-hub keeps no partial file from one call to the next; the
    # temporary file the killed call left behind is gone
    assert hub.gets(stalled) == [None, None]
    assert not list(tmp_path.rglob("*.incomplete"))


def test_hf_retries_transient_server_errors(hub, tmp_path, capsys):
    hub.failures["shard_00000.parquet"] = [500, 503]
    hub.failures[FakeHub.API] = [502]
    download_shards(data_dir=tmp_path, num_shards=2, backoff_s=0.01)
    assert (tmp_path / "shard_00000.parquet").read_bytes() == hub.files["shard_00000.parquet"]
    assert len(hub.gets("shard_00000.parquet")) == 3
    assert hub.requests(FakeHub.API) == ["GET", "GET"]
    out = capsys.readouterr().out
    assert "shard_00000.parquet: attempt 2/5 failed" in out and "503" in out and "retrying" in out


def test_hf_retries_a_download_whose_checksum_does_not_match(hub, tmp_path, capsys):
    name = "shard_00001.parquet"
    hub.corrupt_once.add(name)  # one byte flipped on the way: the size is right, the sha256 is not
    download_shards(data_dir=tmp_path, num_shards=2, backoff_s=0.01)
    assert (tmp_path / name).read_bytes() == hub.files[name]
    assert len(hub.gets(name)) == 2
    assert f"{name}: attempt 1/5 failed (sha256 mismatch" in capsys.readouterr().out


@pytest.mark.parametrize("lie, needle", [("size", "file should be of size"), ("sha256", "sha256 mismatch")])
def test_hf_detects_files_that_do_not_match_the_listing(hub, tmp_path, lie, needle):
    name = "shard_00001.parquet"
    if lie == "size":  # huggingface-hub's own size check (against the HEAD answer) catches this one
        hub.listed_size[name] = len(hub.files[name]) + 10
    else:  # ours (against the listing) this one
        hub.listed_sha256[name] = "0" * 64
    with pytest.raises(DownloadError, match=rf"{name}: download failed after 3 attempts: .*{needle}"):
        download_shards(data_dir=tmp_path, num_shards=3, max_attempts=3, backoff_s=0.01)
    assert len(hub.gets(name)) == 3
    assert on_disk(tmp_path) == ["shard_00000.parquet", "shard_00002.parquet", VAL]  # the others are done
    assert not list(tmp_path.rglob(f"*{name}")) and not list(tmp_path.rglob("*.incomplete"))  # nothing half-kept


def test_hf_errors_name_the_file_or_flag(hub, tmp_path):
    hub.missing.add("shard_00002.parquet")  # listed, yet the hub answers 404: no point retrying
    with pytest.raises(DownloadError, match=r"1 of 4 shards failed.*shard_00002.parquet: 404"):
        download_shards(data_dir=tmp_path, num_shards=3, backoff_s=0.01)
    assert hub.requests("shard_00002.parquet") == ["HEAD"]
    with pytest.raises(DataError, match=r"validation shard nope.parquet \(--val_shard\) is not in hf repo"):
        download_shards(data_dir=tmp_path, val_shard="nope.parquet", backoff_s=0.01)
    with pytest.raises(ConfigError, match="--val_shard is required with --hf_repo_id=someone/else"):
        ensure_shards(DataFlags(data_source="hf", hf_repo_id="someone/else"))
    with pytest.raises(DataError, match="cannot list hf dataset repo someone/else"):
        download_shards("someone/else", data_dir=tmp_path, val_shard="x.parquet", backoff_s=0.01)
    with pytest.raises(DataError, match="no complete shards of hf repo"):
        ensure_shards(DataFlags(data_source="hf", data_dir=str(tmp_path / "empty")))
