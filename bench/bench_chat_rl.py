"""
Does chat_rl learn on a CPU? Build a tiny chat model from nothing, run RL on the offline builtin arithmetic task,
and print the reward curve next to that of a frozen policy on the same questions and sampling seeds.

    python bench/bench_chat_rl.py                      # the whole thing in a temporary NANOPIPE_HOME
    python bench/bench_chat_rl.py --home DIR --chat_rl.num_epochs 8 --base_train.depth 2

1. tok_train on the builtin corpus, 2. base_train (a short run), 3. chat_sft on the builtin chat mixture (identity,
spelling, quizzes, GSM8K-format arithmetic with the calculator), then more SFT on the arithmetic problems alone, so
that the model answers in GSM8K's format and is right part of the time, 4. chat_rl --task=builtin-arithmetic with
the CPU preset below, and the same command with the learning rates x 1e-5 (the control: the policy barely moves).
Every stage runs through its own main(), as the flow runs it.

RL trains on a fixed set of 64 generated problems for several epochs (8 steps of 8 questions each), so every
epoch sees the same questions and the mean reward per epoch is comparable: the six kinds of builtin problem differ
a lot in difficulty, and a step's reward jumps by +-0.2 with the questions it happens to draw. The control draws
the same questions with the same sampling seeds, so reward(RL) - reward(control) is what RL changed. The script
prints both curves, the mean reward per epoch, and the final pass@1/pass@k on held-out problems; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stage_flags import parse_bench_flags, stage_cli_args, stages_model  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.chat_rl import ChatRLConfig  # noqa: E402
from nanopipe.configs.chat_sft import ChatSFTConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402

# Each stage takes its own flags (`--chat_rl.num_epochs=8`), starting from this bench's scale: a depth-2 model
# (width 32 per layer) and the recommended CPU preset of chat_rl, found with this script (max_new_tokens: the
# builtin problems' answers take up to ~150 tokens with a small builtin-corpus tokenizer, and a cut answer scores 0;
# init_lr_frac: 0.5 collapses the policy within 10 steps, 0.2 gains more slowly than 0.1; Muon makes every step
# full-sized, however noisy the gradient)
STAGES = stages_model({"tok_train": TokTrainConfig, "base_train": BaseTrainConfig, "chat_sft": ChatSFTConfig,
                       "chat_rl": ChatRLConfig})
BENCH_SCALE = {
    "tok_train": dict(max_chars=2_000_000, vocab_size=1024),
    "base_train": dict(device_type="cpu", depth=2, aspect_ratio=32, head_dim=32, max_seq_len=256, device_batch_size=8,
                       total_batch_size=2048, num_iterations=20, eval_every=None, eval_tokens=16384,
                       core_metric_every=None, sample_every=None),
    "chat_sft": dict(device_type="cpu", source="base", mixture="builtin", device_batch_size=8,
                     target_examples_per_step=8, num_iterations=20, eval_every=None, eval_metrics_every=None),
    "chat_rl": dict(task="builtin-arithmetic", synthetic_size=64, device_type="cpu", examples_per_step=8,
                    num_samples=8, device_batch_size=8, max_new_tokens=128, temperature=1.0, top_k=50,
                    init_lr_frac=0.1, eval_every=None, eval_examples=64, save_every=16, num_epochs=6),
}


def parse_args(argv: list[str] | None = None):
    """(the bench's options, the four stages' configs) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=None, help="NANOPIPE_HOME to build in (default: a temporary directory)")
    parser.add_argument("--arith_sft_steps", type=int, default=200,
                        help="then SFT steps on the arithmetic problems only (batches of 16)")
    parser.add_argument("--threads", type=int, default=1)
    return parse_bench_flags(parser, STAGES, scale=BENCH_SCALE, argv=argv)


def control_of(rl: ChatRLConfig) -> ChatRLConfig:
    """The control run: the same command with the learning rates x 1e-5 (the policy barely moves)."""
    return rl.model_copy(update={"init_lr_frac": rl.init_lr_frac * 1e-5})


