"""
The offline "builtin" chat data for the demo and CI: no network, no third-party text, every example
generated from templates written for this project and deterministic per (seed, split, index).

- IdentityChat: conversations about who the model is (nanopipe) and how it was made.
- ArithmeticProblems: word problems in GSM8K's exact format, `<<expr=result>>` calculator annotations and
  a `#### N` line, turned into conversations by the GSM8K code path itself (templates: word_problems.py;
  half of them take three or four calculator steps).
- MultipleChoiceQuiz: questions in MMLU's row format (question, subject, four choices, answer index),
  rendered by the MMLU code path.
- builtin_chat_mixture(): those three plus SimpleSpelling and SpellingBee on builtin words.

Train and test never share an example: each generated example is assigned to a side by a stable hash
of its text (see base.generate_in_split), so the splits are disjoint whatever the seed.
"""

from __future__ import annotations

import random
from typing import Callable

from nanopipe.tasks.base import Task, TaskMixture, check_synthetic_split, generate_in_split, score_letter
from nanopipe.tasks.gsm8k import gsm8k_conversation, score_final_answer
from nanopipe.tasks.mmlu import mmlu_conversation
from nanopipe.tasks.spelling import SimpleSpelling, SpellingBee
from nanopipe.tasks.word_problems import HARD_SHARE, arithmetic_problem


