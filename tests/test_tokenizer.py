"""The BPE tokenizer: round-trips, special-token safety, determinism, atomic save, clear load errors."""

import base64
import json
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import nanopipe.tokenizer as tokmod
from nanopipe.tokenizer import (META_FILE, RANKS_FILE, SPECIAL_TOKENS, SPLIT_PATTERN, TOKEN_BYTES_FILE, Tokenizer,
                                TokenizerNotFoundError, get_token_bytes, get_tokenizer)

def stdlib_corpus() -> list[str]:
    """Real text available on any machine: the source of a few standard-library modules."""
    import argparse as m1, json.decoder as m2, textwrap as m3
    return [Path(m.__file__).read_text(encoding="utf-8") for m in (m1, m2, m3)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(stdlib_corpus(), vocab_size=600)


@pytest.fixture(scope="module")
def shakespeare(shared_dir) -> str:
    path = shared_dir / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found in the shared test data")
    return path.read_text(encoding="utf-8")


# -----------------------------------------------------------------------------
# Round trips (byte fallback)

special_free_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@special_free_settings
@given(st.text())
def test_any_unicode_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@special_free_settings
@given(st.binary())
def test_any_bytes_round_trip(tok, data):
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert all(not tok.is_special(i) for i in ids)


def test_unseen_scripts_fall_back_to_bytes(tok):
    text = "日本語のテキスト 🦀 Ελληνικά \x00\x7f"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_batch_encode_matches_single(tok):
    texts = ["first document", "", "second, with numbers 12345", "émoji 🎉"]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]


# -----------------------------------------------------------------------------
# Special tokens

texts_with_specials = st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=20)), max_size=8).map("".join)


@special_free_settings
@given(texts_with_specials)
def test_plain_text_never_yields_special_tokens(tok, text):
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids), (text, ids)
    assert tok.decode(ids) == text
    assert not any(tok.is_special(i) for row in tok.encode([text, text]) for i in row)


def test_literal_bos_text_is_not_bos(tok):
    ids = tok.encode("<|bos|>")
    assert tok.get_bos_token_id() not in ids and len(ids) > 1


def test_special_ids_follow_the_mergeable_tokens(tok):
    n = len(tok.mergeable_ranks)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    assert tok.get_bos_token_id() == n and tok.get_vocab_size() == n + 9
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert tok.decode([tok.get_bos_token_id()]) == "<|bos|>"