def timed(name: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    print(f"== {name}: {time.perf_counter() - start:.0f}s", flush=True)
    return result


def main() -> None:
    args, stages = parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="bench_chat_rl_"))
    os.environ["NANOPIPE_HOME"] = str(home)

    import torch
    torch.set_num_threads(args.threads)
    from nanopipe.stages import base_train, chat_rl, chat_sft, tok_train

    tok_dir, base_dir, sft_dir = home / "tokenizer", home / "base", home / "sft"
    arith_dir, rl_dir = home / "sft_arith", home / "rl"
    print(f"NANOPIPE_HOME={home}", flush=True)
    timed("tok_train", tok_train.main, [*stage_cli_args(stages.tok_train), f"--out_dir={tok_dir}"])
    timed("base_train", base_train.main, [*stage_cli_args(stages.base_train), f"--tokenizer_dir={tok_dir}",
                                          f"--out_dir={base_dir}"])
    timed("chat_sft (builtin mixture)", chat_sft.main, [*stage_cli_args(stages.chat_sft),
                                                        f"--checkpoint_dir={base_dir}", f"--out_dir={sft_dir}"])
    timed("SFT on arithmetic", arithmetic_sft, sft_dir, arith_dir, args.arith_sft_steps)

    print("chat_rl " + " ".join(stage_cli_args(stages.chat_rl)), flush=True)
    rl = timed("chat_rl", chat_rl.main, [*stage_cli_args(stages.chat_rl), f"--checkpoint_dir={arith_dir}",
                                         f"--out_dir={rl_dir}"])
    control = timed("chat_rl (control)", chat_rl.main, [*stage_cli_args(control_of(stages.chat_rl)),
                                                        f"--checkpoint_dir={arith_dir}",
                                                        f"--out_dir={home / 'rl_control'}"])
    report(rl, control, stages.chat_rl)


def arithmetic_sft(source_dir: Path, out_dir: Path, steps: int) -> None:
    """Supervised steps on the builtin arithmetic problems alone (assistant tokens only), from the chat_sft
    checkpoint, with the library's pieces: the chat trainers' optimizers and padded batches."""
    import dataclasses
    import random

    from nanopipe.chat_format import render_conversation
    from nanopipe.chat_batches import collate_supervised
    from nanopipe.chat_train import find_source, load_source_model, setup_chat_optimizers
    from nanopipe.checkpoint import save_checkpoint
    from nanopipe.tasks import ArithmeticProblems

    src = find_source("sft", checkpoint_dir=str(source_dir))
    model, tokenizer = load_source_model(src, "cpu")
    task = ArithmeticProblems(size=4000, split="train")
    rendered = [render_conversation(tokenizer, task[i], max_tokens=256) for i in range(len(task))]
    # pretraining's rates (higher than fine-tuning's): the format and the copying are learnt in a few hundred steps
    optimizers = setup_chat_optimizers(model, embedding_lr=0.3, unembedding_lr=0.02, matrix_lr=0.03,
                                       weight_decay=0.0)
    rng = random.Random(0)
    pad = tokenizer.encode_special("<|assistant_end|>")
    for step in range(steps):
        inputs, targets = collate_supervised(rng.sample(rendered, 16), pad)
        loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * (1 - step / steps)
            opt.step()
        model.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"arithmetic SFT step {step:04d}/{steps} | loss {loss.item():.4f}", flush=True)
    meta = {"model_config": dataclasses.asdict(model.config), "tokenizer_dir": str(src.tokenizer_dir)}
    save_checkpoint(out_dir, steps, model.state_dict(), None, meta)


def report(rl: dict, control: dict, config: ChatRLConfig) -> None:
    ours, base = rl["rewards"], control["rewards"]
    print("reward per step, RL:      " + " ".join(f"{r:.2f}" for r in ours))
    print("reward per step, control: " + " ".join(f"{r:.2f}" for r in base))
    steps_per_epoch = max(1, config.synthetic_size // config.examples_per_step)
    epochs = []
    for start in range(0, len(ours), steps_per_epoch):
        a, b = ours[start:start + steps_per_epoch], base[start:start + steps_per_epoch]
        epochs.append(sum(a) / len(a))
        print(f"epoch {start // steps_per_epoch + 1} (steps {start}-{start + len(a) - 1}): mean reward RL "
              f"{epochs[-1]:.3f}, control {sum(b) / len(b):.3f}, difference {(sum(a) - sum(b)) / len(a):+.3f}")
    print(f"reward curve: first step {ours[0]:.3f}, last step {ours[-1]:.3f}; first epoch mean {epochs[0]:.3f}, "
          f"last epoch mean {epochs[-1]:.3f}")
    k = rl["k"]
    print(f"final eval on held-out problems: RL pass@1 {rl['pass@1']:.3f} pass@{k} {rl['pass@k']:.3f}; control "
          f"pass@1 {control['pass@1']:.3f} pass@{k} {control['pass@k']:.3f}")


if __name__ == "__main__":
    main()
