"""
Training-step throughput of nanopipe's GPT (forward + backward + AdamW and Muon steps) on one device, and,
when NANOCHAT_DIR points at a nanochat checkout, of nanochat's GPT at the same configuration on the same
tokens, side by side. Prints figures; asserts nothing.

    python bench/bench_model.py --depth=4 --seq_len=256 --batch_size=8 --steps=20
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_model.py --depth=4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from nanopipe.gpt import GPT, build_model_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="number of layers")
    parser.add_argument("--aspect_ratio", type=int, default=64, help="width = depth * aspect_ratio")
    parser.add_argument("--head_dim", type=int, default=64, help="attention head dimension")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step")
    parser.add_argument("--vocab_size", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def time_training(model, optimizers, batches, warmup_steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per timed step, loss of the last step)."""
    use_autocast = device.type == "cuda"
    loss = None
    for i, (x, y) in enumerate(batches):
        if i == warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    last = loss.item()  # also waits for the device
    return (time.perf_counter() - t0) / (len(batches) - warmup_steps), last


def nanopipe_model(args, device):
    config = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.seq_len, args.vocab_size)
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
    steps = args.warmup_steps + args.steps
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, args.vocab_size, (steps, args.batch_size, args.seq_len + 1), generator=g).to(device)
    batches = [(row[:, :-1].contiguous(), row[:, 1:].contiguous()) for row in data]
    tokens_per_step = args.batch_size * args.seq_len

    model, optimizers, config = nanopipe_model(args, device)
    print(f"config: {config}  params: {model.num_params():,}  FLOPs/token: {model.estimate_flops():,}")
    print(f"device: {device}  threads: {torch.get_num_threads()}  tokens/step: {tokens_per_step}  "
          f"timed steps: {args.steps} (+{args.warmup_steps} warm-up)  ln(vocab): {math.log(args.vocab_size):.3f}")
    results = {"nanopipe": time_training(model, optimizers, batches, args.warmup_steps, device)}
    del model, optimizers
    nanochat_dir = os.environ.get("NANOCHAT_DIR")
    if nanochat_dir:
        model, optimizers = nanochat_model(nanochat_dir, config, device)
        results["nanochat"] = time_training(model, optimizers, batches, args.warmup_steps, device)
    else:
        print("NANOCHAT_DIR is not set: nanochat's side is skipped")
    for name, (seconds, loss) in results.items():
        print(f"{name:>9}: {seconds * 1000:8.1f} ms/step  {tokens_per_step / seconds:10,.0f} tok/s  "
              f"loss after {steps} steps: {loss:.4f}")
    if len(results) == 2:
        ratio = results["nanochat"][0] / results["nanopipe"][0]
        print(f"tokens/s ratio nanopipe / nanochat: {ratio:.3f}")


if __name__ == "__main__":
    main()
