"""
Tokenizer throughput: BPE training speed (chars/s) and encode speed (tokens/s), single and batched.

    python bench/bench_tokenizer.py                    # tinyshakespeare from ../shared if present
    python bench/bench_tokenizer.py --vocab_size=8192 --repeats=5

The corpus is fixed: ../shared/data/tinyshakespeare.txt (cut into 10,000-character documents, the
tokenizer stage's default --doc_cap) when that folder exists, else the built-in offline corpus of
nanopipe.data. Figures only: nothing here asserts a speed. Take the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from nanopipe.tokenizer import Tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
DOC_CHARS = 10_000


def load_corpus(max_chars: int) -> tuple[str, list[str]]:
    """(name, documents) of the fixed benchmark corpus, at most max_chars characters in all."""
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:max_chars]
        return "tinyshakespeare", [text[i:i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS)]
    from nanopipe.data import DataFlags, ensure_shards, iter_documents
    with tempfile.TemporaryDirectory() as tmp:
        shards = ensure_shards(DataFlags(data_source="builtin", data_dir=os.path.join(tmp, "builtin")))
        docs = list(iter_documents(shards.train, max_chars=max_chars, doc_cap=DOC_CHARS))
    return "builtin corpus", docs


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size to train (default 4096)")
    parser.add_argument("--max_chars", type=int, default=2_000_000, help="corpus size cap in characters")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    args = parser.parse_args()

    name, docs = load_corpus(args.max_chars)
    chars = sum(len(d) for d in docs)
    utf8_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"corpus: {name}, {len(docs):,} documents, {chars:,} characters, {utf8_bytes:,} bytes; "
          f"{os.cpu_count()} CPUs")

    seconds, tok = best_of(args.repeats, lambda: Tokenizer.train_from_iterator(docs, args.vocab_size))
    print(f"train    vocab {tok.get_vocab_size():>6,}: {seconds:8.3f} s  {chars / seconds:14,.0f} chars/s")

    whole = "".join(docs)
    seconds, ids = best_of(args.repeats, lambda: tok.encode(whole))
    n_tokens = len(ids)
    print(f"encode   one string      : {seconds:8.3f} s  {n_tokens / seconds:14,.0f} tokens/s "
          f"({utf8_bytes / n_tokens:.2f} bytes/token)")
    seconds, _ = best_of(args.repeats, lambda: [tok.encode(d) for d in docs])
    print(f"encode   doc by doc      : {seconds:8.3f} s  {n_tokens / seconds:14,.0f} tokens/s")
    for threads in (1, 2, 4, 8):
        seconds, rows = best_of(args.repeats, lambda: tok.encode(docs, prepend="<|bos|>", num_threads=threads))
        batched_tokens = sum(len(r) for r in rows)
        print(f"encode   batch, {threads} thread{'s' if threads > 1 else ' '}: {seconds:8.3f} s  "
              f"{batched_tokens / seconds:14,.0f} tokens/s")
    seconds, text = best_of(args.repeats, lambda: tok.decode(ids))
    assert text == whole, "decode(encode(corpus)) differs from the corpus"
    print(f"decode   one string      : {seconds:8.3f} s  {n_tokens / seconds:14,.0f} tokens/s")


if __name__ == "__main__":
    main()
