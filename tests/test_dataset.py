"""Data layer: the builtin corpus, `prepare`, shard validation, the pinned validation shard, row-group
iteration with resumable positions, and the CLI."""

import collections
import filecmp
import itertools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.data import builtin
from nanopipe.common import atomic_write_json
from nanopipe.configs.base import CommonConfig, ConfigError, build_config, config_digest
from nanopipe.configs.flags import parse_config as parse_cli
from nanopipe.data import (MANIFEST_NAME, DataError, DataFlags, ensure_builtin, ensure_shards, iter_documents,
                           iter_row_groups, prepare_shards, read_json, resolve_data_dir, select_shards,
                           split_text_documents)
from nanopipe.data.cli import main

SCHEMA = pa.schema([("text", pa.string())])


def write_shard(path: Path, docs: list[str], per_group: int) -> Path:
    """A parquet shard with `per_group` documents per row group (no row groups at all for no docs)."""
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for i in range(0, len(docs), per_group):
            writer.write_table(pa.table({"text": docs[i:i + per_group]}, schema=SCHEMA), row_group_size=per_group)
    return path


def all_texts(paths) -> list[str]:
    return [doc for texts, _ in iter_row_groups(paths) for doc in texts]


def row_groups(path: Path) -> int:
    with pq.ParquetFile(path) as pf:
        return pf.num_row_groups


class Stage(CommonConfig, DataFlags):
    """A stage config with the data flags, as tok_train and base_train declare theirs."""


# -----------------------------------------------------------------------------
# builtin corpus

@pytest.fixture(scope="session")
def builtin_race(tmp_path_factory) -> tuple[Path, int]:
    """Two threads race to materialise the builtin corpus into one directory; (directory, builds run)."""
    target = tmp_path_factory.mktemp("home") / "base_data" / "builtin"
    with mock.patch.object(builtin, "write_split_shards", wraps=builtin.write_split_shards) as build:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: ensure_builtin(target), range(2)))
    assert results == [target, target]
    return target, build.call_count


@pytest.fixture(scope="session")
def builtin_corpus(builtin_race) -> Path:
    return builtin_race[0]


def test_builtin_corpus_is_real_text_of_sane_size(builtin_corpus):
    shards = select_shards(builtin_corpus)
    manifest = read_json(builtin_corpus / MANIFEST_NAME)
    train, val = all_texts(shards.train), all_texts([shards.val])
    assert manifest["documents"] == {"train": len(train), "val": len(val)}
    chars = sum(map(len, train + val))
    assert 1_000_000 < chars < 20_000_000, chars
    assert len(train) + len(val) >= 300
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.12, (len(train), len(val))
    # several shards of several row groups, so loaders and DDP striding have something to stride over
    assert len(shards.train) >= 3 and all(row_groups(p) >= 2 for p in shards.train + [shards.val])
    # English prose, not code: the commonest words are English function words, most characters letters
    text = "\n".join(train)
    words = collections.Counter(re.findall(r"[a-z]+", text.lower()))
    assert {"the", "of", "to", "a", "is"} <= {w for w, _ in words.most_common(15)}, words.most_common(15)
    visible = re.sub(r"\s", "", text)
    assert sum(c.isalpha() for c in visible) / len(visible) > 0.7
    # docstrings parsed from the standard library sources, and the pydoc topics where they ship
    everything = text + "\n".join(val)
    assert "JSON (JavaScript Object Notation)" in everything
    try:
        import pydoc_data.topics  # noqa: F401
        assert 'The "if" statement is used for conditional execution' in everything
    except ImportError:
        pass


def test_builtin_is_built_once_under_a_race(builtin_race):
    target, builds = builtin_race
    assert builds == 1  # the loser waited on the lock and found the finished corpus
    assert sorted(p.name for p in target.parent.iterdir()) == [".builtin.lock", "builtin"]  # no temp dirs left


