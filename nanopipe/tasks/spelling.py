"""
Synthetic spelling tasks, generated on the fly from a word list and deterministic per (seed, split, index).

- SimpleSpelling: "Spell the word: cat" -> "cat:c,a,t". Tokens hide letters from a model; spelling drills
  teach the mapping from a token to its characters.
- SpellingBee: "How many r are in strawberry?" The assistant spells the word, counts by hand, checks with
  a calculator call `'strawberry'.count('r')`, and ends with "#### 3" (scored like GSM8K).

Words come from `load_words(source)`: "builtin" (offline, from text that ships with Python), "download"
(the public 370K-word words_alpha.txt list, nanochat's, cached under NANOPIPE_HOME/words and checked against its
size and sha256), an http(s) URL (downloaded once, see nanopipe.remote), or a local file, one word per line.
Train and test use disjoint words (a stable hash of the word picks its side).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from nanopipe.configs.chat_common import WORD_LIST_URL
from nanopipe.remote import RemoteFile, RemoteFileError, fetch, is_url, remote_file
from nanopipe.tasks.base import Task, TaskDataError, check_synthetic_split, is_held_out
from nanopipe.tasks.gsm8k import score_final_answer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORD = re.compile(r"[a-z]{3,16}")


# -----------------------------------------------------------------------------
# Word lists

BUILTIN_WORD_COUNT = 2500


def _builtin_texts() -> Iterator[str]:
    """The documents of nanopipe.data's builtin corpus (Python's own documentation), in its fixed order."""
    try:
        from nanopipe.data import builtin_documents
    except ImportError:  # the corpus module is optional here: read the same pydoc topics directly
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        yield from (topics[key] for key in sorted(topics))
        return
    yield from (text for _, text in builtin_documents())


@lru_cache(maxsize=1)
def builtin_words() -> tuple[str, ...]:
    """About BUILTIN_WORD_COUNT lowercase words (3-16 letters, sorted, unique) from the first documents of
    the offline builtin corpus: deterministic for a given Python installation, no download."""
    words: set[str] = set()
    for text in _builtin_texts():
        words.update(w for w in re.findall(r"[A-Za-z]+", text) if _WORD.fullmatch(w))
        if len(words) >= BUILTIN_WORD_COUNT:
            break
    if not words:
        raise TaskDataError("the builtin corpus yielded no words (is Python's documentation stripped from this "
                            "installation?); pass a word list file instead")
    return tuple(sorted(words))


def read_word_file(path: str | Path) -> list[str]:
    """One word per line (blank lines skipped); a line with spaces inside is an error naming the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskDataError(f"word list {path} does not exist")
    words = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        word = line.strip()
        if not word:
            continue
        if any(ch.isspace() for ch in word):
            raise TaskDataError(f"{path} line {line_number}: expected one word per line, got {word!r}")
        words.append(word)
    if not words:
        raise TaskDataError(f"word list {path} is empty")
    return words


def word_list_remote(source: str) -> RemoteFile:
    """The download behind a remote word source ("download" or an http(s) URL), cached in NANOPIPE_HOME/words."""
    return remote_file(WORD_LIST_URL if source == "download" else source, subdir="words")


def download_word_list(url: str = "download") -> Path:
    """A word list downloaded once into NANOPIPE_HOME/words (the public list: checked against its pinned size
    and sha256; another URL: against the sha256 recorded at its first download)."""
    try:
        return fetch(word_list_remote(url))
    except RemoteFileError as err:
        raise TaskDataError(f"word list: {err}") from None


def is_remote_words(source: str | Path) -> bool:
    """Is this word source a download ("download": the public list, or an http(s) URL)?"""
    return source == "download" or is_url(source)


def word_list_path(source: str | Path) -> Path:
    """The local file of a word source other than "builtin": downloaded (or found in the cache) if remote."""
    if is_remote_words(source):
        return download_word_list(str(source))
    return Path(source).expanduser()


