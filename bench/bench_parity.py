"""
Parity with nanochat, item by item: ours and the reference's code on identical inputs, side by side.

    NANOCHAT_DIR=/path/to/nanochat-061f83c python bench/bench_parity.py
    NANOCHAT_DIR=/path/to/nanochat-061f83c NANOCHAT_MID_DIR=/path/to/nanochat-348fbb3 python bench/bench_parity.py

NANOCHAT_DIR is an extracted reference tree (`git archive <commit> | tar -x`); its modules (nanochat.*, tasks.*)
are imported in this process, its scripts' data recipes, data generators and schedules are read from the
scripts' source and run as they are. NANOCHAT_MID_DIR (or --mid_dir; default NANOCHAT_DIR) gives the tree whose
scripts/mid_train.py the mid-training items use (348fbb3 was the last commit with one that packs best-fit).

Inputs are the same for both sides: one tokenizer (trained here; the reference wraps its tiktoken encoding),
GSM8K and HumanEval rows and the 370K-word list from the shared data folder beside the repo, and small
generated stand-ins in the hubs' schemas for what is not available offline (SmolTalk, MMLU, ARC, identity
conversations), written to local files for ours and served to the reference's `load_dataset` calls.

Items: token ids and masks of 100 rendered conversations per task (GSM8K and SpellingBee have tool calls), the
first 1,000 rows of the mid and SFT mixtures, evaluation prompts, the scores of fixed completions, calculator
outputs on 60 expressions, the learning-rate multiplier at every step, the first 5 batches of mid and SFT.
Prints one table (item | identical? | first difference) and `undocumented differences: N`: rows that differ
and whose item is not listed in the README's "Differences from nanochat" section. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import random
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
README_SECTION = "Differences from nanochat"


# -----------------------------------------------------------------------------
# Comparison, README parsing, the table (pure: tests/test_parity_bench.py)

def short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def first_difference(ours: Sequence, ref: Sequence) -> str | None:
    """None when both sequences are equal, else where they first differ, in one line."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                inner = first_difference(a, b)
                return f"[{i}]{inner}" if inner and inner.startswith("[") else f"[{i}]: {inner}"
            return f"[{i}] ours {short(a)} | ref {short(b)}"
    if len(ours) != len(ref):
        return f"length: ours {len(ours)} | ref {len(ref)} (equal up to {min(len(ours), len(ref))})"
    return None


def documented_items(readme: str, section: str = README_SECTION) -> list[str]:
    """The item names (glob patterns allowed) of the README section's bullets: the first `code` span of each
    line starting with '- '."""
    items, inside = [], False
    for line in readme.splitlines():
        if line.startswith("#"):
            inside = line.lstrip("#").strip().lower() == section.lower()
            continue
        match = re.match(r"\s*[-*] +`([^`]+)`", line) if inside else None
        if match:
            items.append(match.group(1).strip())
    return items


def is_documented(item: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(item, pattern) for pattern in patterns)


def undocumented(rows: Sequence[tuple[str, str | None]], patterns: Sequence[str]) -> list[str]:
    """Items that differ (a difference is not None) and are not documented."""
    return [item for item, diff in rows if diff is not None and not is_documented(item, patterns)]


def format_table(rows: Sequence[tuple[str, str | None]], patterns: Sequence[str]) -> str:
    width = max([len("item")] + [len(item) for item, _ in rows])
    lines = [f"{'item':<{width}} | identical? | first difference", f"{'-' * width}-|------------|-----------------"]
    for item, diff in rows:
        verdict = "identical" if diff is None else ("documented" if is_documented(item, patterns) else "DIFFERS")
        lines.append(f"{item:<{width}} | {verdict:<10} | {diff or ''}")
    lines.append(f"undocumented differences: {len(undocumented(rows, patterns))}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The reference, imported from its tree

def import_reference(nanochat_dir: Path) -> types.SimpleNamespace:
    """The reference's modules this bench uses. Its tokenizer module also imports HuggingFace `tokenizers` for
    a class not used here: a placeholder module stands in when that package is not installed."""
    sys.path.insert(0, str(nanochat_dir))
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tokenizers")
        for name in ("Tokenizer", "Regex", "pre_tokenizers", "decoders", "BPE", "BpeTrainer"):
            setattr(stub, name, None)
        sys.modules.update({"tokenizers": stub, "tokenizers.models": stub, "tokenizers.trainers": stub})
    import importlib
    names = ["nanochat.tokenizer", "nanochat.engine", "tasks.common", "tasks.gsm8k", "tasks.mmlu", "tasks.arc",
             "tasks.smoltalk", "tasks.customjson", "tasks.spellingbee", "tasks.humaneval"]
    return types.SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(n) for n in names})


