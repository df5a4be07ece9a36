"""
Chat tasks: datasets of conversations, with exact evaluation and RL rewards where a task has them.

    from nanopipe.tasks import build_task, builtin_chat_mixture
    task = build_task("GSM8K", split="test")            # from the hub; data_path= for local files
    train = builtin_chat_mixture("train", seed=42)       # offline: no network, no third-party text

See nanopipe/tasks/base.py for the interface and nanopipe/chat_format.py for rendering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from nanopipe.tasks.arc import ARC
from nanopipe.tasks.base import Task, TaskDataError, TaskMixture, TaskSequence, TaskView, render_mc
from nanopipe.tasks.builtin import (ArithmeticProblems, IdentityChat, MultipleChoiceQuiz, builtin_chat_mixture,
                                    builtin_chat_tasks)
from nanopipe.tasks.customjson import CustomJSON
from nanopipe.tasks.gsm8k import GSM8K
from nanopipe.tasks.humaneval import HumanEval
from nanopipe.tasks.mmlu import MMLU
from nanopipe.tasks.smoltalk import SmolTalk
from nanopipe.tasks.spelling import SimpleSpelling, SpellingBee, load_words

_BUILDERS: dict[str, Callable[..., Task]] = {
    "ARC-Easy": lambda split, data_path, **kw: ARC("ARC-Easy", split, data_path, **kw),
    "ARC-Challenge": lambda split, data_path, **kw: ARC("ARC-Challenge", split, data_path, **kw),
    "MMLU": lambda split, data_path, **kw: MMLU("all", split, data_path, **kw),
    "GSM8K": lambda split, data_path, **kw: GSM8K("main", split, data_path, **kw),
    "HumanEval": lambda split, data_path, **kw: HumanEval(split, data_path, **kw),
    "SmolTalk": lambda split, data_path, **kw: SmolTalk(split, data_path, **kw),
    "SpellingBee": lambda split, data_path, **kw: SpellingBee(split=split, words=data_path or "builtin", **kw),
    "SimpleSpelling": lambda split, data_path, **kw: SimpleSpelling(split=split, words=data_path or "builtin", **kw),
    "Arithmetic": lambda split, data_path, **kw: ArithmeticProblems(split=split, **kw),
    "MultipleChoice": lambda split, data_path, **kw: MultipleChoiceQuiz(split=split, **kw),
    "Identity": lambda split, data_path, **kw: IdentityChat(split=split, **kw),
}
TASK_NAMES = tuple(_BUILDERS)
# Evaluation tasks that need no download: the builtin stand-ins for GSM8K and MMLU, and SpellingBee.
OFFLINE_EVAL_TASKS = ("Arithmetic", "MultipleChoice", "SpellingBee")


def build_task(name: str, split: str = "test", data_path: str | Path | None = None, **kwargs: Any) -> Task:
    """A task by name (see TASK_NAMES). data_path: local files for the real datasets, a word-list file for
    the spelling tasks; ignored by the generated builtin tasks. kwargs go to the task's constructor
    (e.g. size=, seed=, start=, stop=, step=, shuffle_seed=)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")
    return _BUILDERS[name](split, data_path, **kwargs)


__all__ = [
    "ARC", "ArithmeticProblems", "CustomJSON", "GSM8K", "HumanEval", "IdentityChat", "MMLU", "MultipleChoiceQuiz",
    "OFFLINE_EVAL_TASKS", "SimpleSpelling", "SmolTalk", "SpellingBee", "TASK_NAMES", "Task", "TaskDataError",
    "TaskMixture", "TaskSequence", "TaskView", "build_task", "builtin_chat_mixture", "builtin_chat_tasks",
    "load_words", "render_mc",
]
