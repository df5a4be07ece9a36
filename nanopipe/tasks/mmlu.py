"""
MMLU: four-way multiple choice over 57 subjects (https://huggingface.co/datasets/cais/mmlu).

A row is {"question": str, "subject": str, "choices": [4 x str], "answer": int 0-3}. Subset "all" has the
evaluation splits (test, validation, dev) and the auxiliary_train split; subset "auxiliary_train" has the
same training rows as split "train", each wrapped in a {"train": row} column on the hub.
"""

from __future__ import annotations

from pathlib import Path

from nanopipe.tasks.base import Task, TaskDataError, render_mc, score_letter
from nanopipe.tasks.sources import load_rows, require_keys

HF_REPO = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}


def mmlu_conversation(row: dict, where: str = "row") -> dict:
    """The conversation of one MMLU-format row; 'letters' and 'subject' ride along for evaluation."""
    choices, answer = row["choices"], row["answer"]
    if len(choices) != len(LETTERS) or not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        raise TaskDataError(f"{where}: MMLU rows need 4 choices and an answer index 0-3, "
                            f"got {len(choices)} choices and answer {answer!r}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
            {"role": "assistant", "content": LETTERS[answer]},
        ],
        "subject": row.get("subject", ""),
        "letters": LETTERS,
    }


class MMLU(Task):
    """MMLU from the hub (cais/mmlu) or local files with question/subject/choices/answer rows."""

    eval_type = "categorical"
    chance_accuracy = 0.25

    def __init__(self, subset: str = "all", split: str = "test", data_path: str | Path | None = None,
                 shuffle_seed: int | None = 42, **slicing: int | None):
        super().__init__(**slicing)
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be one of {', '.join(SPLITS)}, got {subset!r}")
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU subset {subset!r} has splits {', '.join(SPLITS[subset])}, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_rows(HF_REPO, subset, split, data_path, shuffle_seed)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if isinstance(row, dict) and "question" not in row and isinstance(row.get("train"), dict):
            row = row["train"]  # the hub's auxiliary_train subset nests each row under "train"
        row = require_keys(row, ("question", "choices", "answer"), self.rows, index)
        return mmlu_conversation(row, self.rows.where(index))

    def evaluate(self, conversation: dict, completion: str) -> int:
        return score_letter(conversation, completion)
