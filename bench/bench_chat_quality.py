"""
Benchmark the chat stack's quality at demo-cpu size, offline: tokenizer -> base -> mid -> SFT on the builtin
data, then figures on held-out builtin conversations that none of the stages trained on.

    python bench/bench_chat_quality.py                        # the demo-cpu chain, 2 processes, ~6-8 min on 2 cores
    python bench/bench_chat_quality.py --workdir=DIR --keep --mid_train.builtin_size=1000

Printed figures (each with the relation it is expected to show):
- chat-format loss (every token of a conversation, nats/token): base vs mid        (mid lower)
- assistant-only loss (what the assistant writes, nats/token): mid vs SFT          (SFT lower)
- builtin chat tasks, base vs SFT: Arithmetic word problems in GSM8K format (greedy completions: share with a
  '#### N' answer line, share that call the calculator, accuracy) and MultipleChoice accuracy (chance 25%)
and the wall time of every stage. Nothing is asserted; the relations are printed as met / NOT met.

The held-out set is the test partition of the builtin tasks (nanopipe.tasks.builtin: train and test never share
an example), drawn with a seed no stage uses. The stages run as their own commands (`python -m
nanopipe.stages.<name>`, under torchrun with --nproc processes), exactly as the pipeline runs them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.stage_flags import parse_bench_flags, stage_cli_args, stages_model  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.chat_sft import ChatSFTConfig  # noqa: E402
from nanopipe.configs.mid_train import MidTrainConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.chat_format import render_conversation, render_for_completion  # noqa: E402
from nanopipe.chat_scoring import evaluate_categorical  # noqa: E402
from nanopipe.chat_batches import collate_supervised, evaluate_chat_loss  # noqa: E402
from nanopipe.checkpoint import load_model  # noqa: E402
from nanopipe.engine import Engine  # noqa: E402
from nanopipe.tasks.builtin import ArithmeticProblems, IdentityChat, MultipleChoiceQuiz  # noqa: E402
from nanopipe.tasks.gsm8k import extract_final_answer  # noqa: E402
from nanopipe.tasks.spelling import SimpleSpelling, SpellingBee  # noqa: E402

HELD_OUT_SEED = 2024  # no stage draws builtin examples with this seed

# The stages' own flags (`--base_train.num_iterations=60`), starting from the demo-cpu preset's tokenizer and base
# model (flows/presets.py) and the mid/SFT settings recommended for it. Mid-training uses the rates as given,
# whatever the batch (as nanochat's); the tiny model learns the chat format far faster at 0.265 = 3 x sqrt(4096 /
# 2^19) than at 0.088 (val loss 1.38 vs 2.71 after one pass); nanochat's SFT 0.02 barely moves it in 56 steps.
STAGES = stages_model({"tok_train": TokTrainConfig, "base_train": BaseTrainConfig, "mid_train": MidTrainConfig,
                       "chat_sft": ChatSFTConfig})
BENCH_SCALE = {
    "tok_train": dict(vocab_size=2048, max_chars=3_000_000, device_type="cpu"),
    "base_train": dict(device_type="cpu", depth=4, aspect_ratio=32, head_dim=32, max_seq_len=256, device_batch_size=8,
                       total_batch_size=4096, num_iterations=40, eval_every=20, eval_tokens=16384,
                       core_metric_every=None, sample_every=None, save_every=10),
    "mid_train": dict(device_type="cpu", mixture="builtin", max_seq_len=256, device_batch_size=8,
                      total_batch_size=4096, eval_every=25, eval_tokens=16384, save_every=25, builtin_size=500,
                      init_lr_frac=0.265),
    "chat_sft": dict(device_type="cpu", mixture="builtin", device_batch_size=8, target_examples_per_step=32,
                     eval_every=20, eval_steps=8, eval_metrics_every=None, eval_metrics_max_problems=128,
                     save_every=20, builtin_size=500, init_lr_frac=0.2),
}


def parse_args(argv: list[str] | None = None):
    """(the bench's options, the four stages' configs) from the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="NANOPIPE_HOME of the run (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--nproc", type=int, default=2, help="processes per training stage (torchrun, gloo)")
    p.add_argument("--held_out_per_task", type=int, default=40, help="held-out conversations per builtin task")
    p.add_argument("--generate_problems", type=int, default=48, help="Arithmetic problems completed per model")
    p.add_argument("--max_new_tokens", type=int, default=160, help="tokens per Arithmetic completion")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluations in this process")
    return parse_bench_flags(p, STAGES, scale=BENCH_SCALE, argv=argv)


