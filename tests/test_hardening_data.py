"""Bad input ends cleanly: every stage and `python -m nanopipe.data` exit 2 with one line naming the input and
the fix, before work, for a missing, corrupt or degenerate tokenizer or data directory (nanopipe.exit_codes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanopipe.configs.data import DataFlags
from nanopipe.data import DataError, ensure_shards
from nanopipe.data.cli import main as data_main
from nanopipe.data.shards import text_stats
from nanopipe.dataloader import BestFitLoader, DataLoaderError, estimate_epochs
from nanopipe.exit_codes import ExitCode
from nanopipe.stages import base_eval, base_train, tok_eval, tok_train
from nanopipe.tokenizer import META_FILE, TOKEN_BYTES_FILE, TokenizerError, get_token_bytes, get_tokenizer
from tests.fixtures.tiny_corpus import build_tokenizer, shakespeare_paragraphs, tiny_model_flags, write_shard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shared_dir):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(path)
    return path


@pytest.fixture
def data_dir(tmp_path, shared_dir):
    paragraphs = shakespeare_paragraphs()
    write_shard(tmp_path / "data" / "shard_00000.parquet", paragraphs[:400], row_group_docs=50)
    write_shard(tmp_path / "data" / "val.parquet", paragraphs[400:500], row_group_docs=50)
    return tmp_path / "data"


def one_line_exit_2(capsys, run, *needles: str) -> str:
    """Run a main(); it must exit 2 with exactly one stderr line (no traceback) that holds every needle."""
    with pytest.raises(SystemExit) as exc:
        run()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == ExitCode.BAD_INPUT, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train(tok_dir, data_dir, tmp_path, **flags):
    return lambda: base_train.main(tiny_model_flags(tokenizer_dir=tok_dir, data_dir=data_dir,
                                                    out_dir=tmp_path / "out", **flags))


def corrupt_pages(path: Path, row_group: int) -> None:
    """Overwrite bytes inside one row group's compressed data pages; the footer stays intact."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = b"\xaa" * 64
    path.write_bytes(bytes(data))


def non_utf8_shard(path: Path) -> None:
    texts = pa.array([b"good text", b"bad \xff\xfe bytes"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), path)


# -----------------------------------------------------------------------------
# 1. Missing or corrupt inputs: exit 2, one line naming the file

def test_missing_tokenizer_and_data_dirs(tok_dir, data_dir, tmp_path, capsys):
    one_line_exit_2(capsys, train(tmp_path / "no-tok", data_dir, tmp_path), str(tmp_path / "no-tok"), "tok_train")
    one_line_exit_2(capsys, train(tok_dir, tmp_path / "no-data", tmp_path), str(tmp_path / "no-data"), "prepare")
    one_line_exit_2(capsys, lambda: base_eval.main([f"--tokenizer_dir={tmp_path / 'no-tok'}", "--eval=bpb",
                                                    "--data_source=local", f"--data_dir={data_dir}"]),
                    str(tmp_path / "no-tok"))
    one_line_exit_2(capsys, lambda: base_eval.main(["--eval=bpb", "--data_source=local",
                                                    f"--data_dir={tmp_path / 'no-data'}"]), str(tmp_path / "no-data"))


@pytest.mark.parametrize("content", [b"garbage" * 10, "dict", "short"])
def test_bad_token_bytes_is_named(tok_dir, data_dir, tmp_path, capsys, content):
    bad = tmp_path / "tok"
    shutil.copytree(tok_dir, bad)
    if content == "dict":
        torch.save({"not": "a tensor"}, bad / TOKEN_BYTES_FILE)
    elif content == "short":
        torch.save(torch.zeros(10, dtype=torch.int32), bad / TOKEN_BYTES_FILE)
    else:
        (bad / TOKEN_BYTES_FILE).write_bytes(content)
    with pytest.raises(TokenizerError, match=str(bad / TOKEN_BYTES_FILE)):
        get_token_bytes(bad)
    one_line_exit_2(capsys, train(bad, data_dir, tmp_path), str(bad / TOKEN_BYTES_FILE), "tok_train")


@pytest.mark.parametrize("edit, needle", [
    (lambda meta: [meta], "unknown tokenizer format"),
    (lambda meta: {k: v for k, v in meta.items() if k != "ranks_sha256"}, "ranks_sha256"),
    (lambda meta: {**meta, "vocab_size": meta["vocab_size"] + 1}, "does not match"),
    (lambda meta: {**meta, "num_mergeable": 7}, "num_mergeable=7"),
    (lambda meta: {**meta, "special_tokens": {k: v + 1 for k, v in meta["special_tokens"].items()}}, "special token"),
    (lambda meta: {**meta, "pattern": "("}, "split pattern"),
])
def test_a_tokenizer_meta_that_does_not_match_is_named(tok_dir, tmp_path, capsys, edit, needle):
    bad = tmp_path / "tok"
    shutil.copytree(tok_dir, bad)
    meta = json.loads((bad / META_FILE).read_text())
    (bad / META_FILE).write_text(json.dumps(edit(meta)))
    with pytest.raises(TokenizerError, match=needle) as err:
        get_tokenizer(bad)
    assert str(bad / META_FILE) in str(err.value)
    one_line_exit_2(capsys, lambda: tok_eval.main([f"--tokenizer_dir={bad}", f"--out_dir={tmp_path / 'out'}"]),
                    str(bad / META_FILE))


def test_a_bad_parquet_file_is_named(tok_dir, data_dir, tmp_path, capsys):
    (data_dir / "shard_00001.parquet").write_bytes(b"PAR1 not really parquet")
    one_line_exit_2(capsys, train(tok_dir, data_dir, tmp_path), str(data_dir / "shard_00001.parquet"))


