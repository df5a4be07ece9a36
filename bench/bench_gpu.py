"""
Benchmark base pretraining on one CUDA GPU: our base_train against nanochat's (NANOCHAT_DIR), at d12 and d20,
the same data, tokenizer and batch shape, in one call.

    python bench/bench_gpu.py                                          # our side alone
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_gpu.py           # side by side, d12 and d20
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_gpu.py --depths=12 --num_iterations=30   # about 4 minutes

Each run trains --num_iterations optimizer steps of device_batch_size x max_seq_len tokens (no gradient accumulation)
with torch.compile on for both sides, and is timed from its own log lines. Printed per depth and side:
tokens/s (median over the steps after --warmup_steps, which hold the compilation), MFU (the model's own
training FLOPs per token x tokens/s over the GPU's dense bf16 peak, from the table below, by device name),
peak memory, the first step's time (compilation included), wall time; then ours / nanochat. Nothing is
asserted. A run that runs out of memory is reported as such (lower --device_batch_size), not fatal.

Data: the builtin corpus (Python's documentation, built locally: no network needed) and a BPE tokenizer of
--vocab_size trained on it (nanochat's default 32768); nanochat gets the same shards and tokenizer (see
bench_base_train.py). nanochat runs with full attention in every layer (--window_pattern=L) like ours, no LR
warm-up, wandb off. Both get PYTORCH_ALLOC_CONF=expandable_segments:True.

Without a CUDA device it says so and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402

# dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name(); the more specific
# names first (an "H100 PCIe" must not match "H100")
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
                   ("H100", 989e12), ("H800", 989e12), ("B200", 2.25e15), ("B100", 1.75e15), ("A100", 312e12),
                   ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A6000", 155e12), ("L4", 121e12),
                   ("A10", 125e12), ("4090", 165e12), ("3090", 71e12)]
DEFAULT_PEAK = ("unknown GPU: H100's", 989e12)

OUR_STEP = re.compile(r"^step (\d+)/\d+ .*?\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)", re.M)
NANOCHAT_STEP = re.compile(r"^step (\d+)/\d+ .*?\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)", re.M)
OUR_FLOPS = re.compile(r"^FLOPs per token \(fwd\+bwd\): ([\d.e+-]+)", re.M)
NANOCHAT_FLOPS = re.compile(r"^Estimated FLOPs per token: ([\d.e+-]+)", re.M)
OUR_MEMORY = re.compile(r"^Peak memory: ([\d,.]+) MiB", re.M)
NANOCHAT_MEMORY = re.compile(r"^Peak memory usage: ([\d,.]+) ?MiB", re.M)
OOM = re.compile(r"out of memory|OutOfMemoryError|OverMemoryError|estimated peak memory", re.I)


# The stage settings this bench takes, as base_train and tok_train define them (their defaults are nanochat's
# speedrun: 32 x 2048 tokens per device, vocabulary 32768); the bench times 30 steps
STAGE_FLAGS = [(BaseTrainConfig, ("num_iterations", "device_batch_size", "max_seq_len")),
               (TokTrainConfig, ("vocab_size",))]
BENCH_SCALE = dict(num_iterations=30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and the stage settings, in one namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=str, default="12,20", help="comma-separated model depths")
    p.add_argument("--warmup_steps", type=int, default=10, help="first steps left out of the tokens/s median")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, in alternating order")
    p.add_argument("--workdir", type=str, default=None, help="kept afterwards if given (default: a temp dir)")
    args, stage = parse_bench_flags(p, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    if stage.num_iterations is None:
        p.error("--num_iterations: the bench times a fixed number of steps; give one")
    return argparse.Namespace(**vars(args), **stage.model_dump())


def detect_gpu() -> dict | None:
    """Name, memory and bf16 peak of GPU 0, asked in a child process so that this one never holds a CUDA
    context (its memory would count against the runs); None without a CUDA device."""
    probe = ("import json, torch\n"
             "if not torch.cuda.is_available(): print('null')\n"
             "else:\n"
             "    p = torch.cuda.get_device_properties(0)\n"
             "    print(json.dumps({'name': p.name, 'memory_gib': p.total_memory / 2**30, 'count': "
             "torch.cuda.device_count(), 'torch': torch.__version__, 'cuda': torch.version.cuda}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"could not ask torch about CUDA devices:\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info is None:
        return None
    key, peak = next(((k, v) for k, v in PEAK_BF16_FLOPS if k in info["name"]), DEFAULT_PEAK)
    return info | {"peak_flops": peak, "peak_from": key}


# -----------------------------------------------------------------------------
# The two sides

def common_flags(args, depth: int) -> dict:
    tokens = args.device_batch_size * args.max_seq_len
    return dict(depth=depth, max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                total_batch_size=tokens, num_iterations=args.num_iterations, eval_every=-1, eval_tokens=tokens,
                core_metric_every=-1, sample_every=-1, device_type="cuda")


def run_side(name: str, cmd: list[str], env: dict, cwd: Path, log: Path) -> dict:
    """One training run; its stdout, or the reason it failed (out of memory is reported, anything else fatal)."""
    from bench_base_train import run_logged
    try:
        return {"name": name, **run_logged(cmd, env, cwd, log)}
    except SystemExit as failure:
        text = log.read_text(errors="replace") if log.is_file() else str(failure)
        if OOM.search(text):
            return {"name": name, "failed": "out of memory (lower --device_batch_size)"}
        raise


def summarise(run: dict, step_re, flops_re, memory_re, args, gpu: dict) -> dict:
    if "failed" in run:
        return run
    out = run["stdout"]
    steps = [(int(s), float(dt), float(t.replace(",", ""))) for s, dt, t in step_re.findall(out)]
    tok_s = [t for s, _, t in steps if s >= args.warmup_steps]
    flops = flops_re.search(out)
    memory = memory_re.search(out)
    tok_per_sec = statistics.median(tok_s) if tok_s else float("nan")
    flops_per_token = float(flops.group(1)) if flops else float("nan")
    return {"name": run["name"], "tok_per_sec": tok_per_sec, "flops_per_token": flops_per_token,
            "mfu": 100 * flops_per_token * tok_per_sec / gpu["peak_flops"],
            "peak_memory_mib": float(memory.group(1).replace(",", "")) if memory else float("nan"),
            "first_step_s": steps[0][1] / 1000 if steps else float("nan"), "wall_s": run["seconds"]}


def ours(args, depth: int, work: Path, data_dir: Path, tok_dir: Path, gpu: dict) -> dict:
    # compile on explicitly: a short benchmark would otherwise run eager (--compile auto wants >= 50 steps)
    flags = common_flags(args, depth) | dict(data_source="local", data_dir=data_dir, tokenizer_dir=tok_dir,
                                             out_dir=work / f"nanopipe_d{depth}", compile="true")
    env = dict(os.environ, NANOPIPE_HOME=str(work / "nanopipe_home"), PYTHONPATH=str(REPO),
               PYTORCH_ALLOC_CONF="expandable_segments:True")
    cmd = [sys.executable, "-m", "nanopipe.stages.base_train", *[f"--{k}={v}" for k, v in flags.items()]]
    run = run_side("nanopipe", cmd, env, REPO, work / f"nanopipe_d{depth}.log")
    return summarise(run, OUR_STEP, OUR_FLOPS, OUR_MEMORY, args, gpu)


def nanochat(args, depth: int, work: Path, nanochat_dir: Path, data_dir: Path, tok_dir: Path, tok, gpu: dict) -> dict:
    from bench_base_train import nanochat_env, nanochat_flags, nanochat_home
    home = nanochat_home(work, data_dir, tok_dir, tok)
    env = nanochat_env(work, nanochat_dir, home, PYTORCH_ALLOC_CONF="expandable_segments:True")
    flags = nanochat_flags(nanochat_dir, env, common_flags(args, depth))
    run = run_side("nanochat", [sys.executable, "-m", "scripts.base_train", *flags], env, nanochat_dir,
                   work / f"nanochat_d{depth}.log")
    return summarise(run, NANOCHAT_STEP, NANOCHAT_FLOPS, NANOCHAT_MEMORY, args, gpu)


# -----------------------------------------------------------------------------

def combine(runs: list[dict]) -> dict:
    good = [r for r in runs if "failed" not in r]
    if not good:
        return runs[0]
    med = lambda key: statistics.median(r[key] for r in good)  # noqa: E731
    return {"name": good[0]["name"], **{k: med(k) for k in ("tok_per_sec", "mfu", "peak_memory_mib",
                                                           "first_step_s", "wall_s", "flops_per_token")}}


def report(depth: int, sides: list[dict]) -> None:
    print(f"\nd{depth}:")
    print(f"  {'':<10}{'tok/s':>12}{'MFU %':>8}{'FLOPs/token':>13}{'peak MiB':>11}{'step 0 s':>10}{'wall s':>9}")
    for side in sides:
        if "failed" in side:
            print(f"  {side['name']:<10}{side['failed']}")
            continue
        print(f"  {side['name']:<10}{side['tok_per_sec']:>12,.0f}{side['mfu']:>8.2f}{side['flops_per_token']:>13.3e}"
              f"{side['peak_memory_mib']:>11,.0f}{side['first_step_s']:>10.1f}{side['wall_s']:>9.1f}")
    if len(sides) == 2 and not any("failed" in s for s in sides):
        a, b = sides
        print(f"  nanopipe / nanochat: tokens/s {a['tok_per_sec'] / b['tok_per_sec']:.3f}, MFU {a['mfu'] / b['mfu']:.3f}, "
              f"peak memory {a['peak_memory_mib'] / b['peak_memory_mib']:.3f}, first step "
              f"{a['first_step_s'] / b['first_step_s']:.3f}")


def main() -> None:
    args = parse_args()
    gpu = detect_gpu()
    if gpu is None:
        print("no CUDA device: nothing to measure (bench_gpu.py trains on a GPU; bench_base_train.py is the CPU "
              "benchmark)")
        return
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from bench_base_train import prepare_inputs
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{gpu['name']} ({gpu['memory_gib']:.0f} GiB, {gpu['count']} visible), torch {gpu['torch']} CUDA "
          f"{gpu['cuda']}; bf16 peak {gpu['peak_flops'] / 1e12:.0f} TFLOP/s ({gpu['peak_from']}); depths {depths}, "
          f"{args.num_iterations} steps of {args.device_batch_size} x {args.max_seq_len} tokens, "
          f"{args.repeats} repeat(s)")
    data_dir, tok_dir, tok = prepare_inputs(work, args.vocab_size, "builtin")
    nanochat_dir = os.environ.get("NANOCHAT_DIR")
    if not nanochat_dir:
        print("NANOCHAT_DIR is not set: our side only")
    for depth in depths:
        sides = {"nanopipe": lambda: ours(args, depth, work, data_dir, tok_dir, gpu)}
        if nanochat_dir:
            sides["nanochat"] = lambda: nanochat(args, depth, work, Path(nanochat_dir).resolve(), data_dir, tok_dir,
                                                 tok, gpu)
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
                result = sides[name]()
                runs[name].append(result)
                print(f"  d{depth} repeat {repeat + 1}/{args.repeats} {name}: "
                      + (result["failed"] if "failed" in result else
                         f"{result['tok_per_sec']:,.0f} tok/s, MFU {result['mfu']:.2f}%"), flush=True)
        report(depth, [combine(r) for r in runs.values()])
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