# -----------------------------------------------------------------------------
# Running the stages

def run_stage(name: str, args: list[str], home: Path, nproc: int) -> float:
    """Run one stage as its own command with these flags; return its wall time. Fails loudly with the log tail."""
    if nproc > 1 and name not in ("tok_train",):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", f"nanopipe.stages.{name}", *args]
    else:
        cmd = [sys.executable, "-m", f"nanopipe.stages.{name}", *args]
    env = dict(os.environ, NANOPIPE_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    (home / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    print(f"  {name:<10} {seconds:6.1f} s", flush=True)
    return seconds


# -----------------------------------------------------------------------------
# Figures on held-out conversations

def held_out_conversations(per_task: int) -> list[dict]:
    tasks = [IdentityChat(per_task, "test", HELD_OUT_SEED), ArithmeticProblems(per_task, "test", HELD_OUT_SEED),
             MultipleChoiceQuiz(per_task, "test", HELD_OUT_SEED), SimpleSpelling(per_task, "test", HELD_OUT_SEED),
             SpellingBee(per_task, "test", HELD_OUT_SEED)]
    return [task[i] for task in tasks for i in range(len(task))]


@torch.no_grad()
def conversation_loss(model, tokenizer, conversations: list[dict], assistant_only: bool, batch: int = 16) -> float:
    """Mean nats per target token over whole conversations, one per row (every token, or the assistant's)."""
    max_tokens = model.config.sequence_len
    pad = tokenizer.encode_special("<|assistant_end|>")
    rendered = []
    for conversation in conversations:
        ids, mask = render_conversation(tokenizer, conversation, max_tokens=max_tokens)
        rendered.append((ids, mask if assistant_only else [1] * len(ids)))
    batches = iter([collate_supervised(rendered[i:i + batch], pad) for i in range(0, len(rendered), batch)])
    token_bytes = tokenizer.token_byte_lengths().to(torch.int64)
    return evaluate_chat_loss(model, batches, -(-len(rendered) // batch), token_bytes)["loss"]


def arithmetic_figures(model, tokenizer, problems: int, max_new_tokens: int) -> dict:
    """Greedy completions of held-out Arithmetic problems: answer-line format, calculator use, accuracy."""
    task = ArithmeticProblems(problems, "test", HELD_OUT_SEED)
    engine = Engine(model, tokenizer)
    python_start = tokenizer.encode_special("<|python_start|>")
    in_format = calculator = correct = 0
    for i in range(problems):
        conversation = task[i]
        prompt = render_for_completion(tokenizer, conversation)
        results, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=max_new_tokens, temperature=0.0)
        generated = results[0][len(prompt):]
        completion = tokenizer.decode(generated)
        in_format += extract_final_answer(completion) is not None
        calculator += python_start in generated
        correct += task.evaluate(conversation, completion)
    return {"answer_format": in_format / problems, "calculator": calculator / problems, "accuracy": correct / problems,
            "sample": completion[:300]}


def multiple_choice_accuracy(model, tokenizer, problems: int = 200) -> float:
    task = MultipleChoiceQuiz(problems, "test", HELD_OUT_SEED)
    passed, total = evaluate_categorical(task, model, tokenizer, problems, batch_size=16)
    return passed / total


# -----------------------------------------------------------------------------

def main() -> None:
    args, stages = parse_args()
    home = args.workdir or Path(tempfile.mkdtemp(prefix="chat-quality-"))
    home.mkdir(parents=True, exist_ok=True)
    print(f"workdir {home}; {args.nproc} process(es) per training stage; {os.cpu_count()} CPU(s); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    t_start = time.perf_counter()
    base_dir, mid_dir, sft_dir = (home / "base_checkpoints" / "d4", home / "mid_checkpoints" / "d4",
                                  home / "chatsft_checkpoints" / "d4")
    times = {"tok_train": run_stage("tok_train", stage_cli_args(stages.tok_train), home, 1)}
    times["base_train"] = run_stage("base_train", [*stage_cli_args(stages.base_train), f"--out_dir={base_dir}"],
                                    home, args.nproc)
    times["mid_train"] = run_stage("mid_train", [*stage_cli_args(stages.mid_train), f"--checkpoint_dir={base_dir}",
                                                 f"--out_dir={mid_dir}"], home, args.nproc)
    times["chat_sft"] = run_stage("chat_sft", [*stage_cli_args(stages.chat_sft), f"--checkpoint_dir={mid_dir}",
                                               f"--out_dir={sft_dir}"], home, args.nproc)

    t_eval = time.perf_counter()
    torch.set_num_threads(args.threads)
    conversations = held_out_conversations(args.held_out_per_task)
    models = {name: load_model(name, "cpu", "eval", checkpoint_dir=d)[:2]
              for name, d in (("base", base_dir), ("mid", mid_dir), ("sft", sft_dir))}
    chat_loss = {n: conversation_loss(m, t, conversations, assistant_only=False) for n, (m, t) in models.items()}
    assistant_loss = {n: conversation_loss(m, t, conversations, assistant_only=True) for n, (m, t) in models.items()}
    arithmetic = {n: arithmetic_figures(*models[n], args.generate_problems, args.max_new_tokens) for n in ("base", "sft")}
    mc = {n: multiple_choice_accuracy(*models[n]) for n in ("base", "sft")}
    times["evaluations"] = time.perf_counter() - t_eval
    total = time.perf_counter() - t_start

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\nHeld-out builtin conversations: {len(conversations)} ({args.held_out_per_task} per task, test partition)")
    print(f"{'':<34}{'base':>10}{'mid':>10}{'sft':>10}")
    print(f"{'chat-format loss (nats/token)':<34}" + "".join(f"{chat_loss[n]:>10.4f}" for n in models)
          + f"   mid < base: {met(chat_loss['mid'] < chat_loss['base'])}")
    print(f"{'assistant-only loss (nats/token)':<34}" + "".join(f"{assistant_loss[n]:>10.4f}" for n in models)
          + f"   sft < mid: {met(assistant_loss['sft'] < assistant_loss['mid'])}")
    print(f"\nBuiltin chat tasks ({args.generate_problems} Arithmetic problems, greedy; 200 MultipleChoice)")
    print(f"{'':<34}{'base':>10}{'sft':>10}")
    for key, label in (("answer_format", "Arithmetic: '#### N' answer line"), ("calculator", "Arithmetic: calls calculator"),
                       ("accuracy", "Arithmetic: accuracy")):
        print(f"{label:<34}" + "".join(f"{100 * arithmetic[n][key]:>9.1f}%" for n in ("base", "sft")))
    print(f"{'MultipleChoice accuracy':<34}" + "".join(f"{100 * mc[n]:>9.1f}%" for n in ("base", "sft"))
          + "   (chance 25%)")
    print(f"  answers in format and calculator used more after SFT: "
          f"{met(arithmetic['sft']['answer_format'] > arithmetic['base']['answer_format'] and arithmetic['sft']['calculator'] > arithmetic['base']['calculator'])}")
    print(f"  an SFT completion: {arithmetic['sft']['sample']!r}")
    print("\nWall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total / 60:.1f} min")
    if not args.keep and args.workdir is None:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
