"""
Byte-level BPE tokenizer in the GPT-4 style: trained with rustbpe, encoded and decoded with tiktoken.

    tok = Tokenizer.train_from_iterator(texts, vocab_size=32768)   # rustbpe does the training
    tok.save(dir)                                                  # atomic directory, see below
    tok = get_tokenizer(dir)                                       # default: NANOPIPE_HOME/tokenizer
    ids = tok.encode(["doc one", "doc two"], prepend="<|bos|>")    # batched, multi-threaded

Token ids: 0..255 are the raw bytes (so any text, in any script, round-trips: "byte fallback"),
then the learned merges in merge order, then the special tokens. Plain text never encodes to a
special token, even when it contains "<|bos|>" literally; specials are only added on purpose
(`prepend`/`append`/`encode_special`).

A tokenizer directory holds (written as a whole or not at all, via `atomic_directory`):
    tokenizer.tiktoken   the mergeable ranks, one "base64(token) rank" line each: tiktoken's own format,
                         loadable by `tiktoken.load.load_tiktoken_bpe`
    token_bytes.pt       int32 tensor [vocab]: UTF-8 byte length of each token, 0 for specials
                         (turns a loss in nats/token into bits per byte)
    tokenizer.json       split pattern, special tokens and their ids, checksum of the ranks file
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Sequence

import rustbpe
import tiktoken
import torch

from nanopipe.common import atomic_directory, get_base_dir
from nanopipe.exit_codes import ExitCode, StageError
from nanopipe.vocab import BOS_TOKEN, MIN_VOCAB_SIZE, SPECIAL_TOKENS  # noqa: F401 - part of this API


# GPT-4's (cl100k) split regex, except numbers split into runs of at most 2 digits instead of 3:
# nanochat measured 2 to compress best at a 32K vocab (fewer tokens spent on number chunks).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
FORMAT_NAME = "nanopipe-bpe"
FORMAT_VERSION = 1


class TokenizerError(StageError, ValueError):
    """A tokenizer directory cannot be used. The message names the file and how to fix it; a bad input, so a
    stage exits with BAD_INPUT (2): retrying does not help, retraining or pointing at the right one does."""

    exit_code = ExitCode.BAD_INPUT


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """A tokenizer directory is missing, incomplete or corrupt. The message names the directory or file."""


def _how_to_train(tokenizer_dir: Path) -> str:
    return f"train one with: python -m nanopipe.stages.tok_train --out_dir={tokenizer_dir}"


# -----------------------------------------------------------------------------
# The ranks file: tiktoken's text format, written and read here (tiktoken's own loader copies every file
# it reads into its download cache, keyed by path, and would serve a stale copy after a retrain).

def dump_ranks(ranks: dict[bytes, int]) -> bytes:
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(ranks.items(), key=lambda item: item[1])]
    return b"\n".join(lines) + b"\n"


def parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise TokenizerNotFoundError(f"{path}: line {lineno} is not 'base64-token rank': {line[:80]!r}") from err
    return ranks


# -----------------------------------------------------------------------------

class Tokenizer:
    """A trained BPE: the mergeable ranks + split pattern, with the special tokens appended after them."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS), bos_token: str = BOS_TOKEN):
        n = len(mergeable_ranks)
        assert sorted(mergeable_ranks.values()) == list(range(n)), "ranks must be exactly 0..n-1"
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        assert not missing, f"byte fallback needs all 256 single bytes as tokens; missing {missing[:8]}..."
        assert bos_token in special_tokens, f"bos token {bos_token!r} is not among {list(special_tokens)}"
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = list(special_tokens)
        self.bos_token = bos_token
        self.special_ids = {name: n + i for i, name in enumerate(self.special_tokens)}
        self.enc = tiktoken.Encoding(name="nanopipe", pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_ids)
        self.byte_ids = [self.mergeable_ranks[bytes([b])] for b in range(256)]
        self.bos_token_id = self.special_ids[bos_token]

    # --- training ---------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Train on an iterator of documents. vocab_size counts the special tokens too.

        A corpus with fewer distinct pairs than the merges asked for yields a smaller vocabulary;
        check get_vocab_size() against what you asked for.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + "
                             f"{len(SPECIAL_TOKENS)} special tokens = at least {MIN_VOCAB_SIZE}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    # --- persistence ------------------------------------------------------

    def save(self, tokenizer_dir: str | os.PathLike, overwrite: bool = True,
             extra_json: dict[str, object] | None = None) -> Path:
        """Write the tokenizer directory atomically: a crash leaves the previous one (or none), never half.

        extra_json: more files to write inside it in the same atomic step, {file name: JSON-able object}
        (the training stage puts its metrics.json there, so the directory and its metrics appear together).
        """
        tokenizer_dir = Path(tokenizer_dir)
        ranks_blob = dump_ranks(self.mergeable_ranks)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_ids,
            "bos_token": self.bos_token,
            "num_mergeable": len(self.mergeable_ranks),
            "vocab_size": self.get_vocab_size(),
            "ranks_sha256": hashlib.sha256(ranks_blob).hexdigest(),
        }
        with atomic_directory(tokenizer_dir, overwrite=overwrite) as tmp:
            (tmp / RANKS_FILE).write_bytes(ranks_blob)
            torch.save(self.token_byte_lengths(), tmp / TOKEN_BYTES_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            for name, obj in (extra_json or {}).items():
                assert name not in (RANKS_FILE, TOKEN_BYTES_FILE, META_FILE), f"{name} would clobber the tokenizer"
                (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            for name in (RANKS_FILE, TOKEN_BYTES_FILE, META_FILE, *(extra_json or {})):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        return tokenizer_dir

    @classmethod
    def load(cls, tokenizer_dir: str | os.PathLike) -> Tokenizer:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
        meta_path, ranks_path = tokenizer_dir / META_FILE, tokenizer_dir / RANKS_FILE
        meta = read_meta(tokenizer_dir)
        ranks_blob = ranks_path.read_bytes()
        if hashlib.sha256(ranks_blob).hexdigest() != meta["ranks_sha256"]:
            raise TokenizerNotFoundError(f"{ranks_path} does not match the checksum in {meta_path}: the tokenizer "
                                         f"directory is corrupt; {_how_to_train(tokenizer_dir)}")
        ranks = parse_ranks(ranks_blob, ranks_path)
        n = len(ranks)
        specials = sorted(meta["special_tokens"], key=meta["special_tokens"].get)

        def corrupt(what: str) -> TokenizerNotFoundError:
            return TokenizerNotFoundError(f"{meta_path} does not match {ranks_path}: {what}; the tokenizer directory "
                                          f"is corrupt or mixed from two tokenizers; {_how_to_train(tokenizer_dir)}")
        if sorted(ranks.values()) != list(range(n)):
            raise TokenizerNotFoundError(f"{ranks_path}: ranks are not exactly 0..{n - 1}; "
                                         f"{_how_to_train(tokenizer_dir)}")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise TokenizerNotFoundError(f"{ranks_path}: not all 256 single bytes are tokens (byte fallback); "
                                         f"{_how_to_train(tokenizer_dir)}")
        if meta["num_mergeable"] != n:
            raise corrupt(f"num_mergeable={meta['num_mergeable']} but the ranks file holds {n} tokens")
        if [meta["special_tokens"][name] for name in specials] != list(range(n, n + len(specials))):
            raise corrupt(f"special token ids {meta['special_tokens']} do not follow the {n} ranks")
        if meta["bos_token"] not in specials:
            raise corrupt(f"bos_token {meta['bos_token']!r} is not among the special tokens {specials}")
        if meta["vocab_size"] != n + len(specials):
            raise corrupt(f"vocab_size={meta['vocab_size']} but ranks + special tokens make {n + len(specials)}")
        try:
            return cls(ranks, meta["pattern"], specials, meta["bos_token"])
        except ValueError as err:  # tiktoken rejects the split pattern
            raise corrupt(f"its split pattern does not compile ({err})") from None

    # --- encoding ---------------------------------------------------------

    def _special_id(self, token: str | int) -> int:
        if isinstance(token, int):
            if not 0 <= token < self.get_vocab_size():
                raise ValueError(f"token id {token} is outside the vocabulary [0, {self.get_vocab_size()})")
            return token
        return self.encode_special(token)

    def encode(self, text: str | list[str], prepend: str | int | None = None, append: str | int | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode a string (-> list of ids) or a list of strings (-> list of lists, in parallel threads).

        prepend/append: a special token name (e.g. "<|bos|>") or a token id, added around every text.
        Special-token text inside `text` is encoded as ordinary bytes, never as the special token.
        """
        head = [self._special_id(prepend)] if prepend is not None else []
        tail = [self._special_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if head or tail:
                rows = [head + row + tail for row in rows]
            return rows
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode arbitrary bytes, valid UTF-8 or not: invalid bytes become their single-byte tokens."""
        # surrogateescape maps each byte that is not valid UTF-8 to one lone surrogate U+DC80..U+DCFF;
        # valid UTF-8 never decodes to a lone surrogate, so the two kinds of run separate cleanly.
        ids: list[int] = []
        for run in re.split(r"([\udc80-\udcff]+)", data.decode("utf-8", errors="surrogateescape")):
            if run and "\udc80" <= run[0] <= "\udcff":
                ids.extend(self.byte_ids[ord(c) - 0xDC00] for c in run)
            elif run:
                ids.extend(self.enc.encode_ordinary(run))
        return ids

    def encode_special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a special token; the special tokens are {self.special_tokens}") from None

    # --- decoding ---------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. A slice that cuts a multi-byte character shows U+FFFD for the broken part."""
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    # --- facts ------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    def token_byte_lengths(self) -> torch.Tensor:
        """int32 [vocab]: bytes each token stands for, 0 for specials (they are not text)."""
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.get_vocab_size()}, specials={len(self.special_tokens)})"


# -----------------------------------------------------------------------------
# Convenience for the stages

def default_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def check_tokenizer_dir(tokenizer_dir: str | os.PathLike) -> Path:
    """Raise TokenizerNotFoundError, naming the directory and what is missing, unless it is complete."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise TokenizerNotFoundError(f"no tokenizer directory at {tokenizer_dir}; {_how_to_train(tokenizer_dir)}")
    missing = [name for name in (RANKS_FILE, META_FILE, TOKEN_BYTES_FILE) if not (tokenizer_dir / name).is_file()]
    if missing:
        raise TokenizerNotFoundError(f"tokenizer directory {tokenizer_dir} is incomplete (missing "
                                     f"{', '.join(missing)}); {_how_to_train(tokenizer_dir)}")
    return tokenizer_dir


def get_tokenizer(tokenizer_dir: str | os.PathLike | None = None) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir if tokenizer_dir is not None else default_tokenizer_dir())


def read_meta(tokenizer_dir: str | os.PathLike) -> dict:
    """tokenizer.json of a directory, checked to be this format with every field of the right type."""
    tokenizer_dir = Path(tokenizer_dir)
    meta_path = tokenizer_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerNotFoundError(f"{meta_path} is not valid JSON ({err}); {_how_to_train(tokenizer_dir)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
        raise TokenizerNotFoundError(f"{meta_path}: unknown tokenizer format {found!r} (expected {FORMAT_NAME} "
                                     f"v{FORMAT_VERSION}); {_how_to_train(tokenizer_dir)}")
    fields = {"pattern": str, "special_tokens": dict, "bos_token": str, "num_mergeable": int, "vocab_size": int,
              "ranks_sha256": str}
    bad = [f"{name} ({type(meta.get(name)).__name__}, expected {kind.__name__})" for name, kind in fields.items()
           if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool)]
    if not bad and not all(isinstance(k, str) and isinstance(v, int) for k, v in meta["special_tokens"].items()):
        bad = ["special_tokens (expected {name: id})"]
    if bad:
        raise TokenizerNotFoundError(f"{meta_path}: missing or malformed field(s) {', '.join(bad)}; the tokenizer "
                                     f"directory is corrupt; {_how_to_train(tokenizer_dir)}")
    return meta


def get_token_bytes(tokenizer_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 [vocab] UTF-8 byte length per token id (0 for specials), for bits-per-byte."""
    tokenizer_dir = check_tokenizer_dir(tokenizer_dir if tokenizer_dir is not None else default_tokenizer_dir())
    path = tokenizer_dir / TOKEN_BYTES_FILE
    vocab_size = read_meta(tokenizer_dir)["vocab_size"]
    try:
        token_bytes = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as err:
        raise TokenizerNotFoundError(f"{path} is not a saved tensor ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:120] if str(err) else ''}); "
                                     f"{_how_to_train(tokenizer_dir)}") from None
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.dim() == 1 and len(token_bytes) == vocab_size
            and not token_bytes.is_floating_point() and token_bytes.dtype != torch.bool):
        found = (f"{token_bytes.dtype} tensor of shape {list(token_bytes.shape)}" if isinstance(token_bytes, torch.Tensor)
                 else type(token_bytes).__name__)
        raise TokenizerNotFoundError(f"{path} holds a {found}, expected an integer tensor of {vocab_size} byte "
                                     f"lengths (vocab_size in {META_FILE}); {_how_to_train(tokenizer_dir)}")
    return token_bytes.to(device)