def test_builtin_is_deterministic(builtin_corpus, tmp_path):
    again = ensure_builtin(tmp_path / "again")
    names = sorted(p.name for p in builtin_corpus.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert all(filecmp.cmp(builtin_corpus / n, again / n, shallow=False) for n in names)


def test_builtin_through_data_flags(builtin_corpus, home):
    assert resolve_data_dir(DataFlags()) == home / "base_data" / "builtin"
    shards = ensure_shards(DataFlags(data_dir=str(builtin_corpus), num_shards=2))
    assert [p.name for p in shards.train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert shards.val == builtin_corpus / "val.parquet"
    assert shards.fingerprint() == ensure_shards(DataFlags(data_dir=str(builtin_corpus), num_shards=2)).fingerprint()
    assert shards.fingerprint() != ensure_shards(DataFlags(data_dir=str(builtin_corpus), num_shards=3)).fingerprint()


def test_builtin_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "builtin").mkdir()
    (tmp_path / "builtin" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="no complete builtin corpus"):
        ensure_builtin(tmp_path / "builtin")


# -----------------------------------------------------------------------------
# prepare: .txt / .jsonl / .parquet into shards

def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def test_prepare_tinyshakespeare(shared_dir, tmp_path, capsys):
    source = shared_dir / "data" / "tinyshakespeare.txt"
    args = ["--input", str(source), "--val_fraction=0.1", "--row_group_docs=8", "--shard-chars", "200000",
            "--doc_chars=4000"]
    main(["prepare", *args, "--out", str(tmp_path / "a")])
    assert "--data_source=local" in capsys.readouterr().out
    shards = ensure_shards(DataFlags(data_source="local", data_dir=str(tmp_path / "a")))
    assert len(shards.train) >= 4 and all(row_groups(p) >= 2 for p in shards.train)
    train, val = all_texts(shards.train), all_texts([shards.val])
    assert train and val and 0.03 < len(val) / (len(train) + len(val)) < 0.25
    assert max(map(len, train + val)) <= 4000
    # every paragraph of the play is in exactly one document, intact
    pieces = [piece for doc in train + val for piece in doc.split("\n\n")]
    assert collections.Counter(pieces) == collections.Counter(paragraphs(source.read_text()))
    # deterministic: the same inputs give byte-identical shards
    main(["prepare", *args, "--out", str(tmp_path / "b")])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all(filecmp.cmp(tmp_path / "a" / n, tmp_path / "b" / n, shallow=False) for n in names)


def test_prepare_jsonl_and_parquet_inputs(tmp_path):
    docs = [f"Document {i}: the quick brown fox {'jumps ' * (i % 7)}over the lazy dog. ünïcødé ✓"
            for i in range(90)]
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": d, "id": i}) if i % 3 else json.dumps(d) for i, d in enumerate(docs[:60])]
    jsonl.write_text("\n".join(lines[:30] + [""] + lines[30:]) + "\n", encoding="utf-8")
    parquet = write_shard(tmp_path / "b.parquet", docs[60:] + [docs[0]], per_group=9)  # docs[0] twice
    main(["prepare", "--input", str(jsonl), str(parquet), "--out", str(tmp_path / "out"), "--val_fraction=0.25",
          "--row_group_docs=7", "--shard_chars=1500"])
    shards = select_shards(tmp_path / "out")
    train, val = all_texts(shards.train), all_texts([shards.val])
    assert collections.Counter(train + val) == collections.Counter(docs + [docs[0]])
    assert (train.count(docs[0]), val.count(docs[0])) in ((2, 0), (0, 2))  # duplicates share a split
    assert len(shards.train) >= 3 and row_groups(shards.train[0]) >= 2
    manifest = read_json(tmp_path / "out" / MANIFEST_NAME)
    assert manifest["inputs"] == ["a.jsonl", "b.parquet"] and manifest["val_shard"] == "val.parquet"


def test_split_text_documents_cuts_overlong_paragraphs():
    text = "short one\n\n" + "\n".join(["x" * 30] * 10) + "\n\n" + "y" * 250 + "\n \nlast"
    docs = list(split_text_documents(text, doc_chars=100))
    assert all(len(d) <= 100 for d in docs)
    assert re.sub(r"\s", "", "".join(docs)) == re.sub(r"\s", "", text)


@pytest.mark.parametrize("content, needle", [
    ('{"text": "fine"}\n{"text": "broken"\n', "bad.jsonl:2: not valid JSON"),
    ('{"text": "fine"}\n{"body": "no text field"}\n', "bad.jsonl:2: expected a string"),
])
def test_prepare_bad_jsonl_names_file_and_line(tmp_path, content, needle):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=re.escape(needle)):
        prepare_shards([tmp_path / "bad.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_prepare_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "missing.txt does not exist" in capsys.readouterr().err
    (tmp_path / "notes.csv").write_text("a,b")
    with pytest.raises(DataError, match="notes.csv: unsupported type"):
        prepare_shards([tmp_path / "notes.csv"], tmp_path / "out")
    (tmp_path / "a.txt").write_text("".join(f"paragraph number {i}\n\n" for i in range(50)))
    prepare_shards([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.5, doc_chars=100)
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        prepare_shards([tmp_path / "a.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="both splits need at least one"):
        prepare_shards([tmp_path / "a.txt"], tmp_path / "tiny", val_fraction=1e-9, doc_chars=100)


# -----------------------------------------------------------------------------
# shard directories: the pinned validation shard, clear errors

@pytest.fixture
def shard_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        write_shard(data / f"shard_{i:05d}.parquet", [f"train {i}.{j}" for j in range(10)], per_group=4)
    write_shard(data / "val.parquet", [f"val {j}" for j in range(6)], per_group=4)
    return data


def test_val_shard_is_pinned_by_name(shard_dir):
    flags = DataFlags(data_source="local", data_dir=str(shard_dir))
    before = ensure_shards(flags)
    val_texts = all_texts([before.val])
    # more training shards arrive, including ones that sort after the validation shard
    write_shard(shard_dir / "shard_00003.parquet", ["new a"], per_group=1)
    write_shard(shard_dir / "zzz_late.parquet", ["new b"], per_group=1)
    after = ensure_shards(flags)
    assert after.val == before.val and all_texts([after.val]) == val_texts
    assert after.train == before.train + [shard_dir / "shard_00003.parquet", shard_dir / "zzz_late.parquet"]
    assert ensure_shards(DataFlags(data_source="local", data_dir=str(shard_dir), num_shards=3)).train == before.train
    # another shard can be pinned explicitly; it then leaves the training set
    other = ensure_shards(DataFlags(data_source="local", data_dir=str(shard_dir), val_shard="zzz_late.parquet"))
    assert other.val.name == "zzz_late.parquet" and shard_dir / "val.parquet" in other.train
    # a directory's manifest can name its validation shard
    atomic_write_json(shard_dir / MANIFEST_NAME, {"val_shard": "shard_00000.parquet"})
    assert ensure_shards(flags).val.name == "shard_00000.parquet"


def _corrupt(path: Path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not parquet at all" * 10)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "no_text_column":
        pq.write_table(pa.table({"body": ["x"]}), path)
    elif kind == "not_strings":
        pq.write_table(pa.table({"text": [1, 2]}), path)
    elif kind == "no_rows":
        write_shard(path, [], per_group=1)
    elif kind == "missing":
        path.unlink()


@pytest.mark.parametrize("kind, needle", [
    ("empty", "is empty"), ("garbage", "not a readable parquet"), ("truncated", "not a readable parquet"),
    ("no_text_column", "no 'text' column"), ("not_strings", "expected string"), ("no_rows", "has no rows"),
])
def test_bad_shard_errors_name_the_file(shard_dir, kind, needle, capsys):
    _corrupt(shard_dir / "shard_00001.parquet", kind)
    with pytest.raises(DataError, match=needle) as err:
        ensure_shards(DataFlags(data_source="local", data_dir=str(shard_dir)))
    assert str(shard_dir / "shard_00001.parquet") in str(err.value)
    with pytest.raises(SystemExit) as exc:
        main(["info", "--data_source=local", f"--data_dir={shard_dir}"])
    assert exc.value.code == 2 and "shard_00001.parquet" in capsys.readouterr().err


def test_missing_shards_and_directories_are_named(shard_dir, tmp_path):
    local = dict(data_source="local", data_dir=str(shard_dir))
    (shard_dir / "val.parquet").unlink()
    with pytest.raises(DataError, match=r"validation shard .*val\.parquet is missing.*shard_00000"):
        ensure_shards(DataFlags(**local))
    with pytest.raises(DataError, match=r"--num_shards=5 but .* only 2 training shards"):
        ensure_shards(DataFlags(**local, val_shard="shard_00002.parquet", num_shards=5))
    with pytest.raises(DataError, match=r"nowhere does not exist.*prepare"):
        ensure_shards(DataFlags(data_source="local", data_dir=str(tmp_path / "nowhere")))


def test_info_summarises_a_directory(shard_dir, capsys):
    main(["info", "--data_source=local", f"--data_dir={shard_dir}", "-n", "2"])
    out = capsys.readouterr().out
    assert "train: 2 shards (shard_00000.parquet .. shard_00001.parquet), 6 row groups, 20 documents" in out
    assert "val: 1 shards (val.parquet), 2 row groups, 6 documents" in out


# -----------------------------------------------------------------------------
# row groups: striding across ranks, exact resume, epochs

@pytest.fixture
def layout(tmp_path) -> list[Path]:
    """Five files with 3, 0, 1, 4 and 2 row groups; every document names its file and row group."""
    files = []
    for f, groups in enumerate([3, 0, 1, 4, 2]):
        docs = [f"f{f}g{g}d{d}" for g in range(groups) for d in range(2)]
        files.append(write_shard(tmp_path / f"shard_{f:05d}.parquet", docs, per_group=2))
    return files


def test_ranks_cover_every_row_group_exactly_once(layout):
    everything = all_texts(layout)
    assert len(everything) == 20
    for world_size in (1, 2, 3, 4, 12):
        per_rank = [[doc for texts, _ in iter_row_groups(layout, rank, world_size) for doc in texts]
                    for rank in range(world_size)]
        merged = [doc for docs in per_rank for doc in docs]
        assert sorted(merged) == sorted(everything), world_size
        # rank r owns global row groups r, r + W, r + 2W, ...
        groups = sorted({doc[:-2] for doc in everything}, key=lambda g: everything.index(g + "d0"))
        assert [doc[:-2] for doc in per_rank[-1][::2]] == groups[world_size - 1::world_size]


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 3), (2, 4)])
def test_resume_from_any_position_continues_exactly(layout, rank, world_size):
    full = list(iter_row_groups(layout, rank, world_size))
    for k, (_, pos) in enumerate(full):
        assert list(iter_row_groups(layout, rank, world_size, start=pos)) == full[k + 1:]
    if world_size == 1:  # past the last row group of the last file
        assert full[-1][1] == {"file_index": 5, "row_group": 0, "epoch": 1}


def test_looping_counts_epochs_and_resumes_across_them(layout):
    one_epoch = [texts for texts, _ in iter_row_groups(layout, 1, 3)]
    stream = list(itertools.islice(iter_row_groups(layout, 1, 3, loop=True), 3 * len(one_epoch) + 1))
    assert [texts for texts, _ in stream] == (one_epoch * 4)[: len(stream)]
    assert [pos["epoch"] for _, pos in stream][len(one_epoch) - 1: len(one_epoch) + 1] == [2, 2]
    assert stream[-1][1]["epoch"] == 4
    for k in (len(one_epoch) - 1, len(one_epoch) + 1):  # at and just after an epoch boundary
        resumed = itertools.islice(iter_row_groups(layout, 1, 3, start=stream[k][1], loop=True), 5)
        assert list(resumed) == stream[k + 1: k + 6]


def test_bad_start_position_is_rejected(layout):
    with pytest.raises(AssertionError, match="row groups"):
        next(iter_row_groups(layout, start={"file_index": 0, "row_group": 9, "epoch": 1}))
    with pytest.raises(AssertionError, match="rank 2 out of range"):
        next(iter_row_groups(layout, rank=2, world_size=2))
    with pytest.raises(DataError, match="rank 11 gets no data"):
        next(iter_row_groups(layout, rank=11, world_size=12, loop=True))


def test_iter_documents_caps_documents_and_total(layout):
    docs = list(iter_documents(layout, doc_cap=4))
    assert docs == [d[:4] for d in all_texts(layout)]
    capped = list(iter_documents(layout, max_chars=25))
    assert sum(map(len, capped)) == 25 and capped[:3] == all_texts(layout)[:3]
    assert sum(map(len, iter_documents(layout, max_chars=10**9))) == sum(map(len, all_texts(layout)))


# -----------------------------------------------------------------------------
# flags and CLI

def test_data_flags_in_a_stage_config(capsys):
    cfg = parse_cli(Stage, ["--data_source=local", "--num-shards", "-1", "--val_shard=shard_00009.parquet"])
    assert (cfg.data_source, cfg.num_shards, cfg.val_shard) == ("local", None, "shard_00009.parquet")
    assert parse_cli(Stage, ["-n", "4"], short_aliases={"-n": "num_shards"}).num_shards == 4
    for argv, needle in ((["--val_shard=../x.parquet"], "--val_shard"), (["--val_shard=x.csv"], "--val_shard"),
                         (["--num_shards=0"], "--num_shards"), (["--data_source=web"], "'builtin'")):
        with pytest.raises(SystemExit) as exc:
            parse_cli(Stage, argv, prog="stage")
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    # every data flag is part of the cache key (data_dir too: for local data the directory is the data)
    base = build_config(Stage, {})
    for change in ({"data_source": "local"}, {"data_dir": "/elsewhere"}, {"num_shards": 3},
                   {"val_shard": "v.parquet"}):
        assert config_digest(build_config(Stage, change)) != config_digest(base), change
    assert config_digest(build_config(Stage, {"run": "other"})) == config_digest(base)
    with pytest.raises(ConfigError, match="--num_shards"):
        build_config(Stage, {"num_shards": "many"})


def test_cli_usage_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2 and "download, builtin, prepare, info" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--val_fraction" in out and "--row_group_docs" in out
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "prepare" in capsys.readouterr().out
