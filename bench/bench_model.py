"""
Training-step throughput of nanopipe's GPT (forward + backward + AdamW and Muon steps) on one device, and,
when NANOCHAT_DIR points at a nanochat checkout, of nanochat's GPT at the same configuration on the same
tokens, side by side. Prints figures; asserts nothing.

    python bench/bench_model.py --depth=4 --max_seq_len=128 --device_batch_size=8 --steps=30
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_model.py --depth=4 --threads=1

Both models live in one process and their steps alternate (ours, nanochat, nanochat, ours, ...), so that
the load of a shared machine hits both alike; each step's wall time and the CPU time of the thread that runs
it are recorded, and the medians and 10th percentiles compared (CPU time barely moves with competing load).
nanochat's model is torch.compile'd as its base_train does (--nanochat_compile=false for eager); ours runs
eager, as our base_train does on CPU (--compile for compiled). On CPU the process keeps freed memory as our
base_train does (glibc tuning), which helps both sides.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.gpt import GPT, build_model_config  # noqa: E402
from nanopipe.training import keep_freed_memory_for_reuse  # noqa: E402


# The stage settings this bench takes, as the stages define them, and the bench's scale (d4, width 256)
STAGE_FLAGS = [(BaseTrainConfig, ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size")),
               (TokTrainConfig, ("vocab_size",))]
BENCH_SCALE = dict(depth=4, head_dim=64, max_seq_len=256, device_batch_size=8, vocab_size=2048)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and the stage settings, in one namespace."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model too")
    parser.add_argument("--nanochat_compile", default="true", choices=["true", "false"],
                        help="torch.compile nanochat's model, as its base_train does")
    args, stage = parse_bench_flags(parser, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    return argparse.Namespace(**vars(args), **stage.model_dump())


def make_stepper(model, optimizers, device: torch.device):
    """A function that runs one training step on (x, y) and returns the loss tensor."""
    use_autocast = device.type == "cuda"

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    return step


def run_alternating(steppers: dict, batches: list, warmup_steps: int, device: torch.device) -> dict:
    """{name: {"wall": [s], "cpu": [s], "loss": last loss}} over the timed steps, sides alternating."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {name: {"wall": [], "cpu": [], "loss": None} for name in steppers}
    names = list(steppers)
    for i, (x, y) in enumerate(batches):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync()
            wall, cpu = time.perf_counter(), time.thread_time()
            loss = steppers[name](x, y)
            results[name]["loss"] = loss.item()  # also waits for the device
            if i >= warmup_steps:
                results[name]["wall"].append(time.perf_counter() - wall)
                results[name]["cpu"].append(time.thread_time() - cpu)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def nanopipe_model(args, device):
    config = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, args.vocab_size)
    torch.manual_seed(0)
    model = GPT.create(config, device)
    return model, model.setup_optimizers(), config


def nanochat_model(nanochat_dir: str, config, device):
    """nanochat's GPT at our config: older checkouts return two optimizers, newer ones a combined one."""
    sys.path.insert(0, os.path.expanduser(nanochat_dir))
    from nanochat.gpt import GPT as NanochatGPT, GPTConfig as NanochatConfig
    fields = NanochatConfig.__dataclass_fields__
    kwargs = dict(sequence_len=config.sequence_len, vocab_size=config.vocab_size, n_layer=config.n_layer,
                  n_head=config.n_head, n_kv_head=config.n_kv_head, n_embd=config.n_embd)
    if "window_pattern" in fields:
        kwargs["window_pattern"] = "L"  # full context everywhere, as ours
    with torch.device("meta"):
        model = NanochatGPT(NanochatConfig(**kwargs))
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    if hasattr(model, "setup_optimizers"):
        optimizers = model.setup_optimizers()
    else:
        optimizers = [model.setup_optimizer()]
    return model, optimizers


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    steps = args.warmup_steps + args.steps
    g = torch.Generator().manual_seed(1)
    shape = (steps, args.device_batch_size, args.max_seq_len + 1)
    data = torch.randint(0, args.vocab_size, shape, generator=g).to(device)
    batches = [(row[:, :-1].contiguous(), row[:, 1:].contiguous()) for row in data]
    tokens_per_step = args.device_batch_size * args.max_seq_len

    model, optimizers, config = nanopipe_model(args, device)
    print(f"config: {config}  params: {model.num_params():,}  FLOPs/token: {model.estimate_flops():,}")
    print(f"device: {device}  threads: {torch.get_num_threads()}  tokens/step: {tokens_per_step}  "
          f"timed steps: {args.steps} (+{args.warmup_steps} warm-up)  ln(vocab): {math.log(args.vocab_size):.3f}")
    steppers = {"nanopipe": make_stepper(torch.compile(model, dynamic=False) if args.compile else model,
                                         optimizers, device)}
    nanochat_dir = os.environ.get("NANOCHAT_DIR")
    if nanochat_dir:
        nc_model, nc_optimizers = nanochat_model(nanochat_dir, config, device)
        compiled = args.nanochat_compile == "true"
        steppers["nanochat"] = make_stepper(torch.compile(nc_model, dynamic=False) if compiled else nc_model,
                                            nc_optimizers, device)
    else:
        print("NANOCHAT_DIR is not set: nanochat's side is skipped")
    results = run_alternating(steppers, batches, args.warmup_steps, device)
    for name, r in results.items():
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"{name:>9}: {wall * 1000:8.1f} ms/step wall ({tokens_per_step / wall:8,.0f} tok/s), CPU median "
              f"{cpu * 1000:7.1f} ms, p10 {percentile(r['cpu'], 0.1) * 1000:7.1f} ms; loss after {steps} steps: "
              f"{r['loss']:.4f}")
    if len(results) == 2:
        ours, ref = results["nanopipe"], results["nanochat"]
        print(f"tokens/s ratio nanopipe / nanochat: wall {statistics.median(ref['wall']) / statistics.median(ours['wall']):.3f}, "
              f"CPU median {statistics.median(ref['cpu']) / statistics.median(ours['cpu']):.3f}, "
              f"CPU p10 {percentile(ref['cpu'], 0.1) / percentile(ours['cpu'], 0.1):.3f}")


if __name__ == "__main__":
    main()
