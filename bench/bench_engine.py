"""
Inference throughput on one device: decode tokens/s of the Engine (KV cache, one prefill) against the
model's cache-free sampler (the whole sequence re-run for every token), chat_eval problems/s on the
offline tasks (MultipleChoice: letter logits, batched; Arithmetic: greedy generation, several problems per
batch), and the seconds of RL rollouts (several questions' groups per batch). Random weights (the special
tokens' logits are zeroed so no sample stops early; a tokenizer trained on the builtin chat tasks), or a
real chat checkpoint. Prints figures, wall and CPU seconds (CPU time is the fairer figure on a shared
machine); asserts nothing.

    python bench/bench_engine.py                               # depth 4, width 256, CPU
    python bench/bench_engine.py --depth=2 --aspect_ratio=32 --threads=1 --max_tokens=128
    python bench/bench_engine.py --sections=eval,rl --threads=1 --eval_max_new_tokens=200 \
        --checkpoint_dir=<chat_sft checkpoints> --tokenizer_dir=<tok_train tokenizer>   # batching on a chat model

Measured on a shared 2-core CPU, 1 torch thread, depth 4 / width 128 / vocab 2048 (a mid-trained chat model and
random weights), 64 Arithmetic problems, greedy, <= 200 new tokens; problems/s (CPU-time, quiet machine):
batch 1 (one problem at a time, as before) 12 / 5.4, batch 8: 36 / 17, 16: 43 / 21, 32: 39 / 23, 64: 41 / 31.
RL rollouts, 4 questions x 8 samples, <= 128 tokens: 0.58 s one question per batch, 0.49-0.53 s with
device_batch_size 32 (the 8 samples of a question were already decoded together).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.chat_format import conversation_text  # noqa: E402
from nanopipe.chat_scoring import evaluate_categorical, evaluate_generative  # noqa: E402
from nanopipe.checkpoint import build_model, find_last_step  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.chat_eval import ChatEvalConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.engine import Engine  # noqa: E402
from nanopipe.gpt import GPT, build_model_config  # noqa: E402
from nanopipe.rl import sample_groups  # noqa: E402
from nanopipe.tasks import build_task, builtin_chat_mixture  # noqa: E402
from nanopipe.tokenizer import Tokenizer  # noqa: E402


# The stage settings this bench takes, as the stages define them, and the bench's scale (depth 4, width 256)
STAGE_FLAGS = [(BaseTrainConfig, ("depth", "aspect_ratio", "head_dim", "max_seq_len")),
               (TokTrainConfig, ("vocab_size",)), (ChatEvalConfig, ("synthetic_size", "tokenizer_dir"))]
BENCH_SCALE = dict(depth=4, head_dim=64, max_seq_len=512, vocab_size=1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and the stage settings, in one namespace."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--max_tokens", type=int, default=256, help="tokens decoded per timed run")
    parser.add_argument("--samples", default="1,8", help="num_samples values for the engine, comma-separated")
    parser.add_argument("--eval_problems", type=int, default=64, help="problems per chat_eval task")
    parser.add_argument("--eval_max_new_tokens", type=int, default=64, help="tokens per generative answer")
    parser.add_argument("--eval_batch_sizes", default="1,8,32", help="Arithmetic problems per batch, comma-separated")
    parser.add_argument("--rl_questions", type=int, default=4, help="questions of the timed RL rollouts")
    parser.add_argument("--rl_samples", type=int, default=8, help="samples per RL question")
    parser.add_argument("--rl_device_batch_sizes", default="8,32", help="RL sequences per batch, comma-separated")
    parser.add_argument("--rl_max_new_tokens", type=int, default=128, help="tokens per RL sample")
    parser.add_argument("--sections", default="decode,eval,rl", help="what to time: decode, eval, rl")
    parser.add_argument("--checkpoint_dir", default=None, help="a chat checkpoint directory instead of random "
                                                               "weights (its last step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args, stage = parse_bench_flags(parser, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    return argparse.Namespace(**vars(args), **stage.model_dump())


def build(args, device):
    texts = [conversation_text(c) for c in builtin_chat_mixture("train", size=200)]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=args.vocab_size)
    config = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
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


def wall_and_cpu(fn, device) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result)."""
    cpu = time.process_time()
    seconds, out = timed(fn, device)
    return seconds, time.process_time() - cpu, out


def bench_decode(args, model, tokenizer, engine, device) -> None:
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


def bench_eval(args, model, tokenizer, engine, device) -> None:
    print(f"\nchat_eval: {args.eval_problems} problems per task")
    mc = build_task("MultipleChoice", size=args.synthetic_size)
    seconds, (_, total) = timed(lambda: evaluate_categorical(mc, model, tokenizer, args.eval_problems,
                                                             batch_size=8), device)
    print(f"  {'MultipleChoice (letter logits, batch 8)':<44} {total / seconds:>8.1f} problems/s")
    arithmetic = build_task("Arithmetic", size=args.synthetic_size)
    print(f"  Arithmetic, greedy, at most {args.eval_max_new_tokens} new tokens:")
    for batch_size in (int(b) for b in args.eval_batch_sizes.split(",")):
        wall, cpu, (passed, total) = wall_and_cpu(lambda: evaluate_generative(
            arithmetic, engine, tokenizer, args.eval_problems, num_samples=1, max_new_tokens=args.eval_max_new_tokens,
            temperature=0.0, top_k=None, seed=0, batch_size=batch_size), device)
        print(f"    batch {batch_size:>3} problems   {total / wall:>7.2f} problems/s wall ({wall:6.2f} s)"
              f"   {total / cpu:>7.2f} problems/s CPU ({cpu:6.2f} s)   passed {passed}/{total}")


def bench_rl(args, model, tokenizer, engine, device) -> None:
    task = build_task("Arithmetic", split="train", size=args.synthetic_size)
    questions = [task[i] for i in range(args.rl_questions)]
    print(f"\nRL rollouts: {args.rl_questions} questions x {args.rl_samples} samples, temperature 1, top_k 50, "
          f"at most {args.rl_max_new_tokens} new tokens")
    for device_batch_size in (int(b) for b in args.rl_device_batch_sizes.split(",")):
        wall, cpu, groups = wall_and_cpu(lambda: sample_groups(
            engine, tokenizer, task, questions, args.rl_samples, device_batch_size, args.rl_max_new_tokens,
            temperature=1.0, top_k=50, rng=random.Random(0)), device)
        reward = sum(sum(g.rewards) for g in groups) / sum(len(g.rewards) for g in groups)
        print(f"    device_batch_size {device_batch_size:>3}   {wall:6.2f} s wall   {cpu:6.2f} s CPU   "
              f"mean reward {reward:.3f}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.checkpoint_dir:
        step = find_last_step(args.checkpoint_dir)
        model, tokenizer, _ = build_model(args.checkpoint_dir, step, device, "eval", args.tokenizer_dir)
        weights = f"{args.checkpoint_dir} step {step}"
    else:
        model, tokenizer = build(args, device)
        weights = "random weights"
    engine = Engine(model, tokenizer)
    c = model.config
    print(f"model: depth {c.n_layer}, width {c.n_embd}, heads {c.n_head}, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M params, {weights}; device {device}, torch threads {torch.get_num_threads()}")
    sections = {"decode": bench_decode, "eval": bench_eval, "rl": bench_rl}
    for name in args.sections.split(","):
        assert name in sections, f"--sections: unknown {name!r}, choose from {', '.join(sections)}"
        sections[name](args, model, tokenizer, engine, device)


if __name__ == "__main__":
    main()
