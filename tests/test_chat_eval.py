"""chat_eval and chat_cli on a tiny checkpoint: every task end to end on local files, exact multiple-choice
and generative scoring with crafted models, ChatCORE, two ranks under torchrun equal one process, flag
errors; the terminal chat one-shot (subprocess), multi-turn rendering and the calculator."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanopipe.chat_format import render_conversation, render_for_completion
from nanopipe.checkpoint import save_checkpoint
from nanopipe.engine import Engine
from nanopipe.gpt import GPT, build_model_config
from nanopipe.stages import chat_cli, chat_eval
from nanopipe.stages.chat_cli import ChatSession, interactive
from nanopipe.configs.chat_eval import CHATCORE_TASKS, SHORT_FLAGS, ChatEvalConfig
from nanopipe.configs.flags import parse_config
from nanopipe.chat_scoring import chatcore, evaluate_categorical, evaluate_generative
from nanopipe.tasks import build_task
from nanopipe.tasks.gsm8k import reference_answer
from nanopipe.tokenizer import Tokenizer
from tests.test_engine import ScriptedModel

REPO = Path(__file__).resolve().parents[1]
TEXT = ["Multiple choice question: which planet is red? Mars=A Venus=B. Answer with the letter. "
        "Tom has 3 apples and buys 4 more, so he has 3+4=7 apples. #### 7 "
        "def add(a, b):\n    return a + b\n How many r are in strawberry? " * 6]

ARC_ROWS = [
    {"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C", "D"]}, "answerKey": k}
    for i, (q, c, k) in enumerate([
        ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
        ("What melts ice fastest?", ["salt", "sand", "paper", "wood"], "A"),
        ("Which is a mammal?", ["shark", "frog", "whale", "trout"], "C"),
        ("What makes a shadow?", ["blocked light", "sound", "heat", "wind"], "A"),
        ("Which is hardest?", ["chalk", "talc", "gypsum", "diamond"], "D"),
    ])]
MMLU_ROWS = [
    {"question": q, "subject": "misc", "choices": c, "answer": a}
    for q, c, a in [("2 + 2 = ?", ["3", "4", "5", "6"], 1), ("Capital of France?", ["Paris", "Rome", "Oslo", "Bern"], 0),
                    ("H2O is?", ["salt", "sugar", "water", "air"], 2), ("Largest ocean?", ["Arctic", "Indian",
                     "Atlantic", "Pacific"], 3), ("3 * 3 = ?", ["6", "9", "12", "8"], 1)]]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?",
     "answer": "There are 6*5=<<6*5=30>>30 eggs.\n#### 30"},
    {"question": "Ann had 20 dollars and spent 8. How much is left?",
     "answer": "She has 20-8=<<20-8=12>>12 dollars left.\n#### 12"},
]
HUMANEVAL_ROWS = [
    {"task_id": "Local/0", "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
    {"task_id": "Local/1", "prompt": 'def first(xs: list):\n    """First element, or None."""\n',
     "canonical_solution": "    return xs[0] if xs else None\n", "entry_point": "first",
     "test": "def check(candidate):\n    assert candidate([4, 5]) == 4\n    assert candidate([]) is None\n"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tokenizer directory and a depth-2, width-64 GPT checkpoint (random weights, scaled up so that
    greedy choices are far from ties), as a training stage would leave them."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = Tokenizer.train_from_iterator(TEXT, vocab_size=320)
    tokenizer.save(root / "tokenizer")
    torch.manual_seed(0)
    config = build_model_config(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=256,
                                vocab_size=tokenizer.get_vocab_size())
    model = GPT.create(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_dir": str(root / "tokenizer")}
    save_checkpoint(root / "ckpt" / "d2", 5, model.state_dict(), None, meta)
    data = root / "data"
    data.mkdir()
    paths = {"arc": write_jsonl(data / "arc.jsonl", ARC_ROWS), "mmlu": write_jsonl(data / "mmlu.jsonl", MMLU_ROWS),
             "gsm8k": write_jsonl(data / "gsm8k.jsonl", GSM8K_ROWS),
             "humaneval": write_jsonl(data / "humaneval.jsonl", HUMANEVAL_ROWS)}
    return {"dir": root / "ckpt" / "d2", "model": model.eval(), "tokenizer": tokenizer, "paths": paths, "root": root}


def eval_args(checkpoint, out_dir, *extra):
    p = checkpoint["paths"]
    return [f"--checkpoint_dir={checkpoint['dir']}", "--device_type=cpu", f"--out_dir={out_dir}",
            f"--arc_easy_path={p['arc']}", f"--arc_challenge_path={p['arc']}", f"--mmlu_path={p['mmlu']}",
            f"--gsm8k_path={p['gsm8k']}", f"--humaneval_path={p['humaneval']}", "--max_new_tokens=12",
            "--synthetic_size=8", "--max_problems=4", "--batch_size=3", *extra]


# -----------------------------------------------------------------------------
# chat_eval

def test_chat_eval_end_to_end_on_every_task(checkpoint, tmp_path, home):
    tasks = list(CHATCORE_TASKS) + ["Arithmetic", "MultipleChoice"]
    metrics = chat_eval.main(eval_args(checkpoint, tmp_path / "out", "--task=" + ",".join(tasks)))
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["chatcore"] == pytest.approx(metrics["chatcore"]) and "chatcore_partial" not in written
    # nanochat's ChatCORE: its six tasks only, the builtin ones left out
    assert written["chatcore_tasks"] == list(CHATCORE_TASKS) and written["chatcore_complete"] is True
    expected_totals = {**{name: 4 for name in tasks}, "HumanEval": 2, "GSM8K": 3}
    for name in tasks:
        result = written["tasks"][name]
        assert result["total"] == expected_totals[name], name
        assert 0 <= result["passed"] <= result["total"]
        assert result["accuracy"] == pytest.approx(result["passed"] / result["total"])
        assert result["chance_accuracy"] == (0.25 if name in ("ARC-Easy", "ARC-Challenge", "MMLU", "MultipleChoice")
                                             else 0.0)
        assert result["problems_per_second"] > 0
    centered = [(written["accuracy"][n] - written["tasks"][n]["chance_accuracy"])
                / (1 - written["tasks"][n]["chance_accuracy"]) for n in CHATCORE_TASKS]
    assert written["chatcore"] == pytest.approx(sum(centered) / len(centered))
    assert math.isfinite(written["chatcore"]) and written["step"] == 5
    # GSM8K-format answers report their format rate; '#### N' tasks the score of always giving the commonest answer
    for name in ("Arithmetic", "GSM8K"):
        assert 0 <= written["tasks"][name]["format_passed"] <= written["tasks"][name]["total"]
    for name in ("Arithmetic", "GSM8K", "SpellingBee"):
        assert 0 < written["tasks"][name]["majority_answer_rate"] <= 1
    assert "format_passed" not in written["tasks"]["SpellingBee"]
    # generative tasks show their recorded answers; multiple choice its first problems, 5 over all 8 tasks
    # round-robin (ARC-Easy, ARC-Challenge and MMLU come first)
    assert {s["task"] for s in written["samples"]} >= {"Arithmetic", "GSM8K", "ARC-Easy", "MMLU"}
    assert "MultipleChoice" not in {s["task"] for s in written["samples"]}


def test_generative_record_counts_the_answer_format_and_keeps_right_and_wrong_answers():
    task = build_task("Arithmetic", size=8)
    record = chat_eval.GenerativeRecord("Arithmetic", shown_each=2)
    for i in range(len(task)):
        conversation = task[i]
        right = i % 3 == 0   # problems 0, 3, 6 right
        answer = reference_answer(conversation) if right else "-1"
        text = (f"It is <|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>4.\n#### {answer}"
                if i % 2 == 0 else f"#### {answer}")   # even problems use the calculator
        record(i, conversation, [text], right)
    assert record.in_format == 4
    samples = record.samples()
    assert [(s["index"], s["correct"]) for s in samples] == [(0, True), (3, True), (1, False), (2, False)]
    assert samples[0]["question"] == task[0]["messages"][0]["content"] and "<<" in samples[0]["reference"]
    assert chat_eval.in_answer_format("<|python_start|>1+1<|python_end|>\n#### 2")
    assert not chat_eval.in_answer_format("#### 2") and not chat_eval.in_answer_format("<|python_start|>1+1")


def test_majority_answer_is_the_commonest_reference_answer():
    spelling = build_task("SpellingBee", size=200)
    result = chat_eval.majority_answer(spelling, 200)
    answers = [reference_answer(spelling[i]) for i in range(200)]
    assert result["majority_answer"] == max(set(answers), key=answers.count)
    assert result["majority_answer_rate"] == answers.count(result["majority_answer"]) / 200


def test_chatcore_is_centred_on_chance():
    chance = {"MMLU": 0.25, "GSM8K": 0.0}
    assert chatcore({"MMLU": 0.25, "GSM8K": 0.0}, chance) == 0.0
    assert chatcore({"MMLU": 1.0, "GSM8K": 1.0}, chance) == 1.0
    assert chatcore({"MMLU": 0.625, "GSM8K": 0.25}, chance) == pytest.approx((0.5 + 0.25) / 2)


class LetterModel(torch.nn.Module):
    """Always prefers one token at every position (here: the letter 'A')."""

    def __init__(self, gpt, token):
        super().__init__()
        self.gpt, self.token = gpt, token

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None):
        logits = self.gpt(idx, kv_cache=kv_cache)
        return logits.index_fill(-1, torch.tensor([self.token]), 100.0)


def test_multiple_choice_scoring_reads_the_letter_logits(checkpoint):
    model, tokenizer = checkpoint["model"], checkpoint["tokenizer"]
    task = build_task("MultipleChoice", size=24)
    always_a = LetterModel(model, tokenizer.encode("A")[0])
    expected = sum(task[i]["messages"][-1]["content"] == "A" for i in range(len(task)))
    assert 0 < expected < len(task)
    assert evaluate_categorical(task, always_a, tokenizer, len(task), batch_size=5) == (expected, len(task))
    # right-padding a batch does not change any prediction
    counts = {evaluate_categorical(task, model, tokenizer, len(task), batch_size=b) for b in (1, 5, 24)}
    assert len(counts) == 1
    # ranks split the batches without overlap
    halves = [evaluate_categorical(task, always_a, tokenizer, len(task), 5, rank=r, world_size=2) for r in (0, 1)]
    assert (sum(h[0] for h in halves), sum(h[1] for h in halves)) == (expected, len(task))


def test_generative_scoring_checks_the_final_answer(checkpoint):
    model, tokenizer = checkpoint["model"], checkpoint["tokenizer"]
    task = build_task("Arithmetic", size=6)
    engine = Engine(ScriptedModel(model, None), tokenizer)
    answers = {}
    for i in range(len(task)):  # problems 0, 2, 4 get the right answer, 1, 3, 5 a wrong one
        conversation = task[i]
        value = int(reference_answer(conversation)) + (0 if i % 2 == 0 else 1)
        answers[tuple(render_for_completion(tokenizer, conversation))] = (
            tokenizer.encode(f"The answer is\n#### {value}") + [engine.assistant_end])

    def policy(row, history):
        for prompt, answer in answers.items():
            if tuple(history[:len(prompt)]) == prompt:
                return answer[len(history) - len(prompt)]
        raise AssertionError("unknown prompt")

    engine.model.policy = policy
    assert evaluate_generative(task, engine, tokenizer, len(task), num_samples=2, max_new_tokens=32,
                               temperature=1.0, top_k=None, seed=0) == (3, 6)


def test_two_ranks_under_torchrun_match_one_process(checkpoint, tmp_path):
    common = eval_args(checkpoint, tmp_path / "one", "--task=MultipleChoice,Arithmetic", "--max_problems=7")
    single = chat_eval.main(common)
    env = {**os.environ, "NANOPIPE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    two = [a if not a.startswith("--out_dir=") else f"--out_dir={tmp_path / 'two'}" for a in common]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nanopipe.stages.chat_eval", *two],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    for name in ("MultipleChoice", "Arithmetic"):
        one, two_ranks = single["tasks"][name], metrics["tasks"][name]
        assert one["total"] == 7
        assert (two_ranks["passed"], two_ranks["total"]) == (one["passed"], one["total"])
    assert metrics["chatcore"] is None and metrics["chatcore_partial"] == pytest.approx(single["chatcore_partial"])


@pytest.mark.parametrize("argv, needle", [
    (["--task=ARC-Easy,Nope"], "--task"),
    (["--task=GSM8K", "--gsm8k_path=/nonexistent/gsm8k.jsonl"], "--gsm8k_path"),
    (["--num_samples=0"], "--num_samples"),
    (["--temperature=-1"], "--temperature"),
])
def test_bad_flags_fail_before_any_work(argv, needle, capsys, home):
    with pytest.raises(SystemExit) as exit_info:
        chat_eval.main(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_top_k_accepts_the_disabled_spellings():
    assert parse_config(ChatEvalConfig, ["--top_k=-1"]).top_k is None
    assert parse_config(ChatEvalConfig, ["--top_k=none"]).top_k is None
    assert parse_config(ChatEvalConfig, ["--top_k=5"]).top_k == 5


def test_real_gsm8k_rows_evaluate(checkpoint, shared_dir, tmp_path, home):
    metrics = chat_eval.main(eval_args(checkpoint, tmp_path, "--task=GSM8K", "--max_problems=2",
                                       f"--gsm8k_path={shared_dir / 'data' / 'gsm8k'}"))
    assert metrics["tasks"]["GSM8K"]["total"] == 2 and metrics["chatcore_complete"] is False
    assert metrics["chatcore"] is None and metrics["chatcore_partial"] == metrics["accuracy"]["GSM8K"]
    assert metrics["chatcore_tasks"] == ["GSM8K"]


def test_partial_chatcore_has_its_own_name():
    accuracies = {"ARC-Easy": 0.5, "GSM8K": 0.1, "Arithmetic": 0.3}
    chance = {"ARC-Easy": 0.25, "GSM8K": 0.0, "Arithmetic": 0.0}
    metrics = chat_eval.chatcore_metrics(accuracies, chance)
    assert metrics["chatcore"] is None and metrics["chatcore_complete"] is False
    assert metrics["chatcore_partial"] == pytest.approx((1 / 3 + 0.1 + 0.3) / 3)
    line = chat_eval.chatcore_line(metrics)
    assert line.startswith("ChatCORE (partial: 2 of 6 tasks) over ARC-Easy, GSM8K, Arithmetic: ")
    six = chat_eval.chatcore_metrics({**{name: 1.0 for name in CHATCORE_TASKS}, "Arithmetic": 0.0},
                                     {**{name: 0.25 for name in CHATCORE_TASKS}, "Arithmetic": 0.0})
    assert six == {"chatcore": 1.0, "chatcore_tasks": list(CHATCORE_TASKS), "chatcore_complete": True}
    assert chat_eval.chatcore_line(six).startswith("ChatCORE over ARC-Easy, ARC-Challenge, MMLU,")


@pytest.mark.parametrize("argv, expected", [
    (["-i", "mid"], {"source": "mid", "task": list(CHATCORE_TASKS)}),
    (["-i", "rl", "-a", "GSM8K"], {"source": "rl", "task": ["GSM8K"]}),
    (["-i", "sft", "-a", "ARC-Easy|GSM8K", "-x", "200", "-s", "700", "-g", "d20"],
     {"task": ["ARC-Easy", "GSM8K"], "max_problems": 200, "model_step": 700, "model_tag": "d20"}),
    (["-i", "sft", "-t", "0.7", "-n", "4", "-k", "20", "-b", "16", "-m", "256", "-d", "float32"],
     {"temperature": 0.7, "num_samples": 4, "top_k": 20, "batch_size": 16, "max_new_tokens": 256,
      "dtype": "float32"}),
    (["--source", "sft", "--task-name", "MMLU|ARC-Challenge", "--step", "3", "--max-problems", "5",
      "--device-type", "cpu"], {"task": ["MMLU", "ARC-Challenge"], "model_step": 3, "max_problems": 5,
                                "device_type": "cpu"}),
    (["--task=ARC-Easy,GSM8K", "--gsm8k_lenient", "--extended_calculator"],
     {"task": ["ARC-Easy", "GSM8K"], "gsm8k_lenient": True, "extended_calculator": True}),
])
def test_nanochats_command_lines_parse(argv, expected):
    """nanochat's chat_eval flags (short ones, '|' between tasks) beside ours."""
    cfg = parse_config(ChatEvalConfig, argv, short_aliases=SHORT_FLAGS)
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert (cfg.gsm8k_lenient, cfg.extended_calculator) == (expected.get("gsm8k_lenient", False),
                                                            expected.get("extended_calculator", False))


