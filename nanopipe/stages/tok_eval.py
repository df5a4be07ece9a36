"""
Measure how well the trained tokenizer compresses held-out text (UTF-8 bytes per token; higher is better),
on the validation shard and a few fixed kinds of text, beside GPT-2 / GPT-4 where tiktoken has them offline.

Run alone (defaults: tokenizer NANOPIPE_HOME/tokenizer, output NANOPIPE_HOME/tok_eval):
    python -m nanopipe.stages.tok_eval
    python -m nanopipe.stages.tok_eval --data_source=builtin --references=gpt2,cl100k_base --allow_download=true
Under torchrun (single-process work: rank 0 measures, the other ranks exit at once with status 0):
    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.tok_eval

The reference encodings come from tiktoken's cache (TIKTOKEN_CACHE_DIR, default <tmp>/data-gym-cache).
Nothing is downloaded unless --allow_download=true; a reference that is not there is skipped with a note.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path

import tiktoken
import tiktoken.load

from nanopipe.common import get_base_dir, get_dist_info, print0, report_progress, write_metrics
from nanopipe.configs.flags import stage_main
from nanopipe.configs.tok_eval import TokEvalConfig
from nanopipe.data import ensure_shards, iter_documents
from nanopipe.tokenizer import default_tokenizer_dir, get_tokenizer

PROG = "python -m nanopipe.stages.tok_eval"

# Fixed texts of different kinds, written for this project, so runs stay comparable over time.
SAMPLE_TEXTS = {
    "english": (
        "The harbour committee met on Tuesday to weigh three proposals for the old ferry terminal. One would "
        "turn it into a covered market, another into a small museum of river trade, and the third would pull "
        "it down to widen the promenade. After two hours of debate, members agreed to ask residents first: "
        "a survey will run until the end of March, and the results will be published before any money is spent."),
    "code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        "    \"\"\"Average of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total, out = 0.0, []\n"
        "    for i, value in enumerate(values):\n"
        "        total += value\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        if i >= window - 1:\n"
        "            out.append(total / window)\n"
        "    return out\n"),
    "math": (
        "For a geometric series with ratio $|r| < 1$ we have\n"
        "\\[ \\sum_{k=0}^{\\infty} a r^{k} = \\frac{a}{1 - r}, \\]\n"
        "and differentiating term by term gives $\\sum_{k \\ge 1} k r^{k-1} = (1 - r)^{-2}$. "
        "Hence the expected number of trials until the first success, with probability $p$, is "
        "$\\mathbb{E}[N] = \\sum_{k \\ge 1} k\\, p (1-p)^{k-1} = 1/p$.\n"),
    "numbers": (
        "date,station,temp_c,rain_mm,wind_kmh\n"
        "2024-01-03,north,4.7,12.5,31\n2024-01-04,north,2.1,0.0,18\n2024-01-05,south,7.9,3.25,42\n"
        "2024-01-06,south,8.4,0.75,27\n2024-01-07,east,-1.3,21.0,55\nTotal rainfall: 37.5 mm over 5 days.\n"),
    "multilingual": (
        "Der Zug nach München fährt heute ausnahmsweise von Gleis sieben ab. "
        "Le musée ouvrira ses portes à dix heures, après les travaux de rénovation. "
        "Сегодня вечером ожидается сильный ветер и дождь. "
        "今天下午图书馆会提前关门。 "
        "내일 아침 회의는 열 시에 시작합니다. "
        "Η βιβλιοθήκη κλείνει νωρίτερα σήμερα."),
}
REFERENCE_LABELS = {"gpt2": "GPT-2", "r50k_base": "GPT-3", "cl100k_base": "GPT-4", "o200k_base": "GPT-4o"}


# -----------------------------------------------------------------------------
# Reference encodings, offline unless allowed otherwise

def tiktoken_cache_dir() -> str:
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")


@contextlib.contextmanager
def cache_only():
    """Make tiktoken fail, instead of downloading, on any file missing from its cache."""
    original = tiktoken.load.read_file  # read_file_cached falls back to this module-level function to download

    def refuse_remote(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise FileNotFoundError(f"{blobpath} is not in the tiktoken cache ({tiktoken_cache_dir()})")
        return original(blobpath)

    tiktoken.load.read_file = refuse_remote
    try:
        yield
    finally:
        tiktoken.load.read_file = original


def load_reference(name: str, allow_download: bool, timeout_s: float) -> tuple[tiktoken.Encoding | None, str]:
    """(encoding, "") when available, else (None, the reason)."""
    if not allow_download:
        try:
            with cache_only():
                return tiktoken.get_encoding(name), ""
        except FileNotFoundError as err:
            return None, f"not available offline: {err}; rerun with --allow_download=true to fetch it"
    result: dict = {}

    def fetch() -> None:
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as err:  # noqa: BLE001 - any download failure means "unavailable", reported below
            result["error"] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=fetch, daemon=True)  # daemon: a hung download cannot block exit
    worker.start()
    worker.join(timeout_s)
    if "enc" in result:
        return result["enc"], ""
    return None, result.get("error", f"download did not finish within {timeout_s:g} s")


# -----------------------------------------------------------------------------

def measure(encode, texts: list[str]) -> dict:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(row) for row in encode(texts))
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}


def print_table(results: dict, names: list[str]) -> None:
    header = f"{'text':<14}{'bytes':>10}" + "".join(f"{REFERENCE_LABELS.get(n, n) + ' B/tok':>16}" for n in names)
    print0(header)
    print0("-" * len(header))
    for kind, row in results.items():
        cells = "".join(f"{row[n]['bytes_per_token']:>16.3f}" if n in row else f"{'-':>16}" for n in names)
        print0(f"{kind:<14}{row['ours']['bytes']:>10,}" + cells)


def run(cfg: TokEvalConfig) -> dict:
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return {}
    tokenizer_dir = Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else default_tokenizer_dir()
    out_dir = Path(cfg.out_dir) if cfg.out_dir else get_base_dir() / "tok_eval"
    tok = get_tokenizer(tokenizer_dir)
    shards = ensure_shards(cfg)
    texts = {"val": list(iter_documents([shards.val], max_chars=cfg.val_chars))}
    texts.update({kind: [text] for kind, text in SAMPLE_TEXTS.items()})
    print0(f"tok_eval: {tok} from {tokenizer_dir}; val text: {sum(len(t) for t in texts['val']):,} chars of "
           f"{shards.val}")

    encoders = {"ours": lambda batch: tok.encode(batch)}
    notes = {}
    for name in cfg.references:
        enc, why = load_reference(name, cfg.allow_download, cfg.download_timeout_s)
        if enc is None:
            notes[name] = why
            print0(f"note: skipping the {REFERENCE_LABELS.get(name, name)} comparison ({name}): {why}")
        else:
            encoders[name] = lambda batch, enc=enc: enc.encode_ordinary_batch(batch)

    results = {}
    for i, (kind, batch) in enumerate(texts.items()):
        results[kind] = {name: measure(encode, batch) for name, encode in encoders.items()}
        report_progress(step=i + 1, total=len(texts), phase="measure")
    print_table(results, list(encoders))

    metrics = {
        "tokenizer_dir": str(tokenizer_dir),
        "vocab_size": tok.get_vocab_size(),
        "val_shard": shards.val.name,
        "val_bytes_per_token": results["val"]["ours"]["bytes_per_token"],
        "compression": results,
        "references_compared": [n for n in encoders if n != "ours"],
        "references_skipped": notes,
    }
    write_metrics(out_dir, metrics)
    print0(f"wrote {out_dir / 'metrics.json'}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return stage_main(TokEvalConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main(sys.argv[1:])
