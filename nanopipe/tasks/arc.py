"""
ARC, the AI2 Reasoning Challenge: grade-school science multiple choice
(https://huggingface.co/datasets/allenai/ai2_arc), subsets ARC-Easy and ARC-Challenge.

A row is {"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}. Most questions have
four choices labelled A-D, a few have three or five, and some are labelled 1-4; the labels are kept as
given, so the answer is always one of the conversation's "letters".
"""

from __future__ import annotations

from pathlib import Path

from nanopipe.tasks.base import Task, TaskDataError, render_mc, score_letter
from nanopipe.tasks.sources import load_rows, require_keys

HF_REPO = "allenai/ai2_arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


def arc_conversation(row: dict, where: str = "row") -> dict:
    """The conversation of one ARC-format row."""
    choices = row["choices"]
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise TaskDataError(f"{where}: ARC 'choices' must be {{'text': [...], 'label': [...]}}, got {choices!r:.200}")
    texts, letters = list(choices["text"]), tuple(choices["label"])
    if len(texts) != len(letters) or row["answerKey"] not in letters:
        raise TaskDataError(f"{where}: answerKey {row['answerKey']!r} must be one of the labels {list(letters)} "
                            f"({len(texts)} choice texts)")
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], letters, texts)},
            {"role": "assistant", "content": row["answerKey"]},
        ],
        "letters": letters,
    }


class ARC(Task):
    """ARC-Easy or ARC-Challenge from the hub (allenai/ai2_arc) or local files in the same schema."""

    eval_type = "categorical"
    chance_accuracy = 0.25

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", data_path: str | Path | None = None,
                 shuffle_seed: int | None = 42, **slicing: int | None):
        super().__init__(**slicing)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.subset = subset
        self.rows = load_rows(HF_REPO, subset, split, data_path, shuffle_seed)

    @property
    def name(self) -> str:
        return self.subset

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = require_keys(self.rows[index], ("question", "choices", "answerKey"), self.rows, index)
        return arc_conversation(row, self.rows.where(index))

    def evaluate(self, conversation: dict, completion: str) -> int:
        return score_letter(conversation, completion)
