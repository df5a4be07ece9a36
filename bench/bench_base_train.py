"""
Benchmark base pretraining: our base_train against nanochat's, at one tiny CPU config, same data, same tokenizer.

    python bench/bench_base_train.py                                   # our side alone
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_base_train.py    # side by side
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_base_train.py --repeats=4 --corpus=builtin
    python bench/bench_base_train.py --num_iterations=100 --depth=2 --threads=1 --workdir=DIR

The corpus (--corpus) is tinyshakespeare from the `../shared` folder beside the repo (the default when present),
or the builtin corpus (Python's documentation, built locally); it is prepared into parquet shards and a BPE tokenizer is trained on it. nanochat gets the very
same shards (its last shard is its validation split, so ours is copied there last) and the same tokenizer
(a pickled tiktoken encoding, nanochat's format), so both loaders pack identical batches.

Printed figures: tokens/s (median over the steps after --warmup_steps), validation bits per byte at every
evaluated step (same steps = same tokens), the first step's time (compilation, where there is any), wall time,
the load average around each run, and the ratios. Nothing is asserted about speed. On a shared machine use
--repeats: the sides run in alternating order (ours, nanochat, nanochat, ours, ...) so that a drift in the
machine's load hits both alike, and the medians over the repeats are compared.
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
CORPORA = ("tinyshakespeare", "builtin")
sys.path.insert(0, str(REPO))

from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.data import ensure_builtin, iter_documents, prepare_shards, select_shards  # noqa: E402
from nanopipe.tokenizer import Tokenizer  # noqa: E402

OUR_STEP = re.compile(r"^step (\d+)/\d+ .*?\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)", re.M)
OUR_VAL = re.compile(r"^Step (\d+) \| val bpb: ([\d.]+)", re.M)
NANOCHAT_STEP = re.compile(r"^step (\d+)/\d+ .*?\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)", re.M)
NANOCHAT_VAL = re.compile(r"^Step (\d+) \| Validation bpb: ([\d.]+)", re.M)
WANDB_REFUSAL = '''"""Put here by nanopipe's benchmark: nanochat imports wandb even when it does not log (--run=dummy)."""
def init(*args, **kwargs):
    raise RuntimeError("wandb is not installed; the benchmark runs nanochat with --run=dummy")
