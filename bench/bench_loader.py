"""
Benchmark the pretraining data loader alone (nanopipe.dataloader.BestFitLoader): tokens per second of
(inputs, targets) batches produced, read, tokenised and best-fit packed from parquet shards, with nothing
training. Printed next to what training consumes: the d4 model of bench_base_train.py on this CPU (measured
here, a few eager steps) and about 130K tokens/s per GPU (nanochat's d20 on an H100).

    python bench/bench_loader.py                                  # tinyshakespeare (else builtin) corpus
    python bench/bench_loader.py --corpus=builtin --batches=50 --tokenizer_threads=4

Shapes: the bench's (8 rows x 128 tokens) and a d20-like one (32 rows x 2048 tokens). The loader runs in a
background thread; the consumer here only takes batches, so the figure is the producer's rate. The first
batch (thread start-up, the first documents) is timed apart. The corpora are small, so the loader goes
round them many times: each pass re-reads and re-tokenises, as a longer run over more data would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from bench_base_train import CORPORA, SHAKESPEARE, prepare_inputs  # noqa: E402
from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.data import select_shards  # noqa: E402
from nanopipe.dataloader import BestFitLoader  # noqa: E402

GPU_D20_TOKENS_PER_SEC = 130_000  # nanochat's d20 speedrun on one H100 (8 GPUs: about 1.05M tokens/s)
SHAPES = {"bench (d4)": (8, 128),  # base_train's defaults are nanochat's d20 rows x context
          "d20-like": (BaseTrainConfig.model_fields["device_batch_size"].default,
                       BaseTrainConfig.model_fields["max_seq_len"].default)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and tok_train's --vocab_size, in one namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training text (default: tinyshakespeare where ../shared has it, else builtin)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per shape (after the first)")
    p.add_argument("--tokenizer_threads", type=int, default=4, help="the loader's tokenizer threads")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model measurement")
    p.add_argument("--workdir", type=str, default=None, help="kept afterwards if given (default: a temp dir)")
    args, stage = parse_bench_flags(p, [(TokTrainConfig, ("vocab_size",))], scale={"vocab_size": 2048}, argv=argv)
    if args.corpus is None:
        args.corpus = "tinyshakespeare" if SHAKESPEARE.is_file() else "builtin"
    return argparse.Namespace(**vars(args), **stage.model_dump())


def loader_rate(tok, files, batch_size: int, seq_len: int, batches: int, tokenizer_threads: int) -> dict:
    """Tokens per second (wall and per CPU-second of the process) of `batches` batches after the first."""
    t0 = time.perf_counter()
    with BestFitLoader(tok, files, batch_size, seq_len, tokenizer_threads=tokenizer_threads) as loader:
        next(loader)
        first_s = time.perf_counter() - t0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(loader)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        epoch = loader.epoch
    tokens = batches * batch_size * seq_len
    return {"tok_per_sec": tokens / wall, "tok_per_cpu_sec": tokens / cpu if cpu > 0 else float("nan"),
            "first_batch_s": first_s, "epoch": epoch}


def model_rate(vocab_size: int, steps: int = 5) -> float:
    """Training tokens/s of the bench's d4 model (8 x 128, two micro-steps, Muon + AdamW) on CPU, eager."""
    from nanopipe.gpt import GPT, build_model_config
    from nanopipe.training import cpu_matmul_precision
    with cpu_matmul_precision("auto"):
        model = GPT.create(build_model_config(4, 64, 64, 128, vocab_size), "cpu")
        optimizers = model.setup_optimizers(unembedding_lr=0.004 / 16, embedding_lr=0.3 / 16, matrix_lr=0.02 / 16)
        idx = torch.randint(0, vocab_size, (8, 128))
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            for _ in range(2):
                model(idx, idx).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return 2 * 8 * 128 / statistics.median(times[1:])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir, _, tok = prepare_inputs(work, args.vocab_size, args.corpus)
    files = select_shards(data_dir).train
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}; corpus "
          f"{args.corpus} ({len(files)} train shard(s)), vocab {tok.get_vocab_size()}, "
          f"{args.tokenizer_threads} tokenizer thread(s), {args.batches} timed batches per shape")
    model_tok_s = model_rate(tok.get_vocab_size())
    print(f"\n{'shape':<22}{'loader tok/s':>14}{'tok/CPU-s':>12}{'1st batch s':>13}{'passes':>8}"
          f"{'x d4 on CPU':>13}{'x GPU d20':>11}")
    for name, (batch_size, seq_len) in SHAPES.items():
        r = loader_rate(tok, files, batch_size, seq_len, args.batches, args.tokenizer_threads)
        print(f"{name + f' {batch_size}x{seq_len}':<22}{r['tok_per_sec']:>14,.0f}{r['tok_per_cpu_sec']:>12,.0f}"
              f"{r['first_batch_s']:>13.2f}{r['epoch']:>8}{r['tok_per_sec'] / model_tok_s:>13.1f}"
              f"{r['tok_per_sec'] / GPU_D20_TOKENS_PER_SEC:>11.2f}")
    print(f"\nconsumers: the d4 model trains {model_tok_s:,.0f} tok/s on this CPU ({args.threads} thread(s)); "
          f"nanochat's d20 about {GPU_D20_TOKENS_PER_SEC:,} tok/s per H100. 'x ...' is loader rate / consumer rate: "
          f"above 1 the loader keeps up (it runs in a thread beside the training, sharing the CPU with it here).")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
