"""
Benchmark base pretraining: our base_train against nanochat's, at one tiny CPU config, same data, same tokenizer.

    python bench/bench_base_train.py                                   # our side alone
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_base_train.py    # side by side
    python bench/bench_base_train.py --steps=60 --depth=4 --threads=2 --workdir=/tmp/bench

The corpus is tinyshakespeare from the `../shared` folder beside the repo when present, else the builtin
corpus; it is prepared into parquet shards and a BPE tokenizer is trained on it. nanochat gets the very
same shards (its last shard is its validation split, so ours is copied there last) and the same tokenizer
(a pickled tiktoken encoding, nanochat's format), so both loaders pack identical batches.

Printed figures: tokens/s (median over the steps after --warmup_steps), validation bits per byte at every
evaluated step (same steps = same tokens), wall time, and the ratios. Nothing is asserted about speed.
nanochat's base_train imports wandb at the top even with --run=dummy; if wandb is not installed a module
that refuses to be used is put on nanochat's path for the run (and the output says so).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
sys.path.insert(0, str(REPO))

from nanopipe.dataset import ensure_builtin, iter_documents, prepare_shards, select_shards  # noqa: E402
from nanopipe.tokenizer import Tokenizer  # noqa: E402

OUR_STEP = re.compile(r"^step (\d+)/\d+ .*?\| tok/sec: ([\d,]+)", re.M)
OUR_VAL = re.compile(r"^Step (\d+) \| val bpb: ([\d.]+)", re.M)
NANOCHAT_STEP = re.compile(r"^step (\d+)/\d+ .*?\| tok/sec: ([\d,]+)", re.M)
NANOCHAT_VAL = re.compile(r"^Step (\d+) \| Validation bpb: ([\d.]+)", re.M)
WANDB_REFUSAL = '''"""Put here by nanopipe's benchmark: nanochat imports wandb even when it does not log (--run=dummy)."""
def init(*args, **kwargs):
    raise RuntimeError("wandb is not installed; the benchmark runs nanochat with --run=dummy")