def test_prepend_and_append_by_name_or_id(tok):
    body = tok.encode("hello there")
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello there", prepend="<|bos|>", append="<|assistant_end|>") == [bos, *body, end]
    assert tok.encode("hello there", prepend=bos) == [bos, *body]
    assert tok.encode(["hello there", "x"], prepend=bos) == [[bos, *body], [bos, *tok.encode("x")]]
    with pytest.raises(ValueError, match="not a special token.*<\\|bos\\|>"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x", prepend=tok.get_vocab_size())
    with pytest.raises(TypeError):
        tok.encode(b"bytes are not text")


def test_numbers_split_into_at_most_two_digits(tok):
    ids = tok.encode("31415926535 and 2718281828")
    digit_tokens = [tok.id_to_token(i) for i in ids if tok.id_to_token(i).strip().isdigit()]
    assert digit_tokens and all(len(t) <= 2 for t in digit_tokens), digit_tokens


# -----------------------------------------------------------------------------
# Training

def test_training_is_deterministic(tmp_path):
    a = Tokenizer.train_from_iterator(stdlib_corpus(), vocab_size=520).save(tmp_path / "a")
    b = Tokenizer.train_from_iterator(iter(stdlib_corpus()), vocab_size=520).save(tmp_path / "b")
    for name in (RANKS_FILE, META_FILE, TOKEN_BYTES_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="vocab_size=264 is too small.*at least 265"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=264)


def test_a_tiny_corpus_gives_a_smaller_vocab():
    tok = Tokenizer.train_from_iterator(["ab ab ab"], vocab_size=1000)
    assert tok.get_vocab_size() < 1000
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


def test_trained_on_shakespeare_compresses_held_out_text(shakespeare):
    train, held_out = shakespeare[:300_000], shakespeare[-50_000:]
    docs = [train[i:i + 10_000] for i in range(0, len(train), 10_000)]
    tok = Tokenizer.train_from_iterator(docs, vocab_size=1024)
    assert tok.get_vocab_size() == 1024
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    bytes_per_token = len(held_out.encode("utf-8")) / len(ids)
    assert bytes_per_token > 2.0, bytes_per_token  # raw bytes would be 1.0; 1024 tokens reach ~2.3
    for word in (" the", " and", " thou", "KING"):  # speaker names start lines: no leading space
        assert len(tok.encode(word)) == 1, word


# -----------------------------------------------------------------------------
# Save / load

def test_save_load_round_trip_and_token_bytes(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(out)
    assert loaded.mergeable_ranks == tok.mergeable_ranks and loaded.special_ids == tok.special_ids
    assert loaded.pattern == tok.pattern == SPLIT_PATTERN
    text = "Round trip: ünïcödé, 12345 and <|bos|>."
    assert loaded.encode(text, prepend="<|bos|>") == tok.encode(text, prepend="<|bos|>")

    token_bytes = get_token_bytes(out)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (tok.get_vocab_size(),)
    for i in range(tok.get_vocab_size()):
        expected = 0 if tok.is_special(i) else len(tok.decode_single_token_bytes(i))
        assert token_bytes[i].item() == expected, i
    assert token_bytes[:256].tolist() == [1] * 256


def test_ranks_file_is_tiktoken_loadable(tok, tmp_path, monkeypatch):
    out = tok.save(tmp_path / "tok")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, no cache copy
    ranks = tiktoken.load.load_tiktoken_bpe(str(out / RANKS_FILE))
    assert ranks == tok.mergeable_ranks
    meta = json.loads((out / META_FILE).read_text())
    enc = tiktoken.Encoding("check", pat_str=meta["pattern"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    text = "Independently loaded, it encodes the same."
    assert enc.encode_ordinary(text) == tok.encode(text)
    first = (out / RANKS_FILE).read_bytes().splitlines()[0].split()
    assert base64.b64decode(first[0]) == b"\x00" and first[1] == b"0"


def test_get_tokenizer_defaults_to_home(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer().mergeable_ranks == tok.mergeable_ranks
    assert get_token_bytes().shape == (tok.get_vocab_size(),)


def test_crash_mid_save_leaves_no_half_tokenizer(tok, tmp_path, monkeypatch):
    def dying_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a tensor")
        raise OSError("disk died mid-write")

    monkeypatch.setattr(tokmod.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk died"):
        tok.save(tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory is left


def test_crash_mid_overwrite_keeps_the_old_tokenizer(tok, tmp_path, monkeypatch):
    out = tok.save(tmp_path / "tok")
    other = Tokenizer.train_from_iterator(["some other corpus " * 50], vocab_size=300)
    def killed(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(tokmod.torch, "save", killed)
    with pytest.raises(OSError, match="killed"):
        other.save(out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    assert Tokenizer.load(out).mergeable_ranks == tok.mergeable_ranks


def test_save_refuses_to_overwrite_when_asked(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    with pytest.raises(FileExistsError, match="tok"):
        tok.save(out, overwrite=False)


def test_missing_directory_error_names_it(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=f"{tmp_path / 'nowhere'}.*tok_train"):
        get_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerNotFoundError, match="nowhere"):
        get_token_bytes(tmp_path / "nowhere")


def test_incomplete_directory_error_names_the_missing_file(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    (out / TOKEN_BYTES_FILE).unlink()
    with pytest.raises(TokenizerNotFoundError, match=f"{out} is incomplete.*{TOKEN_BYTES_FILE}"):
        get_tokenizer(out)


def test_corrupt_ranks_file_is_detected(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    blob = (out / RANKS_FILE).read_bytes()
    (out / RANKS_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TokenizerNotFoundError, match="checksum"):
        get_tokenizer(out)
    (out / META_FILE).write_text("{not json")
    with pytest.raises(TokenizerNotFoundError, match=f"{META_FILE} is not valid JSON"):
        get_tokenizer(out)


def test_extra_json_lands_in_the_same_atomic_directory(tok, tmp_path):
    out = tok.save(tmp_path / "tok", extra_json={"metrics.json": {"vocab_size": tok.get_vocab_size()}})
    assert json.loads((out / "metrics.json").read_text()) == {"vocab_size": tok.get_vocab_size()}
    with pytest.raises(AssertionError, match="clobber"):
        tok.save(tmp_path / "tok2", extra_json={RANKS_FILE: {}})
    assert not (tmp_path / "tok2").exists()
