"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and SpellingBee, and compute
ChatCORE: the mean over these six tasks of accuracy centred on the task's chance level, (acc - chance) /
(1 - chance), so 0 is random guessing and 1 is perfect. As in nanochat, ChatCORE exists only when all six were
evaluated; over any other set of tasks the same mean is reported as the partial ChatCORE (`chatcore_partial`,
"ChatCORE (partial: k of 6 tasks)"), a different number. Multiple-choice tasks are scored from the logits of the answer
letters (batched, no sampling); generative tasks by sampling completions and checking them exactly (GSM8K
final answer, HumanEval tests in a sandbox, SpellingBee count); with --num_samples=k a problem passes if
any of its k samples does.

Run alone (tasks download from the Hugging Face hub unless given a local --<task>_path):
    python -m nanopipe.stages.chat_eval --source=sft --task=ARC-Easy,GSM8K --max_problems=200
    python -m nanopipe.stages.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 200      # nanochat's flags work too
    python -m nanopipe.stages.chat_eval --checkpoint_dir=<dir> --task=Arithmetic,MultipleChoice,SpellingBee
    python -m nanopipe.stages.chat_eval --source=sft --task=GSM8K --gsm8k_path=<dir or .jsonl> --num_samples=4 \\
        --temperature=1.0
Under torchrun (problems are split across ranks, the counts are summed):
    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.chat_eval -- --source=sft

The builtin tasks Arithmetic (GSM8K format) and MultipleChoice (MMLU format) are generated offline, for the
demo and CI. metrics.json goes to --out_dir (default NANOPIPE_HOME/chat_eval/<source>-<model tag>); it
holds, besides the scores, a few problems with the model's answers (`samples`) for a person to read.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from nanopipe.chat_format import assistant_parts, normalize_messages, render_for_completion
from nanopipe.chat_scoring import (chatcore, evaluate_categorical, evaluate_generative, letter_token_ids,
                                   sum_across_ranks)
from nanopipe.checkpoint import load_model, resolve_checkpoint_dir
from nanopipe.common import (compute_cleanup, compute_init, get_base_dir, print0, report_progress,
                             write_metrics)
from nanopipe.configs.base import ConfigError
from nanopipe.configs.flags import stage_main
from nanopipe.configs.chat_eval import (CHATCORE_TASKS, DATA_PATH_FIELDS, SHORT_FLAGS, SYNTHETIC_TASKS, ChatEvalConfig,
                                        chatcore_label)
from nanopipe.engine import Engine
from nanopipe.tasks import build_task
from nanopipe.tasks.gsm8k import in_answer_format, reference_answer
from nanopipe.tasks.spelling import is_remote_words, word_list_path

PROG = "python -m nanopipe.stages.chat_eval"
NUM_SAMPLES_SHOWN = 5   # multiple-choice problems with the model's answer kept in metrics.json, over the tasks
SAMPLES_SHOWN_EACH = 2  # generative tasks: this many right and this many wrong answers kept (rank 0's problems)
FORMAT_TASKS = ("Arithmetic", "GSM8K")                        # answers in GSM8K's format (calculator, '#### N')
FINAL_ANSWER_TASKS = ("Arithmetic", "GSM8K", "SpellingBee")   # scored on a '#### N' line

# -----------------------------------------------------------------------------
# The stage

def task_data_path(name: str, cfg: ChatEvalConfig) -> Path | None:
    """The local data of a task, checked to exist (None: the hub / builtin words)."""
    field = DATA_PATH_FIELDS.get(name)
    value = getattr(cfg, field) if field else None
    if value is None:
        return None
    if field == "spelling_words_path" and is_remote_words(value):
        return word_list_path(value)  # 'download' or a URL: fetched (or found in the cache) before the model loads
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"--{field}: {value} does not exist")
    return path


def load_eval_task(name: str, cfg: ChatEvalConfig):
    kwargs = {"size": cfg.synthetic_size} if name in SYNTHETIC_TASKS else {}
    if name == "HumanEval":
        kwargs["allow_weaker_sandbox"] = cfg.allow_unsandboxed_code
    if name == "GSM8K":
        kwargs["lenient"] = cfg.gsm8k_lenient
    task = build_task(name, split="test", data_path=task_data_path(name, cfg), **kwargs)
    if task.eval_type not in ("categorical", "generative"):
        raise ConfigError(f"--task: {name} has no evaluation (eval_type={task.eval_type!r})")
    return task


def default_out_dir(cfg: ChatEvalConfig, ckpt_dir: Path) -> Path:
    return get_base_dir() / "chat_eval" / f"{cfg.source}-{ckpt_dir.name}"