def load_words(source: str | Path = "builtin") -> list[str]:
    """Words from "builtin", "download" (the public 370K-word list), an http(s) URL or a local file path."""
    if source == "builtin":
        return list(builtin_words())
    return read_word_file(word_list_path(source))


def split_words(words: Sequence[str], split: str, task_name: str) -> list[str]:
    """The words on `split`'s side of the stable train/test partition."""
    held_out = split == "test"
    chosen = [w for w in words if is_held_out(w) == held_out]
    if not chosen:
        raise TaskDataError(f"{task_name}: no {split} words among the {len(words)} given "
                            f"(about 10% of words go to test, the rest to train; use a longer word list)")
    return chosen


class _WordTask(Task):
    """Shared setup: a fixed number of examples drawn from the split's words."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42,
                 words: Sequence[str] | str | Path = "builtin", **slicing: int | None):
        super().__init__(**slicing)
        if size < 1:
            raise ValueError(f"{self.name} size must be >= 1, got {size}")
        self.size, self.seed = size, seed
        self.split = check_synthetic_split(split, self.name)
        word_list = load_words(words) if isinstance(words, (str, Path)) else list(words)
        self.words = split_words(word_list, self.split, self.name)

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.name}/{self.seed}/{self.split}/{index}")


# -----------------------------------------------------------------------------
# SimpleSpelling

SPELL_TEMPLATES = (
    "Spell the word: {word}",
    "Spell {word} letter by letter.",
    "How do you spell {word}?",
    "spell {word}",
    "Can you spell out the word {word}?",
)


def spelled(word: str) -> str:
    return f"{word}:{','.join(word)}"


class SimpleSpelling(_WordTask):
    """Spell a word: the answer is "word:w,o,r,d"."""

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        return {"messages": [
            {"role": "user", "content": rng.choice(SPELL_TEMPLATES).format(word=word)},
            {"role": "assistant", "content": spelled(word)},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int(completion.strip() == conversation["messages"][-1]["content"])


# -----------------------------------------------------------------------------
# SpellingBee

COUNT_TEMPLATES = (
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Count how many {letter} the word {word} has",
    "How many {letter}s does {word} have",
    "How often does {letter} occur in {word}",
    "What is the number of {letter} in {word}",
    "In {word}, how many times do you see {letter}",
    "Tell me how many {letter} there are in {word}",
    "{word}: how many {letter}",
    "Number of {letter} in the word {word}",
)


def _count_question(rng: random.Random, word: str, letter: str) -> str:
    template = rng.choice(COUNT_TEMPLATES)
    if rng.random() < 0.3:  # people often skip capitals
        template = template.lower()
    letter_quote, word_quote = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
    question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
    return question + ("?" if rng.random() < 0.5 else "")


def counting_solution(word: str, letter: str) -> list[dict]:
    """Assistant parts: spell, count by hand, check with the calculator, state '#### N'."""
    lines = [f"I need the number of '{letter}' in '{word}'. First I spell it out:", "", spelled(word), "",
             f"Now I go through it and count each '{letter}':"]
    count = 0
    for position, char in enumerate(word, start=1):
        if char == letter:
            count += 1
            # no space between the index and the letter: ":r" and ": r" are different tokens
            lines.append(f"{position}:{char} hit! count={count}")
        else:
            lines.append(f"{position}:{char}")
    lines += ["", f"By hand I count {count}."]
    assert count == word.count(letter), f"hand count {count} != {word.count(letter)} for {letter!r} in {word!r}"
    return [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "text", "text": "\n\nLet me check with Python:\n\n"},
        {"type": "python", "text": f"{word!r}.count({letter!r})"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython also says {count}.\n\nFinal answer:\n\n#### {count}"},
    ]


class SpellingBee(_WordTask):
    """Count a letter in a word; evaluate/reward compare the '#### N' final answers."""

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so that zero is a possible answer
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        return {"messages": [
            {"role": "user", "content": _count_question(rng, word, letter)},
            {"role": "assistant", "content": counting_solution(word, letter)},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        return score_final_answer(conversation, completion)
