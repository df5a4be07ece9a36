"""
Tokenizer throughput: BPE training speed (chars/s) and encode speed (tokens/s), single and batched.

    python bench/bench_tokenizer.py                    # tinyshakespeare from ../shared if present
    python bench/bench_tokenizer.py --vocab_size=8192 --repeats=5

The corpus is fixed: ../shared/data/tinyshakespeare.txt (cut into documents of tok_train's --doc_cap
characters) when that folder exists, else the built-in offline corpus of
nanopipe.data. Figures only: nothing here asserts a speed. Take the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.tokenizer import Tokenizer  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
# tok_train's own flags, at the bench's scale
STAGE_FLAGS = [(TokTrainConfig, ("vocab_size", "max_chars", "doc_cap"))]
BENCH_SCALE = dict(vocab_size=4096, max_chars=2_000_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and tok_train's flags, in one namespace."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    args, stage = parse_bench_flags(parser, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    return argparse.Namespace(**vars(args), **stage.model_dump())


def load_corpus(max_chars: int, doc_chars: int | None) -> tuple[str, list[str]]:
    """(name, documents of at most doc_chars, None: uncut) of the fixed benchmark corpus, at most max_chars
    characters in all."""
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:max_chars]
        step = doc_chars or max(1, len(text))
        return "tinyshakespeare", [text[i:i + step] for i in range(0, len(text), step)]
    from nanopipe.data import DataFlags, ensure_shards, iter_documents
    with tempfile.TemporaryDirectory() as tmp:
        shards = ensure_shards(DataFlags(data_source="builtin", data_dir=os.path.join(tmp, "builtin")))
        docs = list(iter_documents(shards.train, max_chars=max_chars, doc_cap=doc_chars))
    return "builtin corpus", docs


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    args = parse_args()
    name, docs = load_corpus(args.max_chars, args.doc_cap)
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