def run(cfg: ChatEvalConfig) -> dict:
    for name in cfg.task:  # a bad data path fails before anything heavy is loaded
        task_data_path(name, cfg)
    ckpt_dir = resolve_checkpoint_dir(cfg.source, cfg.model_tag, cfg.checkpoint_dir)
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_out_dir(cfg, ckpt_dir)
    rt = compute_init(cfg.device_type, cfg.dtype, cfg.seed)
    try:
        model, tokenizer, meta = load_model(cfg.source, rt.device, phase="eval", model_tag=cfg.model_tag,
                                            step=cfg.model_step, checkpoint_dir=ckpt_dir,
                                            tokenizer_dir=cfg.tokenizer_dir)
        autocast = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                    if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
        with autocast:
            results, samples = evaluate_tasks(cfg, model, tokenizer, rt)
            # multiple choice: the first problems, NUM_SAMPLES_SHOWN spread over all tasks; generative tasks keep
            # the right and wrong answers their evaluation recorded. Shown in the order the tasks were given.
            names = list(results)
            shown = {n: c for n, c in samples_per_task(names).items() if results[n]["eval_type"] == "categorical"}
            samples += show_samples(cfg, model, tokenizer, shown) if rt.rank == 0 and shown else []
            samples.sort(key=lambda sample: names.index(sample["task"]))
    finally:
        compute_cleanup()

    accuracies = {name: r["accuracy"] for name, r in results.items()}
    chance = {name: r["chance_accuracy"] for name, r in results.items()}
    metrics = {
        "checkpoint_dir": str(ckpt_dir),
        "step": meta.get("step"),
        "source": cfg.source,
        "world_size": rt.world_size,
        "tasks": results,
        "accuracy": accuracies,
        **chatcore_metrics(accuracies, chance),
        "samples": samples,
    }
    print0("-" * 60)
    for name, r in results.items():
        print0(f"{name:<16} accuracy {100 * r['accuracy']:6.2f}%  ({r['passed']}/{r['total']}, "
               f"chance {100 * r['chance_accuracy']:.0f}%, {r['problems_per_second']:.2f} problems/s)")
    print0(chatcore_line(metrics))
    write_metrics(out_dir, metrics)
    print0(f"wrote {out_dir / 'metrics.json'}")
    return metrics


def chatcore_metrics(accuracies: dict[str, float], chance: dict[str, float]) -> dict:
    """{"chatcore"} over nanochat's six tasks when all six were evaluated (other tasks left out), else
    {"chatcore": None, "chatcore_partial"} over the tasks evaluated; "chatcore_tasks" names the tasks of
    the number given and "chatcore_complete" says which of the two it is."""
    if all(name in accuracies for name in CHATCORE_TASKS):
        six = {name: accuracies[name] for name in CHATCORE_TASKS}
        return {"chatcore": chatcore(six, chance), "chatcore_tasks": list(six), "chatcore_complete": True}
    return {"chatcore": None, "chatcore_partial": chatcore(accuracies, chance), "chatcore_tasks": list(accuracies),
            "chatcore_complete": False}


def chatcore_line(metrics: dict) -> str:
    value = metrics["chatcore"] if metrics["chatcore_complete"] else metrics["chatcore_partial"]
    return f"{chatcore_label(metrics['chatcore_tasks'])} over {', '.join(metrics['chatcore_tasks'])}: {value:.4f}"


class GenerativeRecord:
    """What a generative evaluation keeps besides the score: how many first answers were in GSM8K's answer
    format (calculator call + '#### N'; tasks in FORMAT_TASKS), and a few answers to show, right and wrong."""

    def __init__(self, name: str, shown_each: int = SAMPLES_SHOWN_EACH):
        self.name, self.shown_each = name, shown_each
        self.in_format = 0
        self.shown: dict[bool, list[dict]] = {True: [], False: []}

    def __call__(self, index: int, conversation: dict, completions: list[str], solved: bool) -> None:
        self.in_format += int(in_answer_format(completions[0]))
        if len(self.shown[solved]) < self.shown_each:
            messages = normalize_messages(conversation)
            question = next(m for m in reversed(messages) if m["role"] == "user")["content"]
            reference = readable_answer(messages[-1]) if messages[-1]["role"] == "assistant" else ""
            self.shown[solved].append({"task": self.name, "index": index, "question": question,
                                       "reference": reference, "answer": completions[0], "correct": solved})

    def samples(self) -> list[dict]:
        return self.shown[True] + self.shown[False]


def majority_answer(task, num_problems: int) -> dict:
    """{"majority_answer", "majority_answer_rate"}: the most common reference answer among the problems and
    how often it is right, i.e. the score of a model that always gives it (tasks with a '#### N' answer)."""
    answers = Counter(reference_answer(task[i]) for i in range(num_problems))
    answer, count = answers.most_common(1)[0]
    return {"majority_answer": answer, "majority_answer_rate": count / num_problems} if answer is not None else {}


