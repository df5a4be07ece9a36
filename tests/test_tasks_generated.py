"""Generated tasks: the synthetic spelling tasks and word lists, the builtin offline tasks and their mixture,
slicing, mixtures, sequences and the task registry."""

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanopipe.chat_format import normalize_messages
from nanopipe.tasks import (OFFLINE_EVAL_TASKS, TASK_NAMES, ArithmeticProblems, IdentityChat, MultipleChoiceQuiz,
                            SimpleSpelling, SpellingBee, Task, TaskDataError, TaskMixture, TaskSequence,
                            build_task, builtin_chat_mixture, builtin_chat_tasks)
from nanopipe.tasks.base import is_held_out
from nanopipe.tasks.gsm8k import reference_answer
from nanopipe.tasks.spelling import builtin_words, download_word_list, load_words, read_word_file

# -----------------------------------------------------------------------------
# Synthetic spelling tasks

@pytest.fixture(scope="module")
def words() -> list[str]:
    return list(builtin_words())


def test_builtin_words_are_offline_and_plentiful(words):
    assert len(words) >= 1000 and words == sorted(set(words))
    assert all(re.fullmatch(r"[a-z]{3,16}", w) for w in words)


def test_spelling_tasks_are_deterministic_per_seed(words):
    for cls in (SimpleSpelling, SpellingBee):
        a, b = cls(size=50, seed=7, words=words), cls(size=50, seed=7, words=words)
        c = cls(size=50, seed=8, words=words)
        assert list(a) == list(b) and list(a) != list(c)
        assert len(a) == 50 and a.eval_type == "generative"


def test_spelling_train_and_test_words_are_disjoint(words):
    def used(task):
        return {re.search(r"'([a-z]+)'\.count", task[i]["messages"][1]["content"][2]["text"]).group(1)
                for i in range(len(task))}
    train, test = used(SpellingBee(300, "train", words=words)), used(SpellingBee(300, "test", words=words))
    assert train and test and not train & test
    assert SpellingBee(5, "val", words=words)[0] == SpellingBee(5, "test", words=words)[0]