class _GeneratedTask(Task):
    """`size` examples, the i-th drawn from random.Random seeded by (task, seed, split, i, attempt)."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42, **slicing: int | None):
        super().__init__(**slicing)
        if size < 1:
            raise ValueError(f"{self.name} size must be >= 1, got {size}")
        self.size, self.seed = size, seed
        self.split = check_synthetic_split(split, self.name)

    def num_examples(self) -> int:
        return self.size

    def _generate(self, index: int, make: Callable[[random.Random], dict], key_of: Callable[[dict], str]) -> dict:
        return generate_in_split(self.split, key_of, make, f"{self.name}/{self.seed}/{index}")


# -----------------------------------------------------------------------------
# Identity conversations

GREETINGS = ("Hi!", "Hello", "hey there", "Good morning!", "Hi, how are you?", "Hello, anyone there?", "yo")
GREETING_REPLIES = (
    "Hello! I'm nanopipe. What can I do for you?",
    "Hi! How can I help you today?",
    "Hey! I'm here. What would you like to talk about?",
    "Hello! Ask me anything, and I'll do my best.",
)

IDENTITY_TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "name": (
        ("What is your name?", "Who are you?", "What should I call you?", "Do you have a name?",
         "Tell me about yourself."),
        ("I'm nanopipe, a small chat model.",
         "My name is nanopipe. I'm a small language model trained to chat.",
         "You can call me nanopipe. I'm a compact chat assistant trained from scratch."),
    ),
    "maker": (
        ("Who made you?", "Who created you?", "Who trained you?", "Where do you come from?"),
        ("I was trained with nanopipe, an open-source pipeline that takes a small ChatGPT-style model from "
         "raw text to a chat assistant. It follows the recipe of Andrej Karpathy's nanochat.",
         "The nanopipe project trained me: a small, readable training pipeline in PyTorch, orchestrated "
         "with Prefect, in the spirit of nanochat."),
    ),
    "training": (
        ("How were you trained?", "How did you learn to talk?", "What went into training you?",
         "Explain your training process."),
        ("In stages. First a byte-level BPE tokenizer was trained, then I was pretrained to predict the "
         "next token of ordinary text. After that came mid-training on conversations, supervised "
         "fine-tuning on example chats, and optionally reinforcement learning on math problems.",
         "A tokenizer came first, then pretraining on plain text, where I learned to predict the next "
         "token. Conversations, tool use and multiple-choice questions were taught in mid-training and "
         "fine-tuning afterwards. Each stage ran as a step of a Prefect workflow."),
    ),
    "chatgpt": (
        ("Are you ChatGPT?", "Are you made by OpenAI?", "Are you GPT-4?", "Is this Claude?"),
        ("No. I'm nanopipe, a much smaller model trained with the nanopipe pipeline. I'm not affiliated "
         "with any of the big assistants.",
         "No, I'm nanopipe: a small model trained from scratch, far smaller than the well-known assistants."),
    ),
    "size": (
        ("How big are you?", "How many parameters do you have?", "Are you a large model?"),
        ("I'm small: a transformer with only a few layers, orders of magnitude smaller than frontier "
         "models. That makes me cheap to train, but I make plenty of mistakes.",
         "Quite small. The exact size depends on the depth chosen for the run, but I'm tiny next to the "
         "large assistants, so please double-check what I say."),
    ),
    "abilities": (
        ("What can you do?", "What are you good at?", "How can you help me?", "What are your skills?"),
        ("I can chat, answer simple questions, spell words, count letters, and work through small math "
         "problems with a calculator tool. I'm a small model, so I often get harder things wrong.",
         "Simple conversation, short answers, spelling, and arithmetic with the help of a calculator I can "
         "call. Anything complex is likely beyond me."),
    ),
    "tools": (
        ("Can you use tools?", "Do you have a calculator?", "How do you do arithmetic?"),
        ("Yes, a simple one: I can write a short Python expression, and a calculator evaluates it and "
         "shows me the result. It only does arithmetic and counting letters in a string.",
         "I can call a calculator by writing a small Python expression; its output is inserted into my "
         "answer. That helps with arithmetic, where I would otherwise slip up."),
    ),
    "internet": (
        ("Can you browse the internet?", "Do you have internet access?", "Can you look things up online?"),
        ("No, I can't access the internet. I only know what I learned during training.",
         "I have no internet access. Everything I know comes from my training data."),
    ),
    "memory": (
        ("Do you remember our past conversations?", "Will you remember this chat?"),
        ("No. I only see the current conversation; nothing carries over once it ends.",
         "I don't keep memories between conversations. Each chat starts fresh."),
    ),
    "language": (
        ("What languages do you speak?", "Can you speak French?", "Do you understand other languages?"),
        ("I work best in English, which most of my training text was in. I may understand a little of "
         "other languages, but expect mistakes.",
         "Mostly English. My training data was largely English, so other languages are hit and miss."),
    ),
}

FAREWELLS = (("Thanks!", "You're welcome! Have a good day."), ("ok bye", "Bye! Come back anytime."),
             ("Thank you, that helps.", "Glad to help!"))


def _casual(rng: random.Random, question: str) -> str:
    """Vary a question the way people type: sometimes lowercase, sometimes without the question mark."""
    if rng.random() < 0.3:
        question = question.lower()
    if rng.random() < 0.25:
        question = question.rstrip("?.")
    return question


def _identity_conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.4:
        messages += [{"role": "user", "content": rng.choice(GREETINGS)},
                     {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
    for topic in rng.sample(sorted(IDENTITY_TOPICS), k=rng.randint(1, 3)):
        questions, answers = IDENTITY_TOPICS[topic]
        messages += [{"role": "user", "content": _casual(rng, rng.choice(questions))},
                     {"role": "assistant", "content": rng.choice(answers)}]
    if rng.random() < 0.2:
        farewell, reply = rng.choice(FAREWELLS)
        messages += [{"role": "user", "content": farewell}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def _messages_key(conversation: dict) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in conversation["messages"])


class IdentityChat(_GeneratedTask):
    """Who the model is: 1-3 questions about nanopipe, sometimes with a greeting and a farewell."""

    def get_example(self, index: int) -> dict:
        return self._generate(index, _identity_conversation, _messages_key)


# -----------------------------------------------------------------------------
# Arithmetic word problems in GSM8K format (the templates: nanopipe.tasks.word_problems)

class ArithmeticProblems(_GeneratedTask):
    """Procedural multi-step word problems, GSM8K format and scoring (compare the '#### N' answers).
    `hard_share`: the share of the harder kinds (word_problems.HARD_PROBLEM_KINDS: larger numbers, three or four
    calculator steps, distracting sentences); word_problems.HARD_SHARE by default, 0 for none. `restate_counts`:
    the workshop problem's answer opens by restating its count of machines (word_problems.arithmetic_problem)."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42, hard_share: float = HARD_SHARE,
                 restate_counts: bool = False, **slicing: int | None):
        super().__init__(size, split, seed, **slicing)
        if not 0 <= hard_share <= 1:
            raise ValueError(f"{self.name} hard_share must be in [0, 1], got {hard_share}")
        self.hard_share, self.restate_counts = hard_share, restate_counts

    def get_row(self, index: int) -> dict:
        """The raw GSM8K-format row of an example (the conversation is built from it)."""
        return self._generate(index, lambda rng: arithmetic_problem(rng, self.hard_share, self.restate_counts),
                              lambda row: row["question"])

    def get_example(self, index: int) -> dict:
        row = self.get_row(index)
        return gsm8k_conversation(row["question"], row["answer"])

    def evaluate(self, conversation: dict, completion: str) -> int:
        return score_final_answer(conversation, completion)


# -----------------------------------------------------------------------------
# Multiple-choice questions in MMLU format

