"""
The CORE metric (DCLM, https://arxiv.org/abs/2406.11794): in-context learning tasks scored by a base model.

An eval bundle is a directory in DCLM's layout:

    core.yaml               icl_tasks: a list of {label, dataset_uri, num_fewshot: [k], icl_task_type,
                            continuation_delimiter}
    eval_meta_data.csv      one row per task: "Eval Task" (the label) and "Random baseline" (in percent)
    eval_data/<dataset_uri> JSON lines, one example each, in the shape of its task type:
        multiple_choice     {"query", "choices": [...], "gold": i}     same context, different continuations
        schema              {"context_options": [...], "continuation", "gold": i}
                                                                      different contexts, same continuation
        language_modeling   {"context", "continuation"}                greedy decoding must reproduce it

Scoring. A prompt is k few-shot examples (each rendered with its gold answer, separated by blank lines)
followed by the example itself. Multiple choice and schema pick the option whose continuation tokens have
the lowest mean loss; language modeling counts a hit only if the argmax at every continuation position is
the continuation token. Accuracy is centred on the task's random baseline, (acc - b) / (1 - b), so 0 means
chance and 1 perfect; CORE is the mean centred accuracy over the tasks.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanopipe.common import get_base_dir, print0

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234      # few-shot examples of item i come from random.Random(FEWSHOT_SEED + i)
SUBSAMPLE_SEED = 1337    # the order examples are taken in when max_per_task limits them


class EvalBundleError(FileNotFoundError):
    """The eval bundle is missing or malformed. The message names the file."""


@dataclass(frozen=True)
class TaskSpec:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float   # in percent, as in eval_meta_data.csv


# -----------------------------------------------------------------------------
# The bundle on disk

def default_bundle_dir() -> Path:
    return get_base_dir() / "eval_bundle"


def find_eval_bundle(bundle_dir: str | os.PathLike | None = None) -> Path | None:
    """The bundle directory if it has a core.yaml, else None (callers skip CORE with a warning)."""
    path = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    return path if (path / "core.yaml").is_file() else None


def bundle_missing_message(bundle_dir: str | os.PathLike | None) -> str:
    path = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    return (f"WARNING: no CORE eval bundle at {path} (core.yaml, eval_meta_data.csv, eval_data/): skipping the "
            f"CORE metric. Put DCLM's eval bundle there or pass --eval_bundle_dir to enable it.")


def load_bundle(bundle_dir: str | os.PathLike) -> list[TaskSpec]:
    """The tasks of core.yaml with their random baselines from eval_meta_data.csv."""
    try:
        import yaml
    except ImportError as err:  # pyyaml comes with prefect; say so if an install lacks it
        raise EvalBundleError("reading core.yaml needs PyYAML (pip install pyyaml)") from err
    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise EvalBundleError(f"eval bundle {bundle_dir} has no {path.name}")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise EvalBundleError(f"{config_path} is not valid YAML: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise EvalBundleError(f"{config_path} has no 'icl_tasks' list")
    with open(meta_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise EvalBundleError(f"{meta_path} needs the columns 'Eval Task' and 'Random baseline', has {list(rows[0])}")
    baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in rows}
    tasks = []
    for i, entry in enumerate(config["icl_tasks"]):
        missing = [k for k in ("label", "dataset_uri", "icl_task_type", "num_fewshot") if k not in entry]
        if missing:
            raise EvalBundleError(f"{config_path}: icl_tasks[{i}] lacks {', '.join(missing)}")
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise EvalBundleError(f"{config_path}: task {label!r} has icl_task_type {task_type!r}; "
                                  f"supported: {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise EvalBundleError(f"{meta_path} has no row for task {label!r} (its random baseline)")
        shots = entry["num_fewshot"]
        tasks.append(TaskSpec(label=label, task_type=task_type, dataset_uri=entry["dataset_uri"],
                              num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    return tasks


def load_task_data(bundle_dir: str | os.PathLike, task: TaskSpec) -> list[dict]:
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    if not path.is_file():
        raise EvalBundleError(f"task {task.label!r}: data file {path} does not exist")
    data = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvalBundleError(f"{path}:{lineno} is not valid JSON: {err}") from err
    if not data:
        raise EvalBundleError(f"task {task.label!r}: {path} holds no examples")
    return data


# -----------------------------------------------------------------------------
# Prompts

def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The full prompt strings to score for one example.

    multiple_choice: one per choice; schema: one per context option; language_modeling: two, the prompt
    without and with the continuation (the first is a token prefix of the second).
    """
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        # contexts in some datasets carry stray whitespace at the ends; a trailing space would merge into the
        # next token and break the prefix property in token space, hence the strips
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unsupported task type {task_type!r}; supported: {', '.join(TASK_TYPES)}")


