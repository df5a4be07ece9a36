"""
Inference throughput on one device: decode tokens/s of the Engine (KV cache, one prefill) against the
model's cache-free sampler (the whole sequence re-run for every token), and chat_eval problems/s on the
offline tasks (MultipleChoice: letter logits, batched; Arithmetic: greedy generation). Random weights (the
special tokens' logits are zeroed so no sample stops early); a tokenizer trained on the builtin chat tasks.
Prints figures; asserts nothing.

    python bench/bench_engine.py                               # depth 4, width 256, CPU
    python bench/bench_engine.py --depth=2 --aspect_ratio=32 --threads=1 --max_tokens=128
"""

from __future__ import annotations

import argparse
import time

import torch

from nanopipe.chat_format import conversation_text
from nanopipe.engine import Engine
from nanopipe.gpt import GPT, build_model_config
from nanopipe.chat_scoring import evaluate_categorical, evaluate_generative
from nanopipe.tasks import build_task, builtin_chat_mixture
from nanopipe.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="number of layers")
    parser.add_argument("--aspect_ratio", type=int, default=64, help="width = depth * aspect_ratio")
    parser.add_argument("--head_dim", type=int, default=64, help="attention head dimension")
    parser.add_argument("--seq_len", type=int, default=512, help="model context (tokens)")
    parser.add_argument("--vocab_size", type=int, default=1024, help="tokenizer vocabulary size to train")
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--max_tokens", type=int, default=256, help="tokens decoded per timed run")
    parser.add_argument("--samples", default="1,8", help="num_samples values for the engine, comma-separated")
    parser.add_argument("--eval_problems", type=int, default=64, help="problems per chat_eval task")
    parser.add_argument("--eval_max_new_tokens", type=int, default=64, help="tokens per generative answer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def build(args, device):
    texts = [conversation_text(c) for c in builtin_chat_mixture("train", size=200)]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=args.vocab_size)
    config = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.seq_len,
                                tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = GPT.create(config, device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        for name in tokenizer.get_special_tokens():  # never the argmax: decoding runs its full length
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    return model, tokenizer


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = build(args, device)
    engine = Engine(model, tokenizer)
    c = model.config
    print(f"model: depth {c.n_layer}, width {c.n_embd}, heads {c.n_head}, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M params; device {device}, torch threads {torch.get_num_threads()}")
    prompt = [tokenizer.get_bos_token_id()] + [(7 * i) % 256 for i in range(args.prompt_len - 1)]
    engine.generate_batch(prompt, max_tokens=8, temperature=0.0)  # warm-up

    print(f"\ndecode: prompt {len(prompt)} tokens, {args.max_tokens} new tokens per sample, greedy")
    seconds, tokens = timed(lambda: list(model.generate(prompt, args.max_tokens, temperature=0.0)), device)
    baseline = len(tokens) / seconds
    print(f"  {'no KV cache (model.generate)':<34} {baseline:>10.1f} tokens/s   {seconds:6.2f} s")
    for num_samples in (int(s) for s in args.samples.split(",")):
        seconds, (results, _) = timed(lambda: engine.generate_batch(prompt, num_samples=num_samples,
                                                                    max_tokens=args.max_tokens, temperature=0.0),
                                      device)
        generated = sum(len(r) - len(prompt) for r in results)
        rate = generated / seconds
        print(f"  {f'KV cache (Engine), {num_samples} sample(s)':<34} {rate:>10.1f} tokens/s   {seconds:6.2f} s"
              f"   x{rate / baseline:.1f}")

    print(f"\nchat_eval: {args.eval_problems} problems per task")
    mc = build_task("MultipleChoice", size=args.eval_problems)
    seconds, (_, total) = timed(lambda: evaluate_categorical(mc, model, tokenizer, len(mc), batch_size=8), device)
    print(f"  {'MultipleChoice (letter logits, batch 8)':<44} {total / seconds:>8.1f} problems/s")
    arithmetic = build_task("Arithmetic", size=args.eval_problems)
    seconds, (_, total) = timed(lambda: evaluate_generative(
        arithmetic, engine, tokenizer, len(arithmetic), num_samples=1, max_new_tokens=args.eval_max_new_tokens,
        temperature=0.0, top_k=None, seed=0), device)
    print(f"  {f'Arithmetic (greedy, {args.eval_max_new_tokens} new tokens)':<44} {total / seconds:>8.1f} problems/s")


if __name__ == "__main__":
    main()