def test_spelling_bee_solution_is_consistent(words):
    task = SpellingBee(size=200, seed=1, words=words)
    zero_counts = 0
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        call, output = parts[2]["text"], parts[3]["text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call).groups()
        assert output == str(word.count(letter))
        assert parts[4]["text"].endswith(f"#### {output}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert task.evaluate(conversation, f"#### {output}") == 1
        assert task.reward(conversation, f"#### {int(output) + 1}") == 0.0
        zero_counts += output == "0"
    assert 0 < zero_counts < 60  # some questions ask for a letter the word does not have


def test_simple_spelling_evaluate(words):
    task = SimpleSpelling(size=20, words=words)
    conversation = task[3]
    word = conversation["messages"][1]["content"].split(":")[0]
    assert word in conversation["messages"][0]["content"]
    assert task.evaluate(conversation, f"{word}:{','.join(word)}\n") == 1
    assert task.evaluate(conversation, f"{word}:{','.join(reversed(word))}") == (word == word[::-1])


def test_word_list_files(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("apple\n\nbanana\ncherry\n", encoding="utf-8")
    assert load_words(path) == ["apple", "banana", "cherry"]
    path.write_text("apple\nbad word\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=re.escape(f"{path} line 2: expected one word per line")):
        load_words(path)
    with pytest.raises(TaskDataError, match="does not exist"):
        load_words(tmp_path / "missing.txt")
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"word{chr(97 + i % 26)}{i}" for i in range(200)), encoding="utf-8")
    task = SimpleSpelling(size=10, split="test", words=many)
    assert all(task[i]["messages"][1]["content"].startswith("word") for i in range(10))
    train_word = next(w for w in ("apple", "banana", "cherry", "grape", "lemon") if not is_held_out(w))
    with pytest.raises(TaskDataError, match="no test words among the 1 given"):
        SpellingBee(size=3, split="test", words=[train_word])


def test_word_list_download_is_cached_in_nanopipe_home(tmp_path, monkeypatch):
    served = []

    class Words(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            served.append(self.path)
            body = b"alpha\nbravo\ncharlie\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Words)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/lists/words_alpha.txt"
        path = download_word_list(url)
        assert path == tmp_path / "words" / "words_alpha.txt"
        assert read_word_file(download_word_list(url)) == ["alpha", "bravo", "charlie"]
        assert served == ["/lists/words_alpha.txt"]  # the second call used the cached file
    finally:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# Builtin generated tasks and mixture

def eval_calculator(expr: str) -> str:
    """What the calculator shows for a GSM8K-style expression (the test's own oracle)."""
    value = eval(expr, {"__builtins__": {}})  # trusted: expressions generated by our own code
    return str(int(value)) if float(value).is_integer() else str(value)


def test_arithmetic_problems_have_gsm8k_format_and_correct_tool_calls():
    task = ArithmeticProblems(size=300, seed=5)
    kinds = set()
    for i in range(len(task)):
        row = task.get_row(i)
        assert re.search(r"\n#### -?\d+$", row["answer"]) and "<<" in row["answer"]
        for expr, result in re.findall(r"<<([^=<>]+)=([^<>]+)>>", row["answer"]):
            assert eval_calculator(expr) == result, (expr, result)
        conversation = task[i]
        last_output = [p for p in conversation["messages"][1]["content"] if p["type"] == "python_output"][-1]["text"]
        assert reference_answer(conversation) == last_output  # the final answer is the last computation
        assert task.evaluate(conversation, f"#### {last_output}") == 1 and task.evaluate(conversation, "#### -1") == 0
        kinds.add(row["question"].split()[1])
    assert len(kinds) > 5


def test_some_arithmetic_problems_carry_numbers_the_answer_does_not_use():
    from nanopipe.tasks.word_problems import DISTRACTOR_SHARE, DISTRACTORS, HARD_SHARE, PROBLEM_KINDS

    task = ArithmeticProblems(size=400, seed=3)
    openings = tuple(d.split("{")[0] for d in DISTRACTORS if not d.startswith("{"))
    distracted, twice = 0, 0
    for i in range(len(task)):
        row = task.get_row(i)
        sentences = row["question"].split(". ")
        extra = [s for s in sentences if s.startswith(openings) or " also has " in s or "'s friend owns " in s]
        distracted += bool(extra)
        twice += len(extra) == 2
        bare = row["question"]
        for sentence in extra:
            bare = bare.replace(sentence, "")
        # a distracting number is never an operand of the solution's calculator calls (unless it happens to equal
        # one of the problem's own numbers or a result computed on the way)
        operands = {n for expr in re.findall(r"<<([^=<>]+)=", row["answer"]) for n in re.findall(r"\d+", expr)}
        known = set(re.findall(r"\d+", bare)) | set(re.findall(r"=(\d+)>>", row["answer"])) | {"2", "100"}
        for sentence in extra:
            number = re.search(r"\d+", sentence).group()
            assert number not in operands or number in known, row
    # the original kinds carry one with DISTRACTOR_SHARE, the harder ones always carry one or two
    expected = (1 - HARD_SHARE) * DISTRACTOR_SHARE + HARD_SHARE
    assert abs(distracted / len(task) - expected) < 0.1 and twice > 0.1 * HARD_SHARE * len(task)
    assert len(PROBLEM_KINDS) == 8


HARD_MARKERS = ("each, and pays with", "% off, then another", "machines. Each", "club sells")


def is_hard(row: dict) -> bool:
    """Is this word problem of one of the harder kinds (word_problems.HARD_PROBLEM_KINDS, one marker each)?"""
    return isinstance(row["question"], str) and any(marker in row["question"] for marker in HARD_MARKERS)


def test_harder_arithmetic_problems_replace_a_share_of_rows_and_leave_the_others_as_they_were():
    """The harder kinds (three or four calculator steps) are drawn after everything else, so a row that is not
    replaced is the row the generator gave without them: earlier seeds' problems stay reproducible."""
    import random

    from nanopipe.tasks.word_problems import HARD_PROBLEM_KINDS, HARD_SHARE, arithmetic_problem

    seeds = [f"Arithmetic/7/{i}/0" for i in range(400)]
    rows = [arithmetic_problem(random.Random(s)) for s in seeds]
    before = [arithmetic_problem(random.Random(s), hard_share=0.0) for s in seeds]
    changed = [(row, old) for row, old in zip(rows, before) if row != old]
    assert abs(len(changed) / len(rows) - HARD_SHARE) < 0.1
    for row, old in changed:  # every replaced row is a harder one: at least three calculator calls
        assert row["answer"].count("<<") >= 3 and row["question"] != old["question"], row
    assert len(HARD_PROBLEM_KINDS) == len(HARD_MARKERS)
    assert all(sum(marker in row["question"] for row, _ in changed) > 0.1 * len(changed) for marker in HARD_MARKERS)
    assert not any(is_hard(old) for old in before)
    assert all(is_hard(arithmetic_problem(random.Random(s), hard_share=1.0)) for s in seeds[:50])


def test_arithmetic_problems_take_the_share_of_harder_ones_they_are_given():
    default, short = ArithmeticProblems(300, "test", 4), ArithmeticProblems(300, "test", 4, hard_share=0.0)
    assert 0.4 < sum(is_hard(default.get_row(i)) for i in range(300)) / 300 < 0.6
    assert not any(is_hard(short.get_row(i)) for i in range(300))
    assert all(is_hard(row) for row in map(ArithmeticProblems(50, "train", 4, hard_share=1.0).get_row, range(50)))
    with pytest.raises(ValueError, match="hard_share must be in"):
        ArithmeticProblems(10, hard_share=1.5)


def test_restate_counts_opens_only_the_workshop_answers_with_their_count_and_changes_nothing_else():
    """restate_counts: the workshop problem's answer first restates the count of machines its question opens with;
    every question, and every other answer, is the one the generator gives without it (the same draws)."""
    plain = ArithmeticProblems(400, "train", 5, hard_share=1.0)
    restated = ArithmeticProblems(400, "train", 5, hard_share=1.0, restate_counts=True)
    workshops = 0
    for i in range(400):
        old, new = plain.get_row(i), restated.get_row(i)
        assert new["question"] == old["question"]
        if old["question"].startswith("A workshop has "):
            workshops += 1
            count = re.match(r"A workshop has (\d+) machines\.", old["question"]).group(1)
            assert new["answer"] == f"The workshop has {count} machines.\n" + old["answer"]
        else:
            assert new["answer"] == old["answer"]
    assert 50 < workshops < 150   # one of the four harder kinds
    default = ArithmeticProblems(100, "test", 5)
    assert all(not default.get_row(i)["answer"].startswith("The workshop has") for i in range(100))


def test_multiple_choice_quiz_has_mmlu_format():
    task = MultipleChoiceQuiz(size=200, seed=5)
    answers = Counter()
    for i in range(len(task)):
        row = task.get_row(i)
        assert set(row) == {"question", "subject", "choices", "answer"} and len(set(row["choices"])) == 4
        conversation = task[i]
        letter = "ABCD"[row["answer"]]
        assert conversation["messages"][1]["content"] == letter and conversation["letters"] == ("A", "B", "C", "D")
        assert f"- {row['choices'][row['answer']]}={letter}\n" in conversation["messages"][0]["content"]
        assert task.evaluate(conversation, letter) == 1 and task.evaluate(conversation, "ABCD"[row["answer"] - 1]) == 0
        answers[letter] += 1
    assert min(answers.values()) > 25  # the right answer is spread over all letters


def test_identity_chat_talks_about_nanopipe():
    task = IdentityChat(size=100, seed=0)
    assert task.eval_type is None
    text = " ".join(m["content"] for c in task for m in c["messages"])
    assert "nanopipe" in text
    for conversation in task:
        normalize_messages(conversation)
        assert conversation["messages"][-1]["role"] == "assistant"


def test_builtin_generators_are_deterministic_and_splits_disjoint():
    def keys(task):
        return {json.dumps(c, sort_keys=True) for c in task}
    for cls in (IdentityChat, ArithmeticProblems, MultipleChoiceQuiz):
        train, again = cls(size=300, split="train", seed=1), cls(size=300, split="train", seed=1)
        assert list(train) == list(again) and list(train) != list(cls(size=300, split="train", seed=2))
        val = cls(size=100, split="val", seed=1)
        assert not keys(train) & keys(val), cls.__name__
        other_seed_val = cls(size=100, split="val", seed=9)
        assert not keys(train) & keys(other_seed_val), cls.__name__


def test_builtin_mixture_is_deterministic_and_upweights_identity():
    tasks = builtin_chat_tasks("train", seed=3, size=40)
    assert tasks[0] is tasks[1] and len(tasks) == 6
    mixture = builtin_chat_mixture("train", seed=3, size=40)
    assert len(mixture) == 240
    assert list(mixture) == list(builtin_chat_mixture("train", seed=3, size=40))
    assert [mixture[i] for i in range(20)] != [builtin_chat_mixture("train", seed=4, size=40)[i] for i in range(20)]
    counts = Counter(json.dumps(mixture[i], sort_keys=True) for i in range(len(mixture)))
    identity = {json.dumps(c, sort_keys=True) for c in IdentityChat(40, "train", 3)}
    assert sum(counts[k] for k in identity) == 80  # listed twice, seen twice
    train_keys = set(counts)
    assert not train_keys & {json.dumps(c, sort_keys=True) for c in builtin_chat_mixture("val", seed=3, size=40)}


# -----------------------------------------------------------------------------
# Slicing, mixtures, sequences, the registry

class Numbers(Task):
    eval_type = "generative"

    def __init__(self, n, tag="n", **slicing):
        super().__init__(**slicing)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"},
                             {"role": "assistant", "content": str(index)}]}

    def evaluate(self, conversation, completion):
        return int(completion == conversation["messages"][1]["content"])


def contents(task):
    return [c["messages"][0]["content"] for c in task]


def test_slicing_follows_python_semantics():
    task = Numbers(20)
    reference = [f"n{i}" for i in range(20)]
    for s in (slice(2, 10, 3), slice(None, None, 5), slice(-5, None), slice(15, 100), slice(None, None, -1),
              slice(10, 2, -2)):
        assert contents(task[s]) == reference[s]
    assert contents(task[5:15][::2][1:]) == reference[5:15][::2][1:]
    assert contents(Numbers(20, start=3, stop=12, step=4)) == reference[3:12:4]
    assert task[-1]["messages"][0]["content"] == "n19"
    with pytest.raises(IndexError, match="out of range for 20"):
        task[20]
    with pytest.raises(TypeError, match="integers or slices"):
        task["3"]
    import torch
    assert task[torch.tensor(4)] == task[4]
    view = task[::2]
    assert view.eval_type == "generative" and view.evaluate(view[1], "2") == 1 and view.reward(view[1], "3") == 0.0
    with pytest.raises(ValueError, match="step"):
        Numbers(5, step=0)


def test_task_mixture_is_a_deterministic_shuffle():
    a, b = Numbers(30, "a"), Numbers(10, "b")
    mixture = TaskMixture([a, b, b], seed=1)
    assert len(mixture) == 50
    assert sorted(contents(mixture)) == sorted(contents(a) + contents(b) * 2)
    assert contents(mixture) == contents(TaskMixture([a, b, b], seed=1))
    assert contents(mixture) != contents(TaskMixture([a, b, b], seed=2))
    assert contents(mixture) != sorted(contents(mixture))  # actually mixed
    first_half = contents(mixture[:25])
    assert any(x.startswith("a") for x in first_half) and any(x.startswith("b") for x in first_half)
    task, local = mixture.locate(0)
    assert task[local] == mixture[0]
    with pytest.raises(TypeError, match="training data only"):
        mixture.evaluate(mixture[0], "0")


def test_task_sequence_keeps_order():
    sequence = TaskSequence([Numbers(3, "a"), Numbers(2, "b")])
    assert contents(sequence) == ["a0", "a1", "a2", "b0", "b1"]
    assert contents(sequence[1:4]) == ["a1", "a2", "b0"]


def test_build_task_registry(words):
    with pytest.raises(ValueError, match="unknown task 'Nope'; valid: ARC-Easy"):
        build_task("Nope")
    for name in OFFLINE_EVAL_TASKS:
        task = build_task(name, "test", size=5)
        assert name in TASK_NAMES and len(task) == 5 and task.eval_type in ("categorical", "generative")
    assert build_task("MultipleChoice", "test", size=5).chance_accuracy == 0.25