def common_length(sequences: list[list[int]], from_end: bool = False) -> int:
    """Length of the common prefix (or suffix) of token sequences."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        pos = -1 - i if from_end else i
        token = sequences[0][pos]
        if any(s[pos] != token for s in sequences[1:]):
            return i
    return shortest


def tokenize_example(task_type: str, prompts: list[str], tokenizer) -> tuple[list[list[int]], list[int], list[int]]:
    """Token rows and, per row, the [start, end) span of the tokens whose prediction is scored."""
    rows = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        start = common_length(rows)
        return rows, [start] * len(rows), [len(r) for r in rows]
    if task_type == "schema":
        suffix = common_length(rows, from_end=True)
        return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]
    without, with_cont = rows
    assert with_cont[:len(without)] == without and len(with_cont) > len(without), (
        f"language_modeling prompt without the continuation is not a token prefix of the one with it: "
        f"{prompts[0][-40:]!r} vs {prompts[1][-60:]!r}")
    return [with_cont], [len(without)], [len(with_cont)]


def crop_to_context(rows: list[list[int]], starts: list[int], ends: list[int], max_len: int | None):
    """Keep the last max_len tokens of each row (the scored span sits at the end), shifting the spans."""
    if max_len is None:
        return rows, starts, ends
    out_rows, out_starts, out_ends = [], [], []
    for row, start, end in zip(rows, starts, ends):
        cut = max(0, len(row) - max_len)
        # position start-1 predicts the first scored token, so at least one context token must remain
        assert start - cut >= 1, f"the scored continuation alone ({end - start} tokens) exceeds max_len={max_len}"
        out_rows.append(row[cut:])
        out_starts.append(start - cut)
        out_ends.append(end - cut)
    return out_rows, out_starts, out_ends


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_rows(model, rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token losses and argmax predictions, [N, L] each (L = longest row)."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    input_ids = input_ids.to(device)
    logits = model(input_ids).float()
    targets = torch.roll(input_ids, shifts=-1, dims=1)   # position t predicts token t+1
    losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction="none").view_as(targets)
    return losses, logits.argmax(dim=-1)


def pick_fewshot(data: list[dict], idx: int, k: int) -> list[dict]:
    if k == 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(others, min(k, len(others)))]


@torch.no_grad()
def evaluate_example(model, tokenizer, data: list[dict], idx: int, task: TaskSpec, device,
                     max_len: int | None = None) -> bool:
    item = data[idx]
    prompts = render_prompts(task.task_type, item, task.continuation_delimiter,
                             pick_fewshot(data, idx, task.num_fewshot))
    rows, starts, ends = tokenize_example(task.task_type, prompts, tokenizer)
    rows, starts, ends = crop_to_context(rows, starts, ends, max_len)
    losses, predictions = score_rows(model, rows, tokenizer.get_bos_token_id(), device)
    if task.task_type == "language_modeling":
        start, end = starts[0], ends[0]
        wanted = torch.tensor(rows[0][start:end], device=predictions.device)
        return bool(torch.equal(predictions[0, start - 1:end - 1], wanted))
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, tokenizer, data: list[dict], task: TaskSpec, device, max_len: int | None = None) -> float:
    """Accuracy on `data`; under torchrun the examples are split across ranks and the hits summed."""
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    hits = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        hits[idx] = float(evaluate_example(model, tokenizer, data, idx, task, device, max_len))
    if world > 1:
        dist.all_reduce(hits, op=dist.ReduceOp.SUM)
    return hits.mean().item()


def centered(accuracy: float, random_baseline_percent: float) -> float:
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, device, bundle_dir: str | os.PathLike, max_per_task: int | None = None,
                  autocast_ctx=None) -> dict:
    """{"results": accuracy per task, "centered_results": centred accuracy per task, "core_metric": mean}.

    max_per_task limits every task to a fixed random subset (same subset every call).
    """
    bundle_dir = Path(bundle_dir)
    tasks = load_bundle(bundle_dir)
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    results, centered_results = {}, {}
    for task in tasks:
        t0 = time.time()
        data = load_task_data(bundle_dir, task)
        random.Random(SUBSAMPLE_SEED).shuffle(data)
        if max_per_task is not None:
            data = data[:max_per_task]
        with autocast_ctx:
            accuracy = evaluate_task(model, tokenizer, data, task, device, max_len)
        results[task.label] = accuracy
        centered_results[task.label] = centered(accuracy, task.random_baseline)
        print0(f"CORE {task.label:<32} ({task.num_fewshot}-shot {task.task_type}, {len(data)} examples): "
               f"accuracy {accuracy:.4f} | centred {centered_results[task.label]:+.4f} | {time.time() - t0:.1f}s")
    core = sum(centered_results.values()) / len(centered_results) if centered_results else float("nan")
    return {"results": results, "centered_results": centered_results, "core_metric": core}
