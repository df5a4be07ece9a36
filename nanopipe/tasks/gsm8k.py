"""
GSM8K: grade-school math word problems with worked solutions (https://huggingface.co/datasets/openai/gsm8k).

A row is {"question": str, "answer": str}. The answer's calculator annotations `<<48/2=24>>` become a
python call ("48/2") followed by its output ("24"), so the model learns to call the calculator; the last
line `#### 72` is the final answer that evaluation compares.

Scoring is nanochat's (and OpenAI's grader's): the number right after the first '#### ' (one space), commas
removed, must equal the reference's as a string, so '#### 18.00', '####18' and '#### 18.' score 0 against
18. `lenient=True` (an explicit option) reads any spacing, drops a trailing '.', and compares numerically.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nanopipe.chat_format import assistant_parts
from nanopipe.tasks.base import Task
from nanopipe.tasks.sources import load_rows, require_keys

HF_REPO = "openai/gsm8k"
SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")         # nanochat's: exactly one space after the marker
_LENIENT_FINAL_ANSWER = re.compile(r"####\s*(-?[0-9.,]+)")


def parse_calculator_annotations(answer: str) -> list[dict]:
    """Assistant parts of a GSM8K solution: text, and for each `<<expr=result>>` a python part (expr) and
    a python_output part (result). Without '=' the whole annotation is the call and the output is empty.
    Empty text between adjacent annotations is dropped."""
    parts: list[dict] = []
    position = 0
    for match in _ANNOTATION.finditer(answer):
        if match.start() > position:
            parts.append({"type": "text", "text": answer[position:match.start()]})
        expr, _, result = match.group(1).rpartition("=") if "=" in match.group(1) else (match.group(1), "", "")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        position = match.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


def extract_final_answer(text: str, lenient: bool = False) -> str | None:
    """The number after the first '#### ' with its commas removed ('1,200.' -> '1200.'), or None. lenient:
    after '####' and any spacing, a trailing '.' dropped too ('####1,200.' -> '1200')."""
    if not lenient:
        match = _FINAL_ANSWER.search(text)
        return None if match is None else match.group(1).strip().replace(",", "")
    match = _LENIENT_FINAL_ANSWER.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "").rstrip(".")
    return number or None


def same_answer(predicted: str | None, reference: str | None, lenient: bool = False) -> bool:
    """Two extracted answers agree: the same string (nanochat's rule), or with lenient the same number
    ('18' == '18.00'). False when the prediction is missing."""
    if predicted is None or reference is None:
        return False
    if not lenient:
        return predicted == reference
    try:
        return Decimal(predicted) == Decimal(reference)
    except InvalidOperation:
        return predicted == reference


def gsm8k_conversation(question: str, answer: str) -> dict:
    """The conversation of one GSM8K-format problem."""
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": parse_calculator_annotations(answer)},
    ]}


def reference_answer(conversation: dict, lenient: bool = False) -> str | None:
    """The final answer of a conversation's reference solution (its last assistant message)."""
    message = conversation["messages"][-1]
    assert message["role"] == "assistant", f"last message must be the reference answer, got {message['role']!r}"
    text = "".join(p["text"] for p in assistant_parts(message) if p["type"] == "text")
    return extract_final_answer(text, lenient)


def score_final_answer(conversation: dict, completion: str, lenient: bool = False) -> int:
    """1 if the completion's '#### N' equals the reference's, else 0 (see the module docstring)."""
    return int(same_answer(extract_final_answer(completion, lenient), reference_answer(conversation, lenient), lenient))


PYTHON_START = "<|python_start|>"


def in_answer_format(completion: str) -> bool:
    """Is a decoded completion written the way GSM8K solutions are taught: at least one calculator call
    and a final '#### N' line? (Right or wrong: this is the format, not the score.)"""
    return PYTHON_START in completion and extract_final_answer(completion) is not None


class GSM8K(Task):
    """GSM8K from the hub (openai/gsm8k) or from local files with question/answer rows."""

    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", data_path: str | Path | None = None,
                 shuffle_seed: int | None = 42, lenient: bool = False, **slicing: int | None):
        super().__init__(**slicing)
        self.lenient = lenient  # nanopipe's lenient answer matching instead of nanochat's exact one
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.rows = load_rows(HF_REPO, subset, split, data_path, shuffle_seed, local_flag="--gsm8k_path")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = require_keys(self.rows[index], ("question", "answer"), self.rows, index)
        return gsm8k_conversation(row["question"], row["answer"])

    def evaluate(self, conversation: dict, completion: str) -> int:
        return score_final_answer(conversation, completion, self.lenient)