def test_null_documents_are_skipped_and_non_utf8_is_named(tok_dir, data_dir, tmp_path, capsys):
    tok = get_tokenizer(tok_dir)
    docs = shakespeare_paragraphs()[:60]
    with_nulls = write_shard(tmp_path / "nulls.parquet", [None, ""] * 30 + docs, row_group_docs=16)
    with BestFitLoader(tok, [with_nulls], 2, 32) as loader:
        for _ in range(3):
            inputs, _ = next(loader)
        assert loader.skipped_docs > 0 and loader.skipped_docs % 60 == 0  # 60 per pass over the shard
    stats = text_stats([with_nulls])
    assert (stats.null_documents, stats.empty_documents, stats.usable_documents) == (30, 30, 60)

    bad = data_dir / "shard_00001.parquet"
    non_utf8_shard(bad)
    with pytest.raises(DataError, match=rf"{bad} row group 0 holds text that is not valid UTF-8"):
        ensure_shards(DataFlags(data_source="local", data_dir=str(data_dir)))
    one_line_exit_2(capsys, train(tok_dir, data_dir, tmp_path), str(bad), "UTF-8")
    with BestFitLoader(tok, [bad], 1, 8) as loader, pytest.raises(DataError, match=f"{bad} row group 0"):
        next(loader)


# -----------------------------------------------------------------------------
# 2. Degenerate data: refused when there is nothing to train on, a warning when a run repeats it many times

def test_a_corpus_of_empty_documents_is_refused_before_work(tok_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    write_shard(empty / "shard_00000.parquet", ["", "", None, ""], row_group_docs=2)
    write_shard(empty / "val.parquet", ["held out text"], row_group_docs=2)
    with pytest.raises(DataError, match=rf"training shards in {empty} hold no non-empty document .*1 null, 3 empty"):
        ensure_shards(DataFlags(data_source="local", data_dir=str(empty)))
    one_line_exit_2(capsys, train(tok_dir, empty, tmp_path), str(empty), "no non-empty document")
    one_line_exit_2(capsys, lambda: tok_train.main(["--data_source=local", f"--data_dir={empty}",
                                                    f"--out_dir={tmp_path / 'tok'}"]), str(empty))
    assert not (tmp_path / "tok").exists()
    # the loader itself never packs BOS-only rows: it names the shards instead of looping over nothing
    tok = get_tokenizer(tok_dir)
    with BestFitLoader(tok, [empty / "shard_00000.parquet"], 1, 8) as loader:
        with pytest.raises(DataLoaderError, match="gets no documents.*4 null or empty skipped"):
            next(loader)


def test_empty_documents_never_become_bos_rows(tok_dir, tmp_path):
    tok = get_tokenizer(tok_dir)
    bos = tok.get_bos_token_id()
    shard = write_shard(tmp_path / "mixed.parquet", ["", "a", ""] * 200, row_group_docs=32)
    with BestFitLoader(tok, [shard], 4, 16) as loader:
        inputs, _ = next(loader)
    rows = inputs.tolist()
    pairs = [(a, b) for row in rows for a, b in zip(row, row[1:])]
    assert (bos, bos) not in pairs  # an empty document would be a BOS followed by the next BOS
    assert loader.skipped_docs > 0


def test_a_run_over_a_tiny_corpus_warns_of_many_epochs(tok_dir, tmp_path, capsys):
    tok = get_tokenizer(tok_dir)
    one_row = write_shard(tmp_path / "one.parquet", ["To be, or not to be, that is the question."], row_group_docs=1)
    epochs, available, stats = estimate_epochs(tok, [one_row], planned_tokens=512 * 6)
    assert stats.usable_documents == 1 and 5 < available < 40 and epochs > 10
    with BestFitLoader(tok, [one_row], 4, 64, planned_tokens=512 * 6):
        pass
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "passes over the same text" in warning[0] and str(tmp_path) in warning[0]
    big = write_shard(tmp_path / "big.parquet", shakespeare_paragraphs(), row_group_docs=64)
    with BestFitLoader(tok, [big], 4, 64, planned_tokens=512 * 6):
        pass
    assert "warning:" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# 3. Corrupted pages: `info --verify` names file and row group; a read during training names them too

def test_corrupted_pages_are_found_by_verify_and_named_during_training(tok_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    paragraphs = shakespeare_paragraphs()
    shard = data / "shard_00000.parquet"
    pq.write_table(pa.table({"text": paragraphs[:800]}), shard, row_group_size=200, compression="zstd",
                   use_dictionary=False)
    write_shard(data / "val.parquet", paragraphs[800:900], row_group_docs=50)
    corrupt_pages(shard, row_group=2)

    # stage start stays cheap for big data: the footers say enough and nothing is decompressed
    assert not text_stats([shard], exact_bytes=0).exact
    one_line_exit_2(capsys, lambda: data_main(["info", "--verify", "--data_source=local", f"--data_dir={data}"]),
                    str(shard), "row group 2")
    with BestFitLoader(get_tokenizer(tok_dir), [shard], 4, 64, buffer_docs=8) as loader:
        with pytest.raises(DataError, match=rf"{shard} row group 2 cannot be read .*corrupt") as err:
            for _ in range(500):
                next(loader)
    assert err.value.exit_code == ExitCode.BAD_INPUT


def test_verify_passes_a_clean_directory(data_dir, capsys):
    data_main(["info", "--verify", "--data_source=local", f"--data_dir={data_dir}"])
    out = capsys.readouterr().out
    assert "verified: every page of 2 shards" in out and "400 non-empty documents" in out
