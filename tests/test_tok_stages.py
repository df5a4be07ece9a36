"""The tok_train / tok_eval stages: flags, end to end on the builtin corpus, train-split only, ranks, offline refs."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.common import parse_progress
from nanopipe.configs.base import build_config
from nanopipe.configs.flags import format_help
from nanopipe.configs.tok_eval import TokEvalConfig
from nanopipe.configs.tok_train import TokTrainConfig
from nanopipe.data import ensure_builtin
from nanopipe.stages import tok_eval, tok_train
from nanopipe.stages.tok_eval import load_reference
from nanopipe.tokenizer import RANKS_FILE, get_token_bytes, get_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory) -> Path:
    """The builtin corpus, built once per session (a few seconds) and copied into each test's home."""
    return ensure_builtin(tmp_path_factory.mktemp("corpus") / "builtin")


def stdlib_texts() -> list[str]:
    import argparse as m1, json.decoder as m2, textwrap as m3
    return [Path(m.__file__).read_text(encoding="utf-8") for m in (m1, m2, m3)]


def write_local_shards(data_dir: Path, train_docs: list[str], val_docs: list[str]) -> Path:
    data_dir.mkdir(parents=True)
    pq.write_table(pa.table({"text": train_docs}), data_dir / "shard_00000.parquet")
    pq.write_table(pa.table({"text": val_docs}), data_dir / "val.parquet")
    return data_dir