def run_script_parts(path: Path, names: set[str], namespace: dict) -> dict:
    """Run the `tasks.*` imports and the top-level assignments and functions named in `names` of a reference
    script, in order, in `namespace` (what the script would have defined, without its training run)."""
    tree = ast.parse(path.read_text(), str(path))
    keep = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks"):
            keep.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and {t.id for t in node.targets if isinstance(t, ast.Name)} & names:
            keep.append(node)
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


# -----------------------------------------------------------------------------
# Identical inputs: real rows where the shared data has them, generated stand-ins in the hubs' schemas otherwise

def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n)).capitalize()


def standin_rows(words: list[str], seed: int = 0) -> dict[str, list[dict]]:
    """{name: rows}: SmolTalk, MMLU, ARC and identity rows in the schemas of their hub datasets."""
    rng, rows = random.Random(seed), {}
    # sizes above the slices the recipes take (SFT: SmolTalk's first 10,000; mid's validation: MMLU's 5,200)
    for split, n in (("train", 10_500), ("test", 600)):
        convs = []
        for _ in range(n):
            messages = [{"role": "system", "content": _sentence(rng, words, 6)}] if rng.random() < 0.2 else []
            for _ in range(rng.choice((1, 1, 2))):
                messages += [{"role": "user", "content": _sentence(rng, words, rng.randint(3, 12)) + "?"},
                             {"role": "assistant", "content": _sentence(rng, words, rng.randint(5, 30)) + "."}]
            convs.append({"messages": messages})
        rows[f"smoltalk/{split}"] = convs
    for split, n in (("auxiliary_train", 3000), ("test", 5300)):
        rows[f"mmlu/{split}"] = [{"question": _sentence(rng, words, 8) + "?", "subject": rng.choice(("anatomy", "virology")),
                                  "choices": [_sentence(rng, words, 3) for _ in range(4)], "answer": rng.randrange(4)}
                                 for _ in range(n)]
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split, n in (("train", 300), ("test", 200)):
            out = []
            for i in range(n):
                k = rng.choice((3, 4, 4, 4, 5))
                labels = list("ABCDE"[:k]) if rng.random() < 0.9 else [str(j + 1) for j in range(k)]
                out.append({"id": f"{subset}-{split}-{i}", "question": _sentence(rng, words, 9) + "?",
                            "choices": {"text": [_sentence(rng, words, 2) for _ in range(k)], "label": labels},
                            "answerKey": rng.choice(labels)})
            rows[f"{subset}/{split}"] = out
    rows["identity"] = [[{"role": "user", "content": _sentence(rng, words, 5) + "?"},
                         {"role": "assistant", "content": _sentence(rng, words, 20) + "."}] for _ in range(120)]
    return rows


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class Inputs:
    """The shared inputs: local files for ours, `load_dataset` answers for the reference."""

    def __init__(self, root: Path, shared: Path):
        self.root = root
        self.words = shared / "words" / "words_alpha.txt"
        self.gsm8k, self.humaneval = shared / "gsm8k", shared / "humaneval" / "HumanEval.jsonl"
        vocabulary = [w.strip() for w in self.words.read_text().splitlines()[::97] if 3 <= len(w.strip()) <= 9]
        rows = standin_rows(vocabulary)
        self.identity = write_jsonl(root / "identity_conversations.jsonl", rows.pop("identity"))
        for name, split_rows in rows.items():  # <name>/<split>.jsonl: a local layout our loaders read
            write_jsonl(root / f"{name}.jsonl", split_rows)
        self.hub = {("HuggingFaceTB/smol-smoltalk", None, s): rows[f"smoltalk/{s}"] for s in ("train", "test")}
        self.hub[("cais/mmlu", "all", "test")] = rows["mmlu/test"]
        self.hub[("cais/mmlu", "auxiliary_train", "train")] = [{"train": r} for r in rows["mmlu/auxiliary_train"]]
        for subset in ("ARC-Easy", "ARC-Challenge"):
            self.hub.update({("allenai/ai2_arc", subset, s): rows[f"{subset}/{s}"] for s in ("train", "test")})
        for s in ("train", "test"):
            self.hub[("openai/gsm8k", "main", s)] = read_jsonl(self.gsm8k / f"{s}.jsonl")
        self.hub[("openai/openai_humaneval", None, "test")] = read_jsonl(self.humaneval)

    def load_dataset(self, path: str, name: str | None = None, split: str | None = None, **_: Any):
        import datasets
        return datasets.Dataset.from_list(self.hub[(path, name, split)])

    def our_paths(self) -> dict[str, str]:
        return {"smoltalk_path": str(self.root / "smoltalk"), "mmlu_path": str(self.root / "mmlu"),
                "gsm8k_path": str(self.gsm8k), "arc_easy_path": str(self.root / "ARC-Easy"),
                "arc_challenge_path": str(self.root / "ARC-Challenge")}


