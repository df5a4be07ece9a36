"""
The task interface: a dataset of conversations plus, for evaluation tasks, how to score a completion.

    task = GSM8K(split="test")                 # any Task
    len(task), task[0]                         # a conversation dict (see nanopipe.chat_format)
    task.eval_type                             # 'generative', 'categorical', or None (training data only)
    task.evaluate(task[0], "... #### 18")      # exact score, 0 or 1
    task.reward(task[0], "... #### 18")        # float for RL
    task[100:200], task[::10]                  # lightweight views, also Task(start=, stop=, step=)

TaskMixture shuffles several tasks together deterministically (list a task twice to upweight it);
TaskSequence chains them in order (a curriculum).
"""

from __future__ import annotations

import abc
import bisect
import operator
import random
import zlib
from typing import Any, ClassVar, Iterator, Sequence

from nanopipe.chat_format import ConversationError, normalize_messages
from nanopipe.exit_codes import StageError

class TaskDataError(StageError, ValueError):
    """A task's source data is missing or malformed. The message names the file (and line) or hub dataset."""


class Task(abc.ABC):
    """A sliceable, read-only sequence of conversations.

    Subclasses implement num_examples() and get_example(physical_index); evaluation tasks also set
    eval_type and implement evaluate(). start/stop/step select a subset with Python slice semantics.
    """

    eval_type: ClassVar[str | None] = None
    # Expected accuracy of random guessing, the zero point of a chance-centred score such as ChatCORE.
    chance_accuracy: ClassVar[float] = 0.0

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self._slice = slice(start, stop, step)

    @abc.abstractmethod
    def num_examples(self) -> int:
        """Number of examples in the underlying (unsliced) dataset."""

    @abc.abstractmethod
    def get_example(self, index: int) -> dict:
        """The conversation at a physical index of the underlying dataset."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def _indices(self) -> range:
        return range(self.num_examples())[self._slice]

    def __len__(self) -> int:
        return len(self._indices())

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return TaskView(self, index)
        try:
            index = operator.index(index)  # numpy and torch integers too
        except TypeError:
            raise TypeError(f"{self.name} indices must be integers or slices, got {type(index).__name__}") from None
        indices = self._indices()
        if not -len(indices) <= index < len(indices):
            raise IndexError(f"{self.name} index {index} out of range for {len(indices)} examples")
        return self.get_example(indices[index])

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion solves the conversation's problem, else 0."""
        raise TypeError(f"{self.name} is training data only: it has no exact evaluation (eval_type is None)")

    def reward(self, conversation: dict, completion: str) -> float:
        """Reward for RL; by default the exact evaluation score as a float."""
        return float(self.evaluate(conversation, completion))

    def __repr__(self) -> str:
        return f"{self.name}(len={len(self)})"


class TaskView(Task):
    """A slice of another task; evaluation is delegated to it."""

    def __init__(self, parent: Task, selection: slice):
        if selection.step == 0:
            raise ValueError("slice step cannot be zero")
        self._slice = selection  # plain Python slice semantics, negative steps included
        self.parent = parent
        self.eval_type = parent.eval_type  # type: ignore[misc]
        self.chance_accuracy = parent.chance_accuracy  # type: ignore[misc]

    @property
    def name(self) -> str:
        return self.parent.name

    def num_examples(self) -> int:
        return len(self.parent)

    def get_example(self, index: int) -> dict:
        return self.parent[index]

    def evaluate(self, conversation: dict, completion: str) -> int:
        return self.parent.evaluate(conversation, completion)

    def reward(self, conversation: dict, completion: str) -> float:
        return self.parent.reward(conversation, completion)


class TaskSequence(Task):
    """Tasks one after the other, in the given order (e.g. a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **slicing: int | None):
        super().__init__(**slicing)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self._offsets = [0]
        for task in self.tasks:
            self._offsets.append(self._offsets[-1] + len(task))

    def num_examples(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> tuple[Task, int]:
        """(task, index within that task) of a physical index."""
        task_index = bisect.bisect_right(self._offsets, index) - 1
        return self.tasks[task_index], index - self._offsets[task_index]

    def get_example(self, index: int) -> dict:
        task, local = self.locate(index)
        return task[local]


class TaskMixture(TaskSequence):
    """All examples of several tasks in one deterministic shuffled order (the same seed gives the same
    order on every rank and every run). A task listed twice contributes its examples twice."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slicing: int | None):
        super().__init__(tasks, **slicing)
        self.seed = seed
        self._order = list(range(self._offsets[-1]))
        random.Random(seed).shuffle(self._order)

    def locate(self, index: int) -> tuple[Task, int]:
        return super().locate(self._order[index])


# -----------------------------------------------------------------------------
# Helpers shared by tasks

def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The user message of a multiple-choice question; the expected answer is the bare letter.

    The wording is nanochat's, word for word: the prompts, and so the scores, are comparable with its.
    Two details matter for small models: each letter comes after its choice (the letter token then sits
    next to the text it names), and there is no space before it, so "=A" in the prompt and the answer "A"
    share the same token.
    """
    assert len(letters) == len(choices), f"{len(letters)} letters for {len(choices)} choices"
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{options}\nRespond only with the letter of the correct answer."


def is_held_out(key: str, held_out_per_mille: int = 100) -> bool:
    """Stable train/test partition of generated content: hash the content itself, so a question can never
    appear in both splits, whatever the seed or index that produced it."""
    return zlib.crc32(key.encode("utf-8")) % 1000 < held_out_per_mille


SYNTHETIC_SPLITS = ("train", "test", "val")  # 'val' and 'test' name the same held-out partition


def check_synthetic_split(split: str, task_name: str) -> str:
    """'train' or 'test' (the held-out partition), accepting 'val' as another name for it."""
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"{task_name} split must be one of {', '.join(SYNTHETIC_SPLITS)}, got {split!r}")
    return "train" if split == "train" else "test"


def generate_in_split(split: str, key_of, make, rng_seed: str) -> Any:
    """Draw candidates from `make(rng)` until one falls in `split`'s partition (about 1.1 tries for train,
    10 for test). Deterministic: the i-th try uses random.Random(f"{rng_seed}/{i}")."""
    want_held_out = split == "test"
    for attempt in range(10_000):
        candidate = make(random.Random(f"{rng_seed}/{attempt}"))
        if is_held_out(key_of(candidate)) == want_held_out:
            return candidate
    raise RuntimeError(f"no {split} example found after 10000 tries for {rng_seed} (generator space too small?)")


def score_letter(conversation: dict, completion: str) -> int:
    """Multiple choice: 1 if the completion (surrounding whitespace ignored) is the reference letter."""
    reference = conversation["messages"][-1]
    assert reference["role"] == "assistant" and isinstance(reference["content"], str), \
        f"the last message must be the assistant's reference letter, got {reference!r:.200}"
    return int(completion.strip() == reference["content"])


def checked_conversation(messages: Any, where: str, **extra: Any) -> dict:
    """{"messages": messages, **extra} after validating its shape; errors name `where` (file and line)."""
    conversation = {"messages": messages, **extra}
    try:
        normalized = normalize_messages(conversation)
    except ConversationError as e:
        raise TaskDataError(f"{where}: {e}") from e
    if len(normalized) < 2:
        raise TaskDataError(f"{where}: a training conversation needs at least one assistant reply")
    return conversation