'''


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect_ratio", type=int, default=64)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--device_batch_size", type=int, default=8)
    p.add_argument("--total_batch_size", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--warmup_steps", type=int, default=5, help="steps left out of the tokens/s median")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both runs")
    p.add_argument("--also_compiled", action="store_true",
                   help="also run ours with --compile=true (nanochat compiles on CPU too; ours does not by default)")
    p.add_argument("--workdir", type=str, default=None, help="kept afterwards if given (default: a temp dir)")
    return p.parse_args()


# -----------------------------------------------------------------------------
# Shared inputs

def prepare_inputs(work: Path, vocab_size: int) -> tuple[Path, Path, Tokenizer]:
    """(data_dir, tokenizer_dir, tokenizer) under work/nanopipe_home."""
    home = work / "nanopipe_home"
    data_dir, tok_dir = home / "data", home / "tokenizer"
    if not data_dir.is_dir():
        if SHAKESPEARE.is_file():
            prepare_shards([SHAKESPEARE], data_dir, val_fraction=0.1, doc_chars=2000, row_group_docs=64)
        else:
            print(f"(no {SHAKESPEARE}: using the builtin corpus)")
            shutil.copytree(ensure_builtin(home / "builtin"), data_dir)
    shards = select_shards(data_dir)
    if not tok_dir.is_dir():
        Tokenizer.train_from_iterator(iter_documents(shards.train), vocab_size).save(tok_dir)
    return data_dir, tok_dir, Tokenizer.load(tok_dir)


def shared_flags(args) -> dict:
    return dict(depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                num_iterations=args.steps, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0, warmdown_ratio=0.4,
                final_lr_frac=0.0, core_metric_every=-1, sample_every=-1, device_type="cpu")


def run_logged(cmd: list[str], env: dict, cwd: Path, log: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {result.returncode}; log: {log}\n"
                         f"{result.stderr[-2000:]}")
    return result.stdout, seconds


def summarise(name: str, stdout: str, step_re: re.Pattern, val_re: re.Pattern, seconds: float, warmup: int,
              args) -> dict:
    tok_s = [float(t.replace(",", "")) for s, t in step_re.findall(stdout) if int(s) >= warmup]
    return {"name": name, "tok_per_sec": statistics.median(tok_s) if tok_s else float("nan"),
            "val_bpb": {int(s): float(v) for s, v in val_re.findall(stdout)}, "wall_s": seconds,
            # everything included: start-up, compilation, evaluations
            "end_to_end_tok_per_sec": args.steps * args.total_batch_size / seconds}


# -----------------------------------------------------------------------------
# The two sides

def run_ours(args, work: Path, data_dir: Path, tok_dir: Path, compiled: bool = False) -> dict:
    name = "nanopipe+compile" if compiled else "nanopipe"
    flags = shared_flags(args) | dict(data_source="local", data_dir=data_dir, tokenizer_dir=tok_dir,
                                      out_dir=work / f"{name}_out", compile=str(compiled).lower())
    env = dict(os.environ, NANOPIPE_HOME=str(work / "nanopipe_home"), OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "nanopipe.stages.base_train", *[f"--{k}={v}" for k, v in flags.items()]]
    stdout, seconds = run_logged(cmd, env, REPO, work / f"{name}.log")
    return summarise(name, stdout, OUR_STEP, OUR_VAL, seconds, args.warmup_steps, args)


def nanochat_home(work: Path, data_dir: Path, tok_dir: Path, tok: Tokenizer) -> Path:
    """nanochat's base dir: the same shards (validation last) and the same tokenizer in its format."""
    home = work / "nanochat_home"
    shards = select_shards(data_dir)
    target = home / "base_data_climbmix"
    target.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate([*shards.train, shards.val]):
        shutil.copy(path, target / f"shard_{i:05d}.parquet")
    (home / "tokenizer").mkdir(exist_ok=True)
    (home / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
    shutil.copy(tok_dir / "token_bytes.pt", home / "tokenizer" / "token_bytes.pt")
    return home


def nanochat_flags(nanochat_dir: Path, env: dict, wanted: dict) -> list[str]:
    """Spell our flags the way this nanochat checkout's argparse does (dashes or underscores), skipping
    what it lacks, plus the settings that make its run comparable (full attention, no warm-up steps)."""
    help_text = subprocess.run([sys.executable, "-m", "scripts.base_train", "--help"], cwd=nanochat_dir, env=env,
                               capture_output=True, text=True).stdout
    known = set(re.findall(r"--([\w-]+)", help_text))
    if not known:
        raise SystemExit(f"could not read the flags of {nanochat_dir}/scripts/base_train.py (is NANOCHAT_DIR a "
                         f"nanochat checkout, with its dependencies importable?)")
    extras = {"window_pattern": "L", "warmup_steps": 0, "warmup_ratio": 0.0, "run": "dummy", "save_every": -1}
    out = []
    for name, value in (wanted | extras).items():
        for spelling in (name.replace("_", "-"), name):
            if spelling in known:
                out.append(f"--{spelling}={value}")
                break
        else:
            if name in wanted and name not in ("core_metric_every", "sample_every"):
                print(f"  (nanochat has no --{name}; left at its default)")
    return out


def run_nanochat(args, work: Path, nanochat_dir: Path, data_dir: Path, tok_dir: Path, tok: Tokenizer) -> dict:
    home = nanochat_home(work, data_dir, tok_dir, tok)
    path = [str(nanochat_dir)]
    try:
        import wandb  # noqa: F401
    except ImportError:
        shim = work / "wandb_shim"
        shim.mkdir(exist_ok=True)
        (shim / "wandb.py").write_text(WANDB_REFUSAL)
        path.append(str(shim))
        print("  (wandb is not installed: nanochat gets a wandb module that refuses to be used; it runs "
              "with --run=dummy)")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(home), OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(path))
    flags = nanochat_flags(nanochat_dir, env, shared_flags(args))
    stdout, seconds = run_logged([sys.executable, "-m", "scripts.base_train", *flags], env, nanochat_dir,
                                 work / "nanochat.log")
    return summarise("nanochat", stdout, NANOCHAT_STEP, NANOCHAT_VAL, seconds, args.warmup_steps, args)


# -----------------------------------------------------------------------------

def report(results: list[dict]) -> None:
    print()
    print(f"{'':<18}{'tok/s median':>14}{'tok/s e2e':>11}{'wall s':>9}   val bpb by step")
    for r in results:
        bpbs = "  ".join(f"{s}:{v:.4f}" for s, v in sorted(r["val_bpb"].items()))
        print(f"{r['name']:<18}{r['tok_per_sec']:>14,.0f}{r['end_to_end_tok_per_sec']:>11,.0f}{r['wall_s']:>9.1f}   "
              f"{bpbs}")
    ref = next((r for r in results if r["name"] == "nanochat"), None)
    if ref is None:
        return
    print("\n(tok/s median: steps after the warm-up; e2e: all tokens / wall time, start-up and compilation included)")
    for ours in (r for r in results if r is not ref):
        print(f"{ours['name']} / nanochat: tokens/s median {ours['tok_per_sec'] / ref['tok_per_sec']:.3f}, "
              f"end to end {ours['end_to_end_tok_per_sec'] / ref['end_to_end_tok_per_sec']:.3f} (target >= 1.0)")
        for step in sorted(set(ours["val_bpb"]) & set(ref["val_bpb"])):
            a, b = ours["val_bpb"][step], ref["val_bpb"][step]
            print(f"  val bpb at step {step}: {a:.4f} vs {b:.4f} (ratio {a / b:.4f}, target <= 1.0)")


def main() -> None:
    args = parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_base_train_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), workdir {work}")
    print(f"config: depth {args.depth}, aspect {args.aspect_ratio}, head_dim {args.head_dim}, seq {args.max_seq_len}, "
          f"batch {args.device_batch_size} x {args.total_batch_size} tokens, {args.steps} steps, vocab {args.vocab_size}")
    data_dir, tok_dir, tok = prepare_inputs(work, args.vocab_size)
    results = [run_ours(args, work, data_dir, tok_dir)]
    if args.also_compiled:
        results.append(run_ours(args, work, data_dir, tok_dir, compiled=True))
    nanochat_dir = os.environ.get("NANOCHAT_DIR")
    if nanochat_dir:
        results.append(run_nanochat(args, work, Path(nanochat_dir).resolve(), data_dir, tok_dir, tok))
    else:
        print("NANOCHAT_DIR is not set: our side only")
    report(results)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