SHAPES = (("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6), ("heptagon", 7), ("octagon", 8),
          ("decagon", 10))
UNITS = (("minutes", "hours", 60), ("seconds", "minutes", 60), ("hours", "days", 24), ("days", "weeks", 7),
         ("centimeters", "meters", 100), ("grams", "kilograms", 1000), ("months", "years", 12))


def _distractors(rng: random.Random, answer: int, low: int = 0) -> list[int]:
    """Three distinct wrong numbers near the answer."""
    wrong: set[int] = set()
    spread = max(3, abs(answer) // 5)
    while len(wrong) < 3:
        candidate = answer + rng.choice((-1, 1)) * rng.randint(1, spread)
        if candidate != answer and candidate >= low:
            wrong.add(candidate)
    return sorted(wrong)


def _mc_arithmetic(rng: random.Random) -> tuple[str, str, object, list]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(("+", "-", "*"))
    if op == "-":
        a, b = max(a, b), min(a, b)
    if op == "*":
        a, b = rng.randint(2, 20), rng.randint(2, 12)
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return "elementary_mathematics", f"What is {a} {op} {b}?", answer, _distractors(rng, answer)


def _mc_units(rng: random.Random) -> tuple[str, str, object, list]:
    small, big, factor = rng.choice(UNITS)
    amount = rng.randint(2, 12)
    answer = amount * factor
    return "elementary_mathematics", f"How many {small} are in {amount} {big}?", answer, _distractors(rng, answer, 1)


def _mc_shapes(rng: random.Random) -> tuple[str, str, object, list]:
    shape, sides = rng.choice(SHAPES)
    wrong = rng.sample([s for _, s in SHAPES if s != sides], 3)
    return "elementary_mathematics", f"How many sides does a {shape} have?", sides, wrong


def _mc_largest(rng: random.Random) -> tuple[str, str, object, list]:
    numbers = rng.sample(range(10, 1000), 4)
    largest = max(numbers)
    wording = rng.choice(("Which of these numbers is the largest?", "Which number is greatest?"))
    return "elementary_mathematics", wording, largest, [n for n in numbers if n != largest]


def _mc_even(rng: random.Random) -> tuple[str, str, object, list]:
    even = 2 * rng.randint(5, 400)
    odds = rng.sample([2 * k + 1 for k in range(5, 400)], 3)
    return "elementary_mathematics", "Which of the following numbers is even?", even, odds


def _mc_alphabet(rng: random.Random) -> tuple[str, str, object, list]:
    letters = "abcdefghijklmnopqrstuvwxyz".upper()
    i = rng.randint(0, 24)
    answer = letters[i + 1]
    wrong = rng.sample([c for c in letters if c != answer], 3)
    return "miscellaneous", f"Which letter comes right after {letters[i]} in the English alphabet?", answer, wrong


def _mc_sequence(rng: random.Random) -> tuple[str, str, object, list]:
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    terms = [start + step * k for k in range(4)]
    answer = start + step * 4
    shown = ", ".join(str(t) for t in terms)
    return "elementary_mathematics", f"What number comes next in the sequence {shown}, ...?", answer, \
        _distractors(rng, answer)


MC_KINDS = (_mc_arithmetic, _mc_units, _mc_shapes, _mc_largest, _mc_even, _mc_alphabet, _mc_sequence)


def multiple_choice_row(rng: random.Random) -> dict:
    """One MMLU-format row {"question", "subject", "choices", "answer"}."""
    subject, question, correct, wrong = rng.choice(MC_KINDS)(rng)
    choices = [str(w) for w in wrong]
    answer = rng.randrange(4)
    choices.insert(answer, str(correct))
    assert len(set(choices)) == 4, f"duplicate choices {choices} for {question!r}"
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


class MultipleChoiceQuiz(_GeneratedTask):
    """Procedural four-way multiple choice, MMLU format and scoring (the answer is one letter)."""

    eval_type = "categorical"
    chance_accuracy = 0.25

    def get_row(self, index: int) -> dict:
        """The raw MMLU-format row of an example."""
        # the key holds the choices too: some questions ("Which number is even?") differ only in them
        return self._generate(index, multiple_choice_row,
                              lambda row: row["question"] + "|" + ",".join(sorted(row["choices"])))

    def get_example(self, index: int) -> dict:
        return mmlu_conversation(self.get_row(index), f"{self.name} example {index}")

    def evaluate(self, conversation: dict, completion: str) -> int:
        return score_letter(conversation, completion)


# -----------------------------------------------------------------------------
# The mixture

def builtin_chat_tasks(split: str = "train", seed: int = 42, size: int | None = None,
                       restate_counts: bool = False) -> list[Task]:
    """The builtin tasks, `size` examples each (default 1000 for train, 100 for test/val); identity
    conversations are listed twice so that they weigh double in a mixture. `restate_counts`: ArithmeticProblems'."""
    size = size or (1000 if check_synthetic_split(split, "builtin_chat_tasks") == "train" else 100)
    identity = IdentityChat(size, split, seed)
    return [identity, identity, ArithmeticProblems(size, split, seed, restate_counts=restate_counts),
            MultipleChoiceQuiz(size, split, seed),
            SimpleSpelling(size, split, seed), SpellingBee(size, split, seed)]


def builtin_chat_mixture(split: str = "train", seed: int = 42, size: int | None = None,
                         restate_counts: bool = False) -> TaskMixture:
    """An offline chat mixture for the demo and CI, shuffled deterministically with `seed`."""
    return TaskMixture(builtin_chat_tasks(split, seed, size, restate_counts), seed=seed)