# -----------------------------------------------------------------------------
# The two sides

class Sides:
    """Ours and the reference's objects for every item, built once."""

    def __init__(self, ref: types.SimpleNamespace, inputs: Inputs, mid_dir: Path, sft_dir: Path):
        from nanopipe.tokenizer import Tokenizer
        self.ref, self.inputs = ref, inputs
        for module in (ref.gsm8k, ref.mmlu, ref.arc, ref.smoltalk, ref.humaneval):
            module.load_dataset = inputs.load_dataset
        ref.spellingbee.download_file_with_lock = lambda url, filename: str(inputs.words)
        texts = [r["question"] + "\n" + r["answer"] for r in inputs.hub[("openai/gsm8k", "main", "train")][:3000]]
        texts += [json.dumps(r) for r in inputs.hub[("HuggingFaceTB/smol-smoltalk", None, "train")][:500]]
        self.tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=4096)
        self.ref_tokenizer = ref.tokenizer.RustBPETokenizer(self.tokenizer.enc, "<|bos|>")
        self.mid_dir, self.sft_dir = mid_dir, sft_dir

    def script(self, path: Path, names: set[str], **values: Any) -> dict:
        import collections
        import torch
        namespace = {"os": os, "torch": torch, "deque": collections.deque, "tokenizer": self.ref_tokenizer,
                     "get_base_dir": lambda: str(self.inputs.root), "ddp_rank": 0, "ddp_world_size": 1,
                     "device": "cpu", "device_type": "cpu", "last_step": False, "approx_progress": 0.0,
                     "current_epoch": 1, **values}
        return run_script_parts(path, names, namespace)

    # --- tasks -------------------------------------------------------------

    def train_tasks(self) -> dict[str, tuple[Any, Any]]:
        from nanopipe.tasks import ARC, GSM8K, MMLU, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee
        r, paths, words = self.ref, self.inputs.our_paths(), str(self.inputs.words)
        return {
            "GSM8K": (GSM8K("main", "train", paths["gsm8k_path"]), r.gsm8k.GSM8K("main", "train")),
            "MMLU": (MMLU("all", "auxiliary_train", paths["mmlu_path"]), r.mmlu.MMLU("auxiliary_train", "train")),
            "ARC-Easy": (ARC("ARC-Easy", "train", paths["arc_easy_path"]), r.arc.ARC("ARC-Easy", "train")),
            "ARC-Challenge": (ARC("ARC-Challenge", "train", paths["arc_challenge_path"]),
                              r.arc.ARC("ARC-Challenge", "train")),
            "SmolTalk": (SmolTalk("train", paths["smoltalk_path"]), r.smoltalk.SmolTalk("train")),
            "identity": (CustomJSON(self.inputs.identity), r.customjson.CustomJSON(str(self.inputs.identity))),
            "SimpleSpelling": (SimpleSpelling(1000, "train", words=words), r.spellingbee.SimpleSpelling(1000, "train")),
            "SpellingBee": (SpellingBee(1000, "train", words=words), r.spellingbee.SpellingBee(1000, "train")),
        }

    def eval_tasks(self) -> dict[str, tuple[Any, Any]]:
        """chat_eval's tasks: ours as our stage loads them, the reference's as its scripts/chat_eval.py does."""
        from nanopipe.configs.chat_eval import ChatEvalConfig
        from nanopipe.stages.chat_eval import load_eval_task
        paths = self.inputs.our_paths()
        cfg = ChatEvalConfig(mmlu_path=str(self.inputs.root / "mmlu"), gsm8k_path=paths["gsm8k_path"],
                             arc_easy_path=paths["arc_easy_path"], arc_challenge_path=paths["arc_challenge_path"],
                             humaneval_path=str(self.inputs.humaneval), spelling_words_path=str(self.inputs.words))
        r = self.ref
        theirs = {"MMLU": lambda: r.mmlu.MMLU(subset="all", split="test"),
                  "ARC-Easy": lambda: r.arc.ARC(subset="ARC-Easy", split="test"),
                  "ARC-Challenge": lambda: r.arc.ARC(subset="ARC-Challenge", split="test"),
                  "GSM8K": lambda: r.gsm8k.GSM8K(subset="main", split="test"),
                  "HumanEval": lambda: r.humaneval.HumanEval(),
                  "SpellingBee": lambda: r.spellingbee.SpellingBee(size=256, split="test")}
        return {name: (load_eval_task(name, cfg), make()) for name, make in theirs.items()}

    # --- mixtures ----------------------------------------------------------

    def mixtures(self) -> dict[str, tuple[Any, Any]]:
        from nanopipe.configs.chat_sft import ChatSFTConfig
        from nanopipe.configs.mid_train import MidTrainConfig
        from nanopipe.tasks.mixtures import mid_mixtures, sft_mixtures
        data = {**self.inputs.our_paths(), "identity_path": str(self.inputs.identity),
                "spelling_words": str(self.inputs.words), "mixture": "seed"}
        ours_mid, ours_sft = mid_mixtures(MidTrainConfig(**data)), sft_mixtures(ChatSFTConfig(**data))
        mid = self.script(self.mid_dir / "scripts" / "mid_train.py",
                          {"base_dir", "identity_conversations_filepath", "train_dataset", "val_dataset"})
        sft = self.script(self.sft_dir / "scripts" / "chat_sft.py", {"identity_conversations_filepath", "train_ds"})
        return {"mid-train": (ours_mid.train, mid["train_dataset"]), "mid-val": (ours_mid.val, mid["val_dataset"]),
                "sft-train": (ours_sft.train, sft["train_ds"])}