def evaluate_tasks(cfg: ChatEvalConfig, model, tokenizer, rt) -> tuple[dict[str, dict], list[dict]]:
    """({task: scores}, this rank's samples of the generative tasks)."""
    engine = Engine(model, tokenizer, extended_calculator=cfg.extended_calculator)
    results, samples = {}, []
    names = list(dict.fromkeys(cfg.task))
    for task_index, name in enumerate(names):
        task = load_eval_task(name, cfg)
        num_problems = len(task) if cfg.max_problems is None else min(len(task), cfg.max_problems)
        print0(f"[{task_index + 1}/{len(names)}] {name}: {num_problems} problems ({task.eval_type})")

        def on_progress(done_here: int, name=name, num_problems=num_problems) -> None:
            # rank 0's count times the world size approximates the overall progress
            report_progress(step=min(done_here * rt.world_size, num_problems), total=num_problems, task=name)

        start = time.perf_counter()
        if task.eval_type == "categorical":
            counts = evaluate_categorical(task, model, tokenizer, num_problems, cfg.batch_size, rt.rank,
                                          rt.world_size, on_progress)
            extra = {}
        else:
            record = GenerativeRecord(name)
            counts = evaluate_generative(task, engine, tokenizer, num_problems, cfg.num_samples, cfg.max_new_tokens,
                                         cfg.temperature, cfg.top_k, cfg.seed, rt.rank, rt.world_size, on_progress,
                                         batch_size=cfg.batch_size, on_problem=record)
            samples += record.samples()
            in_format, _ = sum_across_ranks((record.in_format, 0), rt.device, rt.world_size)
            extra = {"format_passed": in_format} if name in FORMAT_TASKS else {}
            if name in FINAL_ANSWER_TASKS:
                extra.update(majority_answer(task, num_problems))
        passed, total = sum_across_ranks(counts, rt.device, rt.world_size)
        seconds = time.perf_counter() - start
        assert total == num_problems, f"{name}: ranks evaluated {total} problems, expected {num_problems}"
        accuracy = passed / total if total else 0.0
        chance = float(task.chance_accuracy)
        results[name] = {
            "eval_type": task.eval_type, "passed": passed, "total": total, "accuracy": accuracy,
            "chance_accuracy": chance, "centered_accuracy": (accuracy - chance) / (1.0 - chance),
            "seconds": seconds, "problems_per_second": total / seconds if seconds > 0 else 0.0, **extra,
        }
        print0(f"{name}: {passed}/{total} = {100 * accuracy:.2f}%"
               + (f"; answer format (calculator + '#### N') {extra['format_passed']}/{total}"
                  if "format_passed" in extra else ""))
    return results, samples


# -----------------------------------------------------------------------------
# A few answers to read: the first problems of each task, answered as the evaluation answers them

def samples_per_task(names: list[str], count: int = NUM_SAMPLES_SHOWN) -> dict[str, int]:
    """`count` problems spread round-robin over the tasks, e.g. 5 over 3 tasks -> 2, 2, 1."""
    return {name: len(range(i, count, len(names))) for i, name in enumerate(names)}


def readable_answer(message: dict) -> str:
    """An assistant message as text, calculator calls written GSM8K's way: <<6*5=30>>."""
    marks = {"python": "<<{}=", "python_output": "{}>>"}
    return "".join(marks.get(p["type"], "{}").format(p["text"]) for p in assistant_parts(message))


@torch.no_grad()
def show_samples(cfg: ChatEvalConfig, model, tokenizer, counts: dict[str, int]) -> list[dict]:
    """[{task, question, reference, answer, correct}] of the first counts[task] problems of each task: for
    multiple choice the letter the logits pick, for generative tasks one completion sampled with the seed the
    evaluation uses for that problem."""
    engine, letter_cache, samples = Engine(model, tokenizer, extended_calculator=cfg.extended_calculator), {}, []
    for name, count in counts.items():
        task = load_eval_task(name, cfg)
        for i in range(min(count, len(task))):
            conversation = task[i]
            messages = normalize_messages(conversation)
            prompt = render_for_completion(tokenizer, conversation)
            if task.eval_type == "categorical":
                letters = conversation["letters"]
                logits = model(torch.tensor([prompt], dtype=torch.long, device=model.get_device()))
                answer = letters[int(logits[0, -1, letter_token_ids(tokenizer, letters, letter_cache)].argmax())]
            else:
                results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=cfg.max_new_tokens,
                                                   temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed + i)
                answer = tokenizer.decode(results[0][len(prompt):])
            question = next(m for m in reversed(messages) if m["role"] == "user")["content"]
            reference = readable_answer(messages[-1]) if messages[-1]["role"] == "assistant" else ""
            samples.append({"task": name, "question": question, "reference": reference, "answer": answer,
                            "correct": bool(task.evaluate(conversation, answer))})
    return samples


def main(argv: list[str] | None = None) -> dict:
    return stage_main(ChatEvalConfig, run, argv, prog=PROG, short_aliases=SHORT_FLAGS)


if __name__ == "__main__":
    main(sys.argv[1:])