def offline_env(home: Path, tiktoken_cache: Path) -> dict:
    """Environment for a stage subprocess: tmp home, empty tiktoken cache, proxies that refuse any download."""
    env = dict(os.environ, NANOPIPE_HOME=str(home), TIKTOKEN_CACHE_DIR=str(tiktoken_cache), PYTHONPATH=str(REPO),
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return env


# -----------------------------------------------------------------------------
# Flags

def test_help_shows_the_seed_flags_and_defaults():
    text = format_help(TokTrainConfig, "tok_train")
    for needle in ("--max_chars", "10000000000", "--vocab_size", "32768", "--doc_cap", "10000", "--data_source",
                   "--out_dir", "torchrun"):
        assert needle in text, needle
    assert "--references" in format_help(TokEvalConfig, "tok_eval")


@pytest.mark.parametrize("argv, needle", [
    (["--vocab_size=100"], "--vocab_size"),
    (["--vocab_size=264"], ">= 265"),
    (["--max_chars=0"], "--max_chars"),
    (["--doc_cap=0"], "--doc_cap"),
    (["--data_source=s3"], "--data_source"),
])
def test_bad_tok_train_flags_exit_2_before_any_work(argv, needle, home, capsys):
    with pytest.raises(SystemExit) as exc:
        tok_train.main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert list(home.iterdir()) == []  # nothing was read or written


def test_doc_cap_minus_one_means_no_crop_and_is_semantic():
    cfg = build_config(TokTrainConfig, {"doc_cap": -1})
    assert cfg.doc_cap is None
    assert {"out_dir", "run", "log_every_chars", "val_chars"} <= set(TokTrainConfig.NON_SEMANTIC)
    assert "vocab_size" not in TokTrainConfig.NON_SEMANTIC and "max_chars" not in TokTrainConfig.NON_SEMANTIC


def test_unknown_reference_encoding_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as exc:
        tok_eval.main(["--references=gpt2,gpt5_secret"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--references" in err and "gpt5_secret" in err and "cl100k_base" in err


# -----------------------------------------------------------------------------
# End to end, as a user runs it: builtin corpus, everything under NANOPIPE_HOME

def test_tok_train_then_tok_eval_end_to_end(home, builtin_corpus, tmp_path_factory):
    shutil.copytree(builtin_corpus, home / "base_data" / "builtin")
    env = offline_env(home, tmp_path_factory.mktemp("empty-tiktoken-cache"))
    workdir = tmp_path_factory.mktemp("cwd")
    train = subprocess.run(
        [sys.executable, "-m", "nanopipe.stages.tok_train", "--vocab_size=512", "--max_chars=300_000",
         "--log-every-chars", "100000", "--data_source=builtin"],
        capture_output=True, text=True, env=env, cwd=workdir, timeout=120)
    assert train.returncode == 0, train.stderr

    progress = [p for p in map(parse_progress, train.stdout.splitlines()) if p]
    reads = [p["step"] for p in progress if p.get("phase") == "read"]
    assert reads == sorted(reads) and len(reads) >= 3 and reads[-1] == 300_000, progress
    assert progress[-1]["phase"] == "done" and progress[-1]["vocab_size"] == 512
    assert re.search(r"^read 1\d\d,\d{3} chars in \d+ docs", train.stdout, re.M), train.stdout  # human progress

    metrics = json.loads((home / "tokenizer" / "metrics.json").read_text())
    assert metrics["vocab_size"] == metrics["vocab_size_requested"] == 512
    assert metrics["train_chars"] == 300_000 and metrics["val_shard"] == "val.parquet"
    assert 1.3 < metrics["val_bytes_per_token"] < 5, metrics
    tok = get_tokenizer()  # NANOPIPE_HOME/tokenizer by default
    assert tok.get_vocab_size() == 512 and get_token_bytes().shape == (512,)
    assert sorted(p.name for p in home.iterdir()) == ["base_data", "tokenizer"]  # no temporary leftovers

    evaluation = subprocess.run([sys.executable, "-m", "nanopipe.stages.tok_eval", "--data_source=builtin"],
                                capture_output=True, text=True, env=env, cwd=workdir, timeout=120)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "note: skipping the GPT-2 comparison" in evaluation.stdout
    assert "not in the tiktoken cache" in evaluation.stdout
    report = json.loads((home / "tok_eval" / "metrics.json").read_text())
    assert report["val_bytes_per_token"] == metrics["val_bytes_per_token"]  # same pinned val shard, same tokenizer
    assert set(report["compression"]) == {"val", *tok_eval.SAMPLE_TEXTS}
    assert set(report["references_skipped"]) == {"gpt2", "cl100k_base"} and report["references_compared"] == []
    for kind, row in report["compression"].items():
        assert row["ours"]["bytes_per_token"] >= 1.0, (kind, row)  # byte fallback: never worse than raw bytes


# -----------------------------------------------------------------------------
# What is read

def test_trains_on_train_shards_only_within_max_chars_and_doc_cap(tmp_path):
    marker = "Quuxolotl"
    data_dir = write_local_shards(tmp_path / "shards", stdlib_texts(), [f"{marker} " * 3000])
    cfg = build_config(TokTrainConfig, {"data_source": "local", "data_dir": str(data_dir), "vocab_size": 400, "doc_cap": None,
                                        "out_dir": str(tmp_path / "tok")})
    metrics = tok_train.run(cfg)
    tok = get_tokenizer(tmp_path / "tok")
    assert metrics["train_chars"] == sum(len(t) for t in stdlib_texts()) and metrics["train_docs"] == 3
    assert len(tok.encode(" " + marker)) >= 3  # a word seen thousands of times in val only was never merged
    assert metrics["val_bytes"] == len(f"{marker} ".encode()) * 3000

    small = cfg.model_copy(update={"doc_cap": 1000, "max_chars": 2500, "out_dir": str(tmp_path / "tok")})
    metrics = tok_train.run(small)  # retrain over the same directory: replaced whole
    assert (metrics["train_chars"], metrics["train_docs"]) == (2500, 3)
    assert json.loads((tmp_path / "tok" / "metrics.json").read_text())["train_chars"] == 2500


def test_training_twice_gives_identical_ranks(tmp_path):
    data_dir = write_local_shards(tmp_path / "shards", stdlib_texts(), ["held out text"])
    for name in ("a", "b"):
        tok_train.run(build_config(TokTrainConfig, {"data_source": "local", "data_dir": str(data_dir),
                                                    "vocab_size": 700, "out_dir": str(tmp_path / name)}))
    assert (tmp_path / "a" / RANKS_FILE).read_bytes() == (tmp_path / "b" / RANKS_FILE).read_bytes()


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tok_train.main(["--data_source=local", f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'tok'}"])
    assert exc.value.code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_non_zero_ranks_do_nothing_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = build_config(TokTrainConfig, {"data_source": "local", "data_dir": str(tmp_path / "absent"),
                                        "out_dir": str(tmp_path / "tok")})
    assert tok_train.run(cfg) == {}
    assert tok_eval.run(build_config(TokEvalConfig, {"tokenizer_dir": str(tmp_path / "absent")})) == {}
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# tok_eval details

def test_tok_eval_without_a_tokenizer_names_the_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tok_eval.main([f"--tokenizer_dir={tmp_path / 'missing-tok'}", f"--out_dir={tmp_path / 'out'}"])
    assert exc.value.code == 2
    assert f"no tokenizer directory at {tmp_path / 'missing-tok'}" in capsys.readouterr().err


def test_references_load_only_from_the_cache_unless_downloads_are_allowed(tmp_path, monkeypatch):
    import requests
    import tiktoken.load

    def no_network(*args, **kwargs):
        raise AssertionError("tok_eval tried to download while downloads are not allowed")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    original = tiktoken.load.read_file
    enc, why = load_reference("cl100k_base", allow_download=False, timeout_s=5)
    assert enc is None and "not in the tiktoken cache" in why and str(tmp_path / "cache") in why
    assert tiktoken.load.read_file is original  # the guard is undone


def test_a_hung_download_times_out(monkeypatch):
    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", lambda name: time.sleep(3))
    t0 = time.perf_counter()
    enc, why = load_reference("gpt2", allow_download=True, timeout_s=0.2)
    assert enc is None and "did not finish within 0.2 s" in why
    assert time.perf_counter() - t0 < 2