'''


# The stage settings this bench takes, as base_train and tok_train define them, and the bench's scale: the
# README's figures were measured at these (d4, seq 256, 60 steps; --threads=2)
STAGE_FLAGS = [(BaseTrainConfig, ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size",
                                  "total_batch_size", "num_iterations", "eval_every", "eval_tokens", "embedding_lr",
                                  "unembedding_lr", "matrix_lr", "weight_decay", "warmdown_ratio", "final_lr_frac",
                                  "core_metric_every", "sample_every", "device_type")),
               (TokTrainConfig, ("vocab_size",))]
BENCH_SCALE = dict(depth=4, head_dim=64, max_seq_len=256, device_batch_size=8, total_batch_size=2048,
                   num_iterations=60, eval_every=20, eval_tokens=16384, core_metric_every=None, sample_every=None,
                   device_type="cpu", vocab_size=2048)


def parse_args(argv: list[str] | None = None):
    """(the bench's options, the stage settings) from the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup_steps", type=int, default=5, help="steps left out of the tokens/s median")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both runs")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, in alternating order")
    p.add_argument("--also_compiled", action="store_true",
                   help="also run ours with --compile=true (nanochat compiles on CPU too; ours does not by default)")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training text (default: tinyshakespeare where ../shared has it, else builtin)")
    p.add_argument("--workdir", type=str, default=None, help="kept afterwards if given (default: a temp dir)")
    args, stage = parse_bench_flags(p, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    if stage.num_iterations is None:
        p.error("--num_iterations: the bench times a fixed number of steps; give one")
    if args.corpus is None:
        args.corpus = "tinyshakespeare" if SHAKESPEARE.is_file() else "builtin"
    return args, stage


# -----------------------------------------------------------------------------
# Shared inputs

def prepare_inputs(work: Path, vocab_size: int, corpus: str = "tinyshakespeare") -> tuple[Path, Path, Tokenizer]:
    """(data_dir, tokenizer_dir, tokenizer) under work/nanopipe_home/<corpus>."""
    assert corpus in CORPORA, f"corpus must be one of {CORPORA}, got {corpus!r}"
    home = work / "nanopipe_home"
    data_dir, tok_dir = home / corpus / "data", home / corpus / f"tokenizer{vocab_size}"
    if not data_dir.is_dir():
        if corpus == "tinyshakespeare":
            if not SHAKESPEARE.is_file():
                raise SystemExit(f"--corpus=tinyshakespeare needs {SHAKESPEARE}; use --corpus=builtin")
            prepare_shards([SHAKESPEARE], data_dir, val_fraction=0.1, doc_chars=2000, row_group_docs=64)
        else:
            shutil.copytree(ensure_builtin(home / "builtin_corpus"), data_dir)
    shards = select_shards(data_dir)
    if not tok_dir.is_dir():
        Tokenizer.train_from_iterator(iter_documents(shards.train), vocab_size).save(tok_dir)
    return data_dir, tok_dir, Tokenizer.load(tok_dir)


def shared_flags(stage) -> dict:
    """The base_train flags both sides get (off is -1, a spelling both command lines take)."""
    return {name: -1 if value is None else value for name, value in stage.model_dump().items()
            if name != "vocab_size"}


STEP_LINE_START = re.compile(r"^step (\d+)/")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process, all its threads; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) ": state is fields[0], utime fields[11]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_logged(cmd: list[str], env: dict, cwd: Path, log: Path) -> dict:
    """Run a training command, reading its log as it comes: stdout, wall seconds, the 1-minute load average
    before and after, and the CPU seconds the process spent between one step line and the next. Unlike the
    wall time a step logs, its CPU time hardly moves when other work competes for the cores."""
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    lines, cpu_per_step, last_cpu = [], {}, None
    with open(log.with_suffix(".stderr"), "w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                stderr=err, text=True)
        for line in proc.stdout:
            lines.append(line)
            match = STEP_LINE_START.match(line)
            if match:
                cpu = process_cpu_seconds(proc.pid)
                if cpu is not None and last_cpu is not None:
                    cpu_per_step[int(match.group(1))] = cpu - last_cpu
                last_cpu = cpu
        proc.wait()
        err.seek(0)
        stderr = err.read()
    seconds = time.perf_counter() - t0
    stdout = "".join(lines)
    log.write_text(stdout + "\n--- stderr ---\n" + stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}; log: {log}\n"
                         f"{stderr[-2000:]}")
    return {"stdout": stdout, "seconds": seconds, "load": (load_before, os.getloadavg()[0]),
            "cpu_per_step": cpu_per_step}


def summarise(name: str, run: dict, step_re: re.Pattern, val_re: re.Pattern, warmup: int, stage) -> dict:
    steps = [(int(s), float(dt), float(t.replace(",", ""))) for s, dt, t in step_re.findall(run["stdout"])]
    tok_s = [t for s, _, t in steps if s >= warmup]
    # step N's CPU time is measured from step N-1's line: it includes any evaluation at the start of step N
    # (those few steps are outliers the median ignores)
    cpu = [seconds for s, seconds in run["cpu_per_step"].items() if s >= warmup and seconds > 0]
    return {"name": name, "tok_per_sec": statistics.median(tok_s) if tok_s else float("nan"),
            "tok_per_cpu_sec": stage.total_batch_size / statistics.median(cpu) if cpu else float("nan"),
            "val_bpb": {int(s): float(v) for s, v in val_re.findall(run["stdout"])}, "wall_s": run["seconds"],
            # the first step carries torch.compile's compilation where the model is compiled
            "first_step_s": steps[0][1] / 1000 if steps else float("nan"), "load": run["load"],
            # everything included: start-up, compilation, evaluations
            "end_to_end_tok_per_sec": stage.num_iterations * stage.total_batch_size / run["seconds"]}


# -----------------------------------------------------------------------------
# The two sides

def run_ours(args, stage, work: Path, data_dir: Path, tok_dir: Path, compiled: bool = False) -> dict:
    name = "nanopipe+compile" if compiled else "nanopipe"
    flags = shared_flags(stage) | dict(data_source="local", data_dir=data_dir, tokenizer_dir=tok_dir,
                                      out_dir=work / f"{name}_out", compile=str(compiled).lower())
    env = dict(os.environ, NANOPIPE_HOME=str(work / "nanopipe_home"), OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "nanopipe.stages.base_train", *[f"--{k}={v}" for k, v in flags.items()]]
    run = run_logged(cmd, env, REPO, work / f"{name}.log")
    return summarise(name, run, OUR_STEP, OUR_VAL, args.warmup_steps, stage)


def nanochat_home(work: Path, data_dir: Path, tok_dir: Path, tok: Tokenizer) -> Path:
    """nanochat's base dir: the same shards (validation last) and the same tokenizer in its format."""
    home = work / "nanochat_home" / data_dir.parent.name  # one per corpus
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


def nanochat_env(work: Path, nanochat_dir: Path, home: Path, **extra: str) -> dict:
    """The environment of a nanochat run: its checkout and base dir, and a refusing wandb module where wandb
    is not installed."""
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
    return dict(os.environ, NANOCHAT_BASE_DIR=str(home), PYTHONPATH=os.pathsep.join(path), **extra)


def nanochat_runner(args, stage, work: Path, nanochat_dir: Path, data_dir: Path, tok_dir: Path, tok: Tokenizer):
    """Prepare nanochat's home, environment and flags once; return a function that does one run."""
    home = nanochat_home(work, data_dir, tok_dir, tok)
    env = nanochat_env(work, nanochat_dir, home, OMP_NUM_THREADS=str(args.threads))
    flags = nanochat_flags(nanochat_dir, env, shared_flags(stage))

    def run_nanochat() -> dict:
        run = run_logged([sys.executable, "-m", "scripts.base_train", *flags], env, nanochat_dir,
                         work / "nanochat.log")
        return summarise("nanochat", run, NANOCHAT_STEP, NANOCHAT_VAL, args.warmup_steps, stage)

    return run_nanochat


# -----------------------------------------------------------------------------

def combine(runs: list[dict]) -> dict:
    """One side over its repeats: medians of the per-run figures (val bpb is deterministic: the first run's)."""
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"name": runs[0]["name"], "runs": runs, "tok_per_sec": med("tok_per_sec"),
            "tok_per_cpu_sec": med("tok_per_cpu_sec"),
            "end_to_end_tok_per_sec": med("end_to_end_tok_per_sec"), "wall_s": med("wall_s"),
            "first_step_s": med("first_step_s"), "val_bpb": runs[0]["val_bpb"],
            "bpb_repeatable": all(r["val_bpb"] == runs[0]["val_bpb"] for r in runs)}


def report(sides: list[dict]) -> None:
    print()
    print(f"{'':<18}{'tok/s median':>14}{'tok/CPU-s':>11}{'tok/s e2e':>11}{'step 0 s':>10}{'wall s':>9}   "
          f"val bpb by step")
    for side in sides:
        bpbs = "  ".join(f"{s}:{v:.4f}" for s, v in sorted(side["val_bpb"].items()))
        print(f"{side['name']:<18}{side['tok_per_sec']:>14,.0f}{side['tok_per_cpu_sec']:>11,.0f}"
              f"{side['end_to_end_tok_per_sec']:>11,.0f}{side['first_step_s']:>10.2f}{side['wall_s']:>9.1f}   {bpbs}")
        if len(side["runs"]) > 1:
            each = ", ".join(f"{r['tok_per_sec']:,.0f} / {r['tok_per_cpu_sec']:,.0f} (load {r['load'][0]:.1f}-"
                             f"{r['load'][1]:.1f})" for r in side["runs"])
            print(f"{'':<18}runs: {each}" + ("" if side["bpb_repeatable"] else "  [val bpb differs between runs]"))
        else:
            print(f"{'':<18}load average {side['runs'][0]['load'][0]:.1f} -> {side['runs'][0]['load'][1]:.1f}")
    print("\n(tok/s median: steps after the warm-up, then the median over the repeats; tok/CPU-s: the same per "
          "CPU-second of the process, steadier than wall time on a busy machine; e2e: all tokens / wall time, start-up, "
          "compilation and evaluations included; step 0: the first step, with any compilation)")
    ref = next((side for side in sides if side["name"] == "nanochat"), None)
    if ref is None:
        return
    for ours in (side for side in sides if side is not ref):
        pairs = [a["tok_per_sec"] / b["tok_per_sec"] for a, b in zip(ours["runs"], ref["runs"])]
        print(f"{ours['name']} / nanochat: tokens/s median {ours['tok_per_sec'] / ref['tok_per_sec']:.3f}, "
              f"per CPU-second {ours['tok_per_cpu_sec'] / ref['tok_per_cpu_sec']:.3f}, "
              f"end to end {ours['end_to_end_tok_per_sec'] / ref['end_to_end_tok_per_sec']:.3f} (target >= 1.0)"
              + (f"; run by run {', '.join(f'{p:.3f}' for p in pairs)}" if len(pairs) > 1 else ""))
        for step in sorted(set(ours["val_bpb"]) & set(ref["val_bpb"])):
            a, b = ours["val_bpb"][step], ref["val_bpb"][step]
            print(f"  val bpb at step {step}: {a:.4f} vs {b:.4f} (ratio {a / b:.4f}, target <= 1.0)")


def main() -> None:
    args, stage = parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_base_train_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s), workdir {work}")
    print(f"config: depth {stage.depth}, aspect {stage.aspect_ratio}, head_dim {stage.head_dim}, "
          f"seq {stage.max_seq_len}, "
          f"batch {stage.device_batch_size} x {stage.total_batch_size} tokens, {stage.num_iterations} steps, "
          f"vocab {stage.vocab_size}, "
          f"{args.repeats} repeat(s), corpus {args.corpus}")
    data_dir, tok_dir, tok = prepare_inputs(work, stage.vocab_size, args.corpus)
    sides = {"nanopipe": lambda: run_ours(args, stage, work, data_dir, tok_dir)}
    if args.also_compiled:
        sides["nanopipe+compile"] = lambda: run_ours(args, stage, work, data_dir, tok_dir, compiled=True)
    nanochat_dir = os.environ.get("NANOCHAT_DIR")
    if nanochat_dir:
        sides["nanochat"] = nanochat_runner(args, stage, work, Path(nanochat_dir).resolve(), data_dir, tok_dir, tok)
    else:
        print("NANOCHAT_DIR is not set: our side only")
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for name in order:
            result = sides[name]()
            runs[name].append(result)
            print(f"  repeat {repeat + 1}/{args.repeats} {name}: {result['tok_per_sec']:,.0f} tok/s, "
                  f"{result['tok_per_cpu_sec']:,.0f} tok/CPU-s "
                  f"(load {result['load'][0]:.1f} -> {result['load'][1]:.1f})", flush=True)
    report([combine(r) for r in runs.values()])
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