# -----------------------------------------------------------------------------
# chat_cli

def test_chat_cli_one_shot_answers_in_a_subprocess(checkpoint, tmp_path):
    prompt = "How many r are in strawberry?"
    session = ChatSession(Engine(checkpoint["model"], checkpoint["tokenizer"]), max_new_tokens=20,
                          temperature=0.0, top_k=None)
    expected = session.ask(prompt)
    assert expected, "the fixture model should answer something at all"
    env = {**os.environ, "NANOPIPE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanopipe.stages.chat_cli", f"--checkpoint_dir={checkpoint['dir']}",
                           "-p", prompt, "-t", "0", "--max_new_tokens=20", "--device_type=cpu",
                           f"--out_dir={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.endswith(expected + "\n")
    transcript = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert transcript["messages"][0] == {"role": "user", "content": prompt}
    assert transcript["turns"] == 1


def test_chat_session_renders_every_turn_with_special_tokens(checkpoint):
    tokenizer = checkpoint["tokenizer"]
    session = ChatSession(Engine(checkpoint["model"], tokenizer), max_new_tokens=8, temperature=0.0)
    first = session.ask("hello there")
    second = session.ask("and again")
    assert first and second, "the fixture model should answer something at all"
    assert tokenizer.decode(render_conversation(tokenizer, {"messages": session.messages}, max_tokens=None)[0]) == (
        f"<|bos|><|user_start|>hello there<|user_end|><|assistant_start|>{first}<|assistant_end|>"
        f"<|user_start|>and again<|user_end|><|assistant_start|>{second}<|assistant_end|>")
    session.ask("third")
    assert tokenizer.decode(session.prompt_tokens()).startswith("<|bos|><|user_start|>hello there<|user_end|>")
    session.clear()
    assert session.messages == []
    session.ask("fresh start")
    assert tokenizer.decode(session.prompt_tokens()).startswith("<|bos|><|user_start|>fresh start<|user_end|>")


def test_calculator_works_in_the_chat(checkpoint):
    tokenizer = checkpoint["tokenizer"]
    engine = Engine(ScriptedModel(checkpoint["model"], None), tokenizer)
    reply = [engine.python_start, *tokenizer.encode("12*31"), engine.python_end]
    tail = tokenizer.encode(" so 372.") + [engine.assistant_end]

    def policy(row, history):
        # answer each user turn afresh: find the last <|assistant_start|> and continue the script from it
        start = len(history) - history[::-1].index(tokenizer.encode_special("<|assistant_start|>"))
        generated = history[start:]
        if engine.output_end in generated:
            return tail[len(generated) - generated.index(engine.output_end) - 1]
        return reply[len(generated)] if len(generated) < len(reply) else tokenizer.encode("0")[0]

    engine.model.policy = policy
    session = ChatSession(engine, max_new_tokens=40, temperature=0.0)
    pieces = []
    answer = session.ask("What is 12 times 31?", on_text=pieces.append)
    assert answer == "<|python_start|>12*31<|python_end|><|output_start|>372<|output_end|> so 372."
    assert "".join(pieces) == answer
    assert session.messages[-1]["content"] == [
        {"type": "python", "text": "12*31"}, {"type": "python_output", "text": "372"},
        {"type": "text", "text": " so 372."}]
    session.ask("Again?")
    rendered = tokenizer.decode(render_conversation(tokenizer, {"messages": session.messages}, max_tokens=None)[0])
    assert rendered.count("<|python_start|>12*31<|python_end|><|output_start|>372<|output_end|> so 372.") == 2


def test_interactive_loop_clears_and_quits(checkpoint, monkeypatch, capsys):
    session = ChatSession(Engine(checkpoint["model"], checkpoint["tokenizer"]), max_new_tokens=4, temperature=0.0)
    lines = iter(["first question", "", "clear", "second question", "quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    messages = interactive(session)
    assert messages[0] == {"role": "user", "content": "second question"}
    assert session.turns == 2
    assert next(lines) == "never read"
    assert "Conversation cleared." in capsys.readouterr().out


def test_chat_cli_flags():
    cfg = parse_config(chat_cli.ChatCliConfig, ["-p", "hi", "-t", "0", "-k", "-1"],
                       short_aliases=chat_cli.SHORT_FLAGS)
    assert (cfg.prompt, cfg.temperature, cfg.top_k, cfg.source) == ("hi", 0.0, None, "sft")
