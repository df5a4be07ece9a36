"""
The training and validation mixtures of the chat stages, as recipes over nanopipe.tasks.

    mixtures = mid_mixtures(cfg)        # cfg: a MidTrainConfig (or anything with the ChatDataFlags fields)
    mixtures.train, mixtures.val        # TaskMixture: deterministic shuffles of whole conversations
    mixtures.describe()                 # {"train": {"SmolTalk": 460341, ...}, "identity": "...", ...}

--mixture=seed is nanochat's recipe on the real datasets (hub by default, local copies with --<task>_path);
--mixture=builtin is the offline demo/CI recipe: the generated chats of nanopipe.tasks.builtin, plus GSM8K
when --gsm8k_path is given. Every dataset is opened here, before any training: one that cannot be loaded
raises DatasetUnavailableError (exit code 2) naming it and the flag that gives a local copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nanopipe.exit_codes import ExitCode
from nanopipe.tasks.arc import ARC
from nanopipe.tasks.base import Task, TaskDataError, TaskMixture, TaskSequence
from nanopipe.tasks.builtin import ArithmeticProblems, IdentityChat, MultipleChoiceQuiz
from nanopipe.tasks.customjson import CustomJSON
from nanopipe.tasks.gsm8k import GSM8K
from nanopipe.tasks.mmlu import MMLU
from nanopipe.tasks.smoltalk import SmolTalk
from nanopipe.tasks.spelling import SimpleSpelling, SpellingBee, load_words

BUILTIN_IDENTITY = "builtin offline identity set (nanopipe.tasks.builtin.IdentityChat)"
SFT_DATA_SEED_OFFSET = 1000  # builtin SFT examples are drawn with another seed than mid-training's
MC_FIRST_SEED_OFFSET = 3000  # and SFT's opening multiple-choice conversations (--mc_first) with a third


class DatasetUnavailableError(TaskDataError):
    """A dataset of a mixture cannot be loaded; the message names it and the flag for a local copy. Exit code
    2 (bad input), like a bad flag: a retry reads the same missing file or the same offline hub again."""

    exit_code = ExitCode.BAD_INPUT


@dataclass
class ChatMixtures:
    """What a chat stage trains and validates on, and how each part was sourced."""

    train: TaskMixture
    val: TaskMixture
    parts: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> {name: examples}
    identity: str = BUILTIN_IDENTITY
    eval_tasks: dict[str, Task] = field(default_factory=dict)       # multiple-choice metrics (SFT)

    def describe(self) -> dict[str, Any]:
        return {"parts": self.parts, "train_examples": len(self.train), "val_examples": len(self.val),
                "identity": self.identity, "eval_tasks": {k: len(v) for k, v in self.eval_tasks.items()}}


def _open(name: str, flag: str | None, build: Callable[[], Task]) -> Task:
    """Build one dataset, turning a load failure into an error that names the dataset and its flag."""
    try:
        return build()
    except TaskDataError as err:
        hint = f"; give a local copy with {flag}=PATH" if flag else ""
        reason = " ".join(str(err).split())  # one line, whatever the loader said
        raise DatasetUnavailableError(f"dataset {name} is not available: {reason}{hint}") from err


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _identity(cfg) -> tuple[Task, str]:
    if cfg.identity_path:
        task = _open("identity conversations", "--identity_path",
                     lambda: CustomJSON(cfg.identity_path))
        return task, f"{Path(cfg.identity_path).expanduser()} ({len(task)} conversations)"
    return IdentityChat(1000, "train", cfg.seed), BUILTIN_IDENTITY


def _words(cfg) -> list[str]:
    source = cfg.spelling_words
    return _open(f"spelling word list ({source})", "--spelling_words",
                 lambda: _load_words_or_data_error(source))


def _load_words_or_data_error(source: str) -> list[str]:
    try:
        return load_words(source)
    except OSError as err:  # a failed download of the public list
        raise TaskDataError(f"cannot read the word list {source!r}: {err}") from err


def _gsm8k(cfg, split: str, **slicing) -> Task:
    return _open(f"GSM8K ({split})", "--gsm8k_path", lambda: GSM8K("main", split, _path(cfg.gsm8k_path), **slicing))


def _mixture(parts: list[tuple[str, Task]], seed: int) -> tuple[TaskMixture, dict[str, int]]:
    counts: dict[str, int] = {}
    for name, task in parts:
        counts[name] = counts.get(name, 0) + len(task)
    return TaskMixture([task for _, task in parts], seed=seed), counts


# -----------------------------------------------------------------------------
# Mid-training

def mid_mixtures(cfg) -> ChatMixtures:
    """nanochat's mid-training mixture (seed) or the offline one (builtin)."""
    identity, identity_label = _identity(cfg)
    if cfg.mixture == "builtin":
        train_parts = _builtin_parts(cfg, "train", cfg.builtin_size, cfg.seed,
                                     identity if cfg.identity_path else None)
        if cfg.identity_path:  # as in the seed mixture, the given identity conversations count twice
            train_parts.insert(0, ("identity", identity))
        val_parts = _builtin_parts(cfg, "test", max(1, cfg.builtin_size // 10), cfg.seed, None)
        if cfg.gsm8k_path:
            train_parts.append(("GSM8K", _gsm8k(cfg, "train")))
            val_parts.append(("GSM8K", _gsm8k(cfg, "test", stop=100)))
    else:
        words = _words(cfg)
        train_parts = [
            ("SmolTalk", _open("SmolTalk (train)", "--smoltalk_path",
                               lambda: SmolTalk("train", _path(cfg.smoltalk_path)))),       # 460K conversations
            ("MMLU auxiliary_train", _open("MMLU (auxiliary_train)", "--mmlu_path",
                                           lambda: MMLU("all", "auxiliary_train", _path(cfg.mmlu_path)))),  # 100K
            ("GSM8K", _gsm8k(cfg, "train")),                                                  # 8K, calculator calls
            ("identity", identity), ("identity", identity),                                  # 1K, twice
            ("SimpleSpelling", SimpleSpelling(200_000, "train", cfg.seed, words=words)),
            ("SpellingBee", SpellingBee(80_000, "train", cfg.seed, words=words)),
        ]
        val_parts = [
            ("SmolTalk", _open("SmolTalk (test)", "--smoltalk_path",
                               lambda: SmolTalk("test", _path(cfg.smoltalk_path)))),        # 24K
            # slices sized to keep the validation mixture in the training mixture's proportions
            ("MMLU", _open("MMLU (test)", "--mmlu_path", lambda: MMLU("all", "test", _path(cfg.mmlu_path), stop=5200))),
            ("GSM8K", _gsm8k(cfg, "test", stop=420)),
        ]
    train, train_counts = _mixture(train_parts, cfg.seed)
    val, val_counts = _mixture(val_parts, cfg.seed)
    return ChatMixtures(train, val, {"train": train_counts, "val": val_counts}, identity_label)


# Examples per builtin task, as multiples of --builtin_size (0: the stage leaves the task out). The demo's chat
# stages have minutes on a CPU, so each stage's mix goes where its held-out evaluations need it. Mid-training
# teaches the chat and calculator format and spelling (SimpleSpelling fills the token budget SpellingBee
# would take); SFT then teaches letter counting (SpellingBee), which needs both, and more arithmetic.
# Multiple choice is short (one supervised letter per ~80 tokens): it needs many examples before the letter
# binds to the right choice, and the demo's budget has not been enough for that. Measured (demo-cpu, seed 42):
# its answers are 0.8 % of SFT's supervised tokens (letter and end token; SpellingBee 60 %, Arithmetic 32 %),
# the SFT model picks "B" 82 % of the time, at chance in every family; SFT on multiple choice alone (200 steps
# of 32) stays at chance for ~150 steps, then reaches 40 % (even/odd 70 %, units 55 %, sums and sequences ~25 %).
# From cpu-small's mid model (seed 42) the plateau is ~200 steps of 32 whatever the learning rate (0.2 or 0.6)
# or the batch (8 a step: still at chance after 2,400): it is the letter's share of the gradient that counts,
# and mid-training's per-token loss gives it almost none. So SFT's --loss_per=conversation (the letter weighs
# as much as a long answer) alone stays at chance in 300 mixed steps; --mc_first puts the plateau first
# (multiple choice alone, then the mixture). Held-out MultipleChoice / SpellingBee / Arithmetic after SFT
# (n = 256; mid: 25 / 0 / 99 %): 200 + 300 steps 38 / 38 / 100 %; 300 + 300 steps 41 / 41 / 99 % (per token
# instead of per conversation: 37 / 43 / 99 %; seed 1 from a 750-step mid: 41 / 33 / 99 %, and with 600 mixed
# steps 45 / 66 / 100 %); at 0.4 instead of 0.2 still at chance after 300. What is learnt: even 93-100 %,
# units 70-79 %, the rest near chance. Alone, 900 steps of multiple choice reach 46 % (shapes 44 %) and 1,800
# steps 61-64 % (largest 89 %, shapes 82 %): cpu-small's opening since, its mixture's learning rate restarted
# (chat_sft --lr_restart; flows/presets.py has the figures). Nor does a drill in finding a choice help: with
# half of the 300 opening steps questions that name their answer ("Which choice is 47?"), seed 1 (cpu-small) was
# still at chance after 900 steps (23 %, against 43 % without). The letter-only phase makes the model forget the other
# tasks for a while (Arithmetic and SpellingBee 0 % after it); the mixture's steps bring them back.
BUILTIN_MID_WEIGHTS = {"identity": 0.5, "Arithmetic": 3.0, "MultipleChoice": 2.0, "SimpleSpelling": 8.0,
                       "SpellingBee": 0.0}
BUILTIN_SFT_WEIGHTS = {"identity": 0.25, "Arithmetic": 2.0, "MultipleChoice": 2.0, "SimpleSpelling": 0.25,
                       "SpellingBee": 2.0}


def _builtin_parts(cfg, split: str, size: int, seed: int, identity: Task | None,
                   weights: dict[str, float] = BUILTIN_MID_WEIGHTS) -> list[tuple[str, Task]]:
    """The builtin chat tasks of non-zero weight, `size * weight` examples each (identity: the given task, or
    the builtin one of this split)."""
    def count(name: str) -> int:
        return max(1, round(size * weights[name]))

    words = _words(cfg) if cfg.spelling_words != "builtin" else "builtin"
    makers = {
        "identity": lambda: identity if identity is not None else IdentityChat(count("identity"), split, seed),
        "Arithmetic": lambda: ArithmeticProblems(count("Arithmetic"), split, seed, cfg.builtin_hard_share,
                                                   cfg.builtin_restate_counts),
        "MultipleChoice": lambda: MultipleChoiceQuiz(count("MultipleChoice"), split, seed),
        "SimpleSpelling": lambda: SimpleSpelling(count("SimpleSpelling"), split, seed, words=words),
        "SpellingBee": lambda: SpellingBee(count("SpellingBee"), split, seed, words=words),
    }
    return [(name, make()) for name, make in makers.items() if weights[name] > 0]


# -----------------------------------------------------------------------------
# Supervised fine-tuning

def sft_mixtures(cfg) -> ChatMixtures:
    """nanochat's SFT mixture (seed) or the offline one (builtin), plus the multiple-choice metric tasks."""
    identity, identity_label = _identity(cfg)
    if cfg.mixture == "builtin":
        seed, size = cfg.seed + SFT_DATA_SEED_OFFSET, cfg.builtin_size
        train_parts = _builtin_parts(cfg, "train", size, seed, identity if cfg.identity_path else None,
                                     BUILTIN_SFT_WEIGHTS)
        val_parts = _builtin_parts(cfg, "test", max(1, size // 10), cfg.seed, None, BUILTIN_SFT_WEIGHTS)
        if cfg.gsm8k_path:
            train_parts.append(("GSM8K", _gsm8k(cfg, "train")))
            val_parts.append(("GSM8K", _gsm8k(cfg, "test", stop=100)))
        eval_tasks = {"MultipleChoice": MultipleChoiceQuiz(256, "test", cfg.seed)}
    else:
        words = _words(cfg)
        train_parts = [
            ("ARC-Easy", _open("ARC-Easy (train)", "--arc_easy_path",
                               lambda: ARC("ARC-Easy", "train", _path(cfg.arc_easy_path)))),          # 2.3K
            ("ARC-Challenge", _open("ARC-Challenge (train)", "--arc_challenge_path",
                                    lambda: ARC("ARC-Challenge", "train", _path(cfg.arc_challenge_path)))),  # 1.1K
            ("GSM8K", _gsm8k(cfg, "train")),                                                             # 8K
            ("SmolTalk", _open("SmolTalk (train)", "--smoltalk_path",
                               lambda: SmolTalk("train", _path(cfg.smoltalk_path), stop=10_000))),         # 10K
            ("identity", identity),                                                                      # 1K
            ("SimpleSpelling", SimpleSpelling(300, "train", cfg.seed, words=words)),
            ("SpellingBee", SpellingBee(300, "train", cfg.seed, words=words)),
        ]
        val_parts = [("SmolTalk", _open("SmolTalk (test)", "--smoltalk_path",
                                        lambda: SmolTalk("test", _path(cfg.smoltalk_path))))]
        eval_tasks = {
            "MMLU": _open("MMLU (test)", "--mmlu_path", lambda: MMLU("all", "test", _path(cfg.mmlu_path))),
            "ARC-Easy": _open("ARC-Easy (test)", "--arc_easy_path",
                              lambda: ARC("ARC-Easy", "test", _path(cfg.arc_easy_path))),
        }
    train, train_counts = _mixture(train_parts, cfg.seed)
    val, val_counts = _mixture(val_parts, cfg.seed)
    mc_first = getattr(cfg, "mc_first", 0)
    if mc_first:  # a curriculum: these come first, in order, then the shuffled mixture
        train = TaskSequence([MultipleChoiceQuiz(mc_first, "train", cfg.seed + MC_FIRST_SEED_OFFSET), train])
        train_counts = {"MultipleChoice first": mc_first, **train_counts}
    return ChatMixtures(train, val, {"train": train_counts, "val": val_counts}, identity_label, eval_tasks)