def row_text(conversation: dict) -> str:
    return json.dumps(conversation, sort_keys=True, default=str)


def mixture_sources(ours: Any, theirs: Any, n: int) -> tuple[list, list]:
    """(component, index in it) of the first n rows of each side's mixture, components in recipe order."""
    import bisect
    a = []
    for k in (ours._order[i] for i in range(min(n, len(ours)))):  # ours: a shuffled position in the sequence
        component = bisect.bisect_right(ours._offsets, k) - 1
        a.append((component, k - ours._offsets[component]))
    return a, [tuple(theirs.index_map[i]) for i in range(min(n, len(theirs)))]


def mixture_rows(sides: Sides, ours: Any, theirs: Any, n: int) -> tuple[list, list]:
    """The first n rows' content, leaving out the rows the reference draws from a spelling task (our spelling
    tasks word their conversations our own way: render:SimpleSpelling and render:SpellingBee compare those)."""
    spelling = (sides.ref.spellingbee.SimpleSpelling, sides.ref.spellingbee.SpellingBee)
    keep = [i for i in range(min(n, len(theirs), len(ours)))
            if not isinstance(theirs.tasks[theirs.index_map[i][0]], spelling)]
    return [row_text(ours[i]) for i in keep], [row_text(theirs[i]) for i in keep]


