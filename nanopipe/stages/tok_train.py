"""
Train the byte-level BPE tokenizer (rustbpe) on the training shards; write the tokenizer directory.

Run alone (text from --data_source, default the builtin offline corpus; output NANOPIPE_HOME/tokenizer):
    python -m nanopipe.stages.tok_train --vocab_size=4096
    python -m nanopipe.stages.tok_train --data_source=local --data_dir=DIR --max_chars=2_000_000_000 --vocab_size=32768
Under torchrun (training is single-process: rank 0 trains, the other ranks exit at once with status 0):
    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.tok_train --vocab_size=32768

Reads the train shards only (the validation shard stays held out and measures compression). Output:
<out_dir>/tokenizer.tiktoken, tokenizer.json, token_bytes.pt and metrics.json, all written in one atomic step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from nanopipe.common import get_dist_info, print0, report_progress
from nanopipe.configs.flags import stage_main
from nanopipe.configs.tok_train import TokTrainConfig
from nanopipe.data import DataError, ensure_shards, iter_documents
from nanopipe.tokenizer import Tokenizer, default_tokenizer_dir

PROG = "python -m nanopipe.stages.tok_train"

# A fixed mixed-script text: the trained tokenizer must give it back unchanged.
ROUND_TRIP_PROBE = ("Tokenizers, tested: 'don't', 3.14159, 1,000,000; tabs\tand\nnewlines.\n"
                    "Ünïcödé, 日本語, Русский, العربية, 한국어, emoji 🚀 and <|bos|> as plain text.")


def tokenizer_out_dir(cfg: TokTrainConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else default_tokenizer_dir()


class ProgressCounter:
    """Passes documents through, counting characters, printing a progress line every `every` characters."""

    def __init__(self, docs: Iterable[str], every: int, total: int):
        self.docs, self.every, self.total = docs, every, total
        self.chars = self.count = self.reported_chars = 0
        self.t0 = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        next_report = self.every
        for doc in self.docs:
            self.chars += len(doc)
            self.count += 1
            if self.chars >= next_report:
                self.report()
                next_report = (self.chars // self.every + 1) * self.every
            yield doc

    def report(self) -> None:
        if self.reported_chars == self.chars and self.count:
            return
        self.reported_chars = self.chars
        seconds = time.perf_counter() - self.t0
        print0(f"read {self.chars:,} chars in {self.count:,} docs ({seconds:.1f} s, "
               f"{self.chars / max(seconds, 1e-9):,.0f} chars/s)")
        report_progress(step=self.chars, total=self.total, docs=self.count, phase="read")


def compression(tok: Tokenizer, texts: list[str]) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the texts."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(row) for row in tok.encode(texts))
    return n_bytes, n_tokens


# -----------------------------------------------------------------------------

def run(cfg: TokTrainConfig) -> dict:
    _, rank, _, world_size = get_dist_info()
    if rank != 0:
        return {}  # one process trains; torchrun counts a clean exit of the others as success
    out_dir = tokenizer_out_dir(cfg)
    shards = ensure_shards(cfg)
    print0(f"tok_train: {len(shards.train)} train shard(s) in {shards.data_dir}, max_chars={cfg.max_chars:,}, "
           f"doc_cap={cfg.doc_cap}, vocab_size={cfg.vocab_size:,}" + (f" (rank 0 of {world_size})" if world_size > 1 else ""))
    # ensure_shards refused shards without a non-empty document; say what there is before reading it
    print0(f"train shards hold {shards.train_stats.describe()}")

    # --- train
    reader = ProgressCounter(iter_documents(shards.train, max_chars=cfg.max_chars, doc_cap=cfg.doc_cap),
                             every=cfg.log_every_chars, total=cfg.max_chars)
    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(reader, cfg.vocab_size)
    train_time_s = time.perf_counter() - t0
    reader.report()
    print0(f"trained vocab {tok.get_vocab_size():,} on {reader.chars:,} chars in {train_time_s:.2f} s")
    if reader.chars == 0:  # ensure_shards checks this up front; a shard that changed since is still named
        raise DataError(f"no text read from the train shards in {shards.data_dir}: nothing to train on")
    if tok.get_vocab_size() < cfg.vocab_size:
        print0(f"warning: the corpus only supports {tok.get_vocab_size():,} tokens, fewer than --vocab_size="
               f"{cfg.vocab_size:,} (raise --max_chars or use more data for the full vocabulary)")
    assert tok.decode(tok.encode(ROUND_TRIP_PROBE)) == ROUND_TRIP_PROBE, "trained tokenizer fails to round-trip"

    # --- compression on held-out text, then write everything in one atomic step
    val_texts = list(iter_documents([shards.val], max_chars=cfg.val_chars))
    val_bytes, val_tokens = compression(tok, val_texts)
    metrics = {
        "vocab_size": tok.get_vocab_size(),
        "vocab_size_requested": cfg.vocab_size,
        "train_chars": reader.chars,
        "train_docs": reader.count,
        "train_time_s": round(train_time_s, 3),
        "train_chars_per_s": round(reader.chars / max(train_time_s, 1e-9)),
        "val_shard": shards.val.name,
        "val_bytes": val_bytes,
        "val_tokens": val_tokens,
        "val_bytes_per_token": round(val_bytes / max(val_tokens, 1), 4),
        "tokenizer_dir": str(out_dir),
    }
    tok.save(out_dir, overwrite=True, extra_json={"metrics.json": metrics})
    print0(f"val compression: {metrics['val_bytes_per_token']:.3f} bytes/token on {val_bytes:,} bytes of "
           f"{shards.val.name}")
    print0(f"saved tokenizer to {out_dir}")
    report_progress(step=reader.chars, total=reader.chars, phase="done",
                    vocab_size=metrics["vocab_size"], val_bytes_per_token=metrics["val_bytes_per_token"])
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return stage_main(TokTrainConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main(sys.argv[1:])