def render_rows(sides: Sides, ours: Any, theirs: Any, n: int = 100) -> tuple[list, list]:
    from nanopipe.chat_format import render_conversation
    a = [list(render_conversation(sides.tokenizer, ours[i])) for i in range(min(n, len(ours)))]
    b = [list(sides.ref_tokenizer.render_conversation(theirs[i])) for i in range(min(n, len(theirs)))]
    return a, b


# -----------------------------------------------------------------------------
# Items: name -> (ours, reference's)

CALCULATOR_EXPRESSIONS = [
    "1+1", "2*3", "10/2", "7/2", "10/3", "1/3", "2/3*3", "0.1+0.2", "3.0*2", "12/60", "0.2*50", "100-37",
    "5-8", "-5+2", "(1+2)*3", "((4))", "2 * (3 + 4)", "1,000+1", "1,234*2", "18/3", "50/100", "48/2", "9*9*9",
    "1e3", "2**10", "2^3", "10%3", "5//2", "10/0", "", "  ", "3+", "(2", "1.5*4", "0.5+0.5", "100*1.1",
    "123456789*987654321", "2.50*4", "1/8", "3.75+1.25", "007+1", "1_000+1", "abs(-3)", "round(2.5)",
    "'strawberry'.count('r')", '"hello".count("l")', "'banana'.count('an')", "'abc'.count('z')",
    "'Mississippi'.count('s')", "'abc'.upper()", "__import__('os')", "'a'.count('a')+1", "len('abc')",
    "'x' * 3", "print(1)", "open('f')", "'aaa'.count('a') * 2", "$5+3", "5 + 3 = 8", "24/1",
]


def score_completions(conversation: dict, answer_text: str) -> list[str]:
    """Fixed completions around the reference answer: exact, spacing, decimals, commas, wrong, absent."""
    match = re.search(r"#### (-?[0-9.,]+)", answer_text)
    n = (match.group(1) if match else "0").replace(",", "")
    other = str(int(float(n)) + 1) if n.replace("-", "").replace(".", "").isdigit() else "1"
    return [f"#### {n}", f"####{n}", f"#### {n}.00", f"#### {n}.", f"The answer is {n}", f"#### {other}",
            f"#### -{n}", f"#### {n}\n#### {other}", f"Sure.\n\n#### {n} apples", f"#### ${n}",
            f"#### {int(float(n)):,}" if n.replace("-", "").isdigit() else f"#### {n}"]


def last_text(conversation: dict) -> str:
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def scores(task: Any, n: int = 100) -> list[list[int]]:
    out = []
    for i in range(min(n, len(task))):
        conv = task[i]
        completions = conv["letters"] if "letters" in conv else score_completions(conv, last_text(conv))
        out.append([int(task.evaluate(conv, c)) for c in completions])
    return out


def lr_items(sides: Sides, steps: int = 40) -> dict[str, tuple[list, list]]:
    """Learning-rate multiplier at every step a run of `steps` steps (one micro-step each) trains."""
    from nanopipe.stages import chat_sft, mid_train
    items = {}
    # mid: ours holds the progress at the start of each step (step / num_iterations) for num_iterations steps;
    # the reference's loop reads the progress its data generator reports after each step's batches (the first
    # one prefetched) and stops when the generator says so
    mid = sides.script(sides.mid_dir / "scripts" / "mid_train.py",
                       {"base_dir", "identity_conversations_filepath", "train_dataset", "val_dataset",
                        "get_lr_multiplier", "mid_data_generator", "mid_data_generator_bos_bestfit"},
                       args=types.SimpleNamespace(device_batch_size=1, max_seq_len=64, num_iterations=steps))
    generator = mid.get("mid_data_generator_bos_bestfit") or mid["mid_data_generator"]
    loader, progress, theirs = generator("train"), 0.0, []
    next(loader)
    while not mid["last_step"]:
        next(loader)
        progress = max(progress, mid["approx_progress"])
        theirs.append(mid["get_lr_multiplier"](progress))
    items["lr:mid"] = ([mid_train.lr_multiplier(s / steps) for s in range(steps)], theirs)
    # SFT: both loops run num_iterations iterations and the last only evaluates (chat_sft.optimizer_steps)
    sft = sides.script(sides.sft_dir / "scripts" / "chat_sft.py", {"get_lr_multiplier"}, num_iterations=steps)
    items["lr:sft"] = ([chat_sft.lr_multiplier(s, steps) for s in range(chat_sft.optimizer_steps(steps))],
                       [sft["get_lr_multiplier"](s) for s in range(steps - 1)])
    # RL: both decay linearly over num_steps steps (ours inline in ChatRLTrainer.train_step)
    rl = sides.script(sides.sft_dir / "scripts" / "chat_rl.py", {"get_lr_multiplier"}, num_steps=steps)
    items["lr:rl"] = ([1.0 - s / steps for s in range(steps)], [rl["get_lr_multiplier"](s) for s in range(steps)])
    return items


def batch_items(sides: Sides, steps: int = 5, T: int = 2048) -> dict[str, tuple[list, list]]:
    """The first `steps` batches (inputs and targets) of mid (4 packed rows of T tokens; 2048: both stages'
    default) and SFT (4 conversations), both sides' loaders reading the same dataset, the reference's mixture
    (the mixture items compare those)."""
    from nanopipe.chat_batches import PackedChatLoader, PaddedChatBatcher
    B = 4
    mid = sides.script(sides.mid_dir / "scripts" / "mid_train.py",
                       {"base_dir", "identity_conversations_filepath", "train_dataset", "val_dataset",
                        "mid_data_generator", "mid_data_generator_bos_bestfit"},
                       args=types.SimpleNamespace(device_batch_size=B, max_seq_len=T, num_iterations=-1))
    generator = (mid.get("mid_data_generator_bos_bestfit") or mid["mid_data_generator"])("train")
    sft = sides.script(sides.sft_dir / "scripts" / "chat_sft.py",
                       {"identity_conversations_filepath", "train_ds", "sft_data_generator"})
    sft_generator = sft["sft_data_generator"](sft["train_ds"], batch_size=B)
    ours_mid = PackedChatLoader(sides.tokenizer, mid["train_dataset"], batch_size=B, seq_len=T)
    ours_sft = PaddedChatBatcher(sides.tokenizer, sft["train_ds"], batch_size=B, max_tokens=2048)

    def take(batches) -> list:
        return [[x.tolist(), y.tolist()] for x, y in (next(batches) for _ in range(steps))]
    return {f"batches:mid@{T}": (take(ours_mid), take(generator)), "batches:sft": (take(ours_sft), take(sft_generator))}


def all_items(sides: Sides) -> list[tuple[str, Callable[[], tuple[Sequence, Sequence]]]]:
    """(name, thunk) per item; a thunk returns (ours, reference's) sequences."""
    from nanopipe.chat_format import render_for_completion
    from nanopipe.engine import use_calculator
    items: list[tuple[str, Callable]] = []
    train = sides.train_tasks()
    for name, (ours, theirs) in train.items():
        items.append((f"render:{name}", lambda o=ours, t=theirs: render_rows(sides, o, t)))
    # the renderers alone, on the very same conversations (the reference's rows of every task)
    same = lambda: [t[i] for _, t in train.values() for i in range(20)]  # noqa: E731
    items.append(("renderer", lambda: render_rows(sides, same(), same())))
    mixtures = sides.mixtures()
    for name, (ours, theirs) in mixtures.items():
        items.append((f"mixture:{name}:order", lambda o=ours, t=theirs: mixture_sources(o, t, 1000)))
        items.append((f"mixture:{name}:rows", lambda o=ours, t=theirs: mixture_rows(sides, o, t, 1000)))
    evals = sides.eval_tasks()
    for name, (ours, theirs) in evals.items():
        items.append((f"prompt:{name}", lambda o=ours, t=theirs: (
            [render_for_completion(sides.tokenizer, o[i]) for i in range(min(100, len(o)))],
            [sides.ref_tokenizer.render_for_completion(t[i]) for i in range(min(100, len(t)))])))
    for name, (ours, theirs) in evals.items():
        if name != "HumanEval":  # its verdicts run programs; the bench compares prompts only
            items.append((f"score:{name}", lambda o=ours, t=theirs: (scores(o), scores(t))))
    items.append(("calculator", lambda: ([use_calculator(e) for e in CALCULATOR_EXPRESSIONS],
                                         [_ref_calc(sides, e) for e in CALCULATOR_EXPRESSIONS])))
    lrs = {}
    for name in ("lr:mid", "lr:sft", "lr:rl"):
        items.append((name, lambda n=name: (lrs or lrs.update(lr_items(sides)) or lrs)[n]))
    batches = {}
    for name in ("batches:mid@2048", "batches:sft"):
        items.append((name, lambda n=name: (batches or batches.update(batch_items(sides)) or batches)[n]))
    # rows shorter than some conversations: what each loader does with one longer than a whole row
    items.append(("batches:mid@256", lambda: batch_items(sides, T=256)["batches:mid@256"]))
    return items


def _ref_calc(sides: Sides, expr: str) -> str | None:
    """What the reference's engine writes after <|output_start|>: str() of use_calculator's value, or nothing."""
    value = sides.ref.engine.use_calculator(expr)
    return None if value is None else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanochat_dir", default=os.environ.get("NANOCHAT_DIR"),
                        help="extracted reference tree (default: $NANOCHAT_DIR)")
    parser.add_argument("--mid_dir", default=os.environ.get("NANOCHAT_MID_DIR"),
                        help="tree whose scripts/mid_train.py the mid items use (default: $NANOCHAT_MID_DIR, else "
                             "--nanochat_dir)")
    parser.add_argument("--shared_data", default=str(SHARED_DATA), help="folder with gsm8k/, humaneval/, words/")
    args = parser.parse_args(argv)
    if not args.nanochat_dir or not (Path(args.nanochat_dir) / "tasks" / "common.py").is_file():
        parser.error("set NANOCHAT_DIR (or --nanochat_dir) to an extracted nanochat tree, e.g. "
                     "`git archive 061f83c | tar -x -C DIR`")
    nanochat_dir = Path(args.nanochat_dir).resolve()
    mid_dir = Path(args.mid_dir).resolve() if args.mid_dir else nanochat_dir
    sys.path.insert(0, str(REPO))
    patterns = documented_items((REPO / "README.md").read_text(encoding="utf-8"))
    import logging
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("rustbpe").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-parity-") as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "hf"))
        ref = import_reference(nanochat_dir)
        sides = Sides(ref, Inputs(Path(tmp), Path(args.shared_data)), mid_dir, nanochat_dir)
        print(f"reference: {nanochat_dir} (mid_train: {mid_dir}); tokenizer: {sides.tokenizer.get_vocab_size()} "
              f"tokens, trained here; documented differences in README.md: {len(patterns)}\n")
        rows = []
        for name, thunk in all_items(sides):
            try:
                ours, theirs = thunk()
                rows.append((name, first_difference(ours, theirs)))
            except Exception as err:  # one item failing (either side) is a row, not the end of the bench
                rows.append((name, f"error: {type(err).__name__}: {short(str(err), 100)}"))
    print(format_table(rows, patterns))


if __name__ == "__main__":
    main()
