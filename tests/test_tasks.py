"""Tasks: every loader on local files in the real schemas, the hub path through a local HTTP endpoint,
GSM8K tool-call parsing on the real data, evaluation and rewards."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.chat_format import normalize_messages
from nanopipe.tasks import ARC, GSM8K, MMLU, CustomJSON, HumanEval, SmolTalk, TaskDataError
from nanopipe.tasks.gsm8k import extract_final_answer, parse_calculator_annotations, reference_answer
from nanopipe.tasks.humaneval import build_program, extract_imports, extract_program
from nanopipe.tasks.sources import datasets_permutation

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gsm8k_dir() -> Path:
    """The real GSM8K in ../shared/data/gsm8k beside the repo (skipped where that folder is absent)."""
    path = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
    if not (path / "test.jsonl").is_file():
        pytest.skip(f"shared GSM8K not found at {path} (the ../shared folder beside the repo)")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# Rows in the real schemas of the hub datasets (contents written for these tests).
MMLU_ROWS = [
    {"question": "What is 2 + 3?", "subject": "elementary_mathematics", "choices": ["4", "5", "6", "7"], "answer": 1},
    {"question": "Which gas do plants take in?", "subject": "high_school_biology",
     "choices": ["Oxygen", "Helium", "Carbon dioxide", "Neon"], "answer": 2},
    {"question": "A byte has how many bits?", "subject": "computer_security", "choices": ["8", "4", "16", "2"],
     "answer": 0},
]
ARC_ROWS = [
    {"id": "Q1", "question": "Which is a liquid at room temperature?",
     "choices": {"text": ["ice", "water", "steam", "iron"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "Q2", "question": "What do roots take up?",
     "choices": {"text": ["light", "water", "sound"], "label": ["1", "2", "3"]}, "answerKey": "2"},
]
SMOLTALK_ROWS = [
    {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}], "source": "test"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}], "source": "test"},
]
HUMANEVAL_ROWS = [
    {"task_id": "Test/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
                                    "    \"\"\"Sum of xs.\n    >>> total([1, 2])\n    3\n    \"\"\"\n",
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
     "entry_point": "total"},
]


# -----------------------------------------------------------------------------
# GSM8K on the real data

def test_gsm8k_real_rows_parse_into_tool_calls(gsm8k_dir):
    for split, expected in (("train", 7473), ("test", 1319)):
        rows = [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(rows) == expected
        for row in rows:
            parts = parse_calculator_annotations(row["answer"])
            # the parts put back together give the original solution, annotation for annotation
            rebuilt, i = "", 0
            while i < len(parts):
                if parts[i]["type"] == "python":
                    assert parts[i + 1]["type"] == "python_output"
                    rebuilt += f"<<{parts[i]['text']}={parts[i + 1]['text']}>>"
                    i += 2
                else:
                    rebuilt += parts[i]["text"]
                    i += 1
            assert rebuilt == row["answer"]
            assert parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
            assert all(p["text"] for p in parts if p["type"] != "python_output")


def test_gsm8k_task_from_local_files(gsm8k_dir):
    task = GSM8K(split="test", data_path=gsm8k_dir)
    assert len(task) == 1319 and task.eval_type == "generative"
    unshuffled = GSM8K(split="test", data_path=gsm8k_dir, shuffle_seed=None)
    first = json.loads((gsm8k_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    conversation = unshuffled[0]
    assert conversation["messages"][0] == {"role": "user", "content": first["question"]}
    assert conversation["messages"][1]["content"][:4] == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "}, {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"}, {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"}]
    # shuffling is a fixed permutation of the same rows
    again = GSM8K(split="test", data_path=gsm8k_dir / "test.jsonl")
    assert [task[i] for i in range(5)] == [again[i] for i in range(5)] != [unshuffled[i] for i in range(5)]
    assert sorted(json.dumps(task[i]) for i in range(len(task))) == \
        sorted(json.dumps(unshuffled[i]) for i in range(len(unshuffled)))


def test_hub_tasks_are_shuffled_as_datasets_shuffles_them(gsm8k_dir, tmp_path):
    """nanochat loads each hub split with `.shuffle(seed=42)`: numpy's generator, whose permutation of 10 rows
    starts 5, 6, 0 (Python's random.Random(42) would start 7, 3, 2), and of GSM8K's 1,319 test rows 30, 754."""
    assert datasets_permutation(10, 42) == [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
    rows = [{"question": f"question {i}", "answer": f"so {i}\n#### {i}"} for i in range(10)]
    task = GSM8K("main", "test", data_path=write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows))
    assert [task[i]["messages"][0]["content"] for i in range(4)] == [f"question {i}" for i in (5, 6, 0, 7)]
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(10)]
    smoltalk = SmolTalk("train", data_path=write_jsonl(tmp_path / "smoltalk" / "train.jsonl", chats), stop=3)
    assert [c["messages"][0]["content"] for c in smoltalk] == ["hi 5", "hi 6", "hi 0"]
    real = GSM8K("main", "test", data_path=gsm8k_dir)
    stored = GSM8K("main", "test", data_path=gsm8k_dir, shuffle_seed=None)
    assert [real[i] for i in range(2)] == [stored[30], stored[754]]


def test_gsm8k_evaluate_and_reward(gsm8k_dir):
    task = GSM8K(split="train", data_path=gsm8k_dir, stop=200)
    for conversation in task:
        answer = reference_answer(conversation)
        assert answer is not None and re.fullmatch(r"-?[0-9.]+", answer)
        assert task.evaluate(conversation, f"some work\n#### {answer}") == 1
        assert task.reward(conversation, f"#### {answer}") == 1.0
        assert task.evaluate(conversation, f"#### {int(float(answer)) + 1}") == 0
        assert task.reward(conversation, "I don't know") == 0.0
    conversation = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": [{"type": "text", "text": "x\n#### 1,200"}]}]}
    assert task.evaluate(conversation, "#### 1200") == 1 and task.evaluate(conversation, "#### 1,2,00") == 1
    assert task.evaluate(conversation, "#### 120") == 0
    # nanochat's exact match: these score 0 by default, 1 with the lenient option
    lenient = GSM8K(split="train", data_path=gsm8k_dir, stop=1, lenient=True)
    for near_miss in ("#### 1,200.00", "####1200", "#### 1200.", "####  1200"):
        assert (task.evaluate(conversation, near_miss), lenient.evaluate(conversation, near_miss)) == (0, 1)


@pytest.mark.parametrize("text, expected, lenient", [
    ("#### 18", "18", "18"), ("so\n#### -3", "-3", "-3"), ("#### 1,000", "1000", "1000"), ("#### 2.5", "2.5", "2.5"),
    ("#### 7.", "7.", "7"), ("####42", None, "42"), ("no marker 42", None, None), ("#### abc", None, None),
    ("#### 1\n#### 2", "1", "1"), ("#### 18.00", "18.00", "18.00"), ("#### ,", "", None),
])
def test_extract_final_answer(text, expected, lenient):
    assert extract_final_answer(text) == expected and extract_final_answer(text, lenient=True) == lenient


def test_gsm8k_rejects_bad_arguments_and_rows(tmp_path):
    with pytest.raises(ValueError, match="split must be one of train, test"):
        GSM8K(split="validation", data_path=tmp_path)
    bad = write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    task = GSM8K(split="test", data_path=tmp_path, shuffle_seed=None)
    assert task[0]["messages"][0]["content"] == "q"
    with pytest.raises(TaskDataError, match=re.escape(f"{bad} line 2: missing field(s) ['answer']")):
        task[1]
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=re.escape(f"{bad} line 2: invalid JSON")):
        GSM8K(split="test", data_path=tmp_path)


# -----------------------------------------------------------------------------
# Local loaders in the real schemas

def test_mmlu_local_parquet_in_hub_layout(tmp_path):
    write_parquet(tmp_path / "all" / "test-00000-of-00001.parquet", MMLU_ROWS)
    write_parquet(tmp_path / "all" / "auxiliary_train-00000-of-00001.parquet", MMLU_ROWS[:2])
    task = MMLU("all", "test", data_path=tmp_path, shuffle_seed=None)
    assert len(task) == 3 and task.eval_type == "categorical" and task.chance_accuracy == 0.25
    conversation = task[1]
    assert conversation["letters"] == ("A", "B", "C", "D") and conversation["subject"] == "high_school_biology"
    assert conversation["messages"][1] == {"role": "assistant", "content": "C"}
    assert "- Carbon dioxide=C\n" in conversation["messages"][0]["content"]
    assert task.evaluate(conversation, "C") == 1 and task.evaluate(conversation, " C\n") == 1
    assert task.evaluate(conversation, "A") == 0 and task.reward(conversation, "B") == 0.0
    assert len(MMLU("all", "auxiliary_train", data_path=tmp_path)) == 2


def test_mmlu_auxiliary_train_unwraps_the_hub_nesting(tmp_path):
    write_jsonl(tmp_path / "auxiliary_train" / "train.jsonl", [{"train": row} for row in MMLU_ROWS])
    task = MMLU("auxiliary_train", "train", data_path=tmp_path, shuffle_seed=None)
    assert [c["messages"][1]["content"] for c in task] == ["B", "C", "A"]
    with pytest.raises(ValueError, match="has splits train"):
        MMLU("auxiliary_train", "test", data_path=tmp_path)


def test_mmlu_bad_answer_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [MMLU_ROWS[0], dict(MMLU_ROWS[1], answer=7)])
    task = MMLU("all", "test", data_path=path, shuffle_seed=None)
    with pytest.raises(TaskDataError, match=re.escape(f"{path} line 2: MMLU rows need 4 choices")):
        task[1]


def test_arc_local_jsonl_keeps_its_labels(tmp_path):
    write_jsonl(tmp_path / "ARC-Challenge" / "validation.jsonl", ARC_ROWS)
    task = ARC("ARC-Challenge", "validation", data_path=tmp_path, shuffle_seed=None)
    assert len(task) == 2 and task.name == "ARC-Challenge"
    numeric = task[1]
    assert numeric["letters"] == ("1", "2", "3") and numeric["messages"][1]["content"] == "2"
    assert numeric["messages"][0]["content"].splitlines()[1:4] == ["- light=1", "- water=2", "- sound=3"]
    assert task.evaluate(numeric, "2") == 1 and task.evaluate(numeric, "B") == 0
    bad = write_jsonl(tmp_path / "bad" / "test.jsonl", [dict(ARC_ROWS[0], answerKey="E")])
    with pytest.raises(TaskDataError, match=re.escape(f"{bad} line 1: answerKey 'E'")):
        ARC("ARC-Easy", "test", data_path=bad)[0]


def test_smoltalk_local_parquet(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", SMOLTALK_ROWS)
    task = SmolTalk("train", data_path=tmp_path, shuffle_seed=None)
    assert len(task) == 2 and task.eval_type is None
    assert task[0]["messages"][0] == {"role": "system", "content": "You are helpful."}
    assert normalize_messages(task[0])[0]["content"] == "You are helpful.\n\nHi"
    assert len(task[1]["messages"]) == 4
    with pytest.raises(TypeError, match="training data only"):
        task.evaluate(task[0], "Hello!")
    bad = write_parquet(tmp_path / "bad" / "test-00000-of-00001.parquet", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "source": "x"}])
    with pytest.raises(TaskDataError, match=re.escape(f"{bad} row 0: message 1: role 'user'")):
        SmolTalk("test", data_path=tmp_path / "bad")[0]


def test_humaneval_local_rows_and_program(tmp_path):
    write_jsonl(tmp_path / "openai_humaneval" / "test.jsonl", HUMANEVAL_ROWS)
    task = HumanEval(data_path=tmp_path)
    conversation = task[0]
    assert conversation["entry_point"] == "total" and conversation["task_id"] == "Test/0"
    assert conversation["messages"][1]["content"].endswith("    return sum(xs)\n")
    assert extract_imports(HUMANEVAL_ROWS[0]["prompt"]) == "from typing import List"
    fenced = "Here you go:\n```python\ndef total(xs):\n    return sum(xs)\n```\nDone."
    assert extract_program(fenced) == "def total(xs):\n    return sum(xs)"
    program = build_program(conversation, fenced)
    assert program.startswith("from typing import List\n\ndef total(xs):") and program.endswith("check(total)\n")
    # the reference solution itself passes the tests when executed by plain Python
    reference = build_program(conversation, conversation["messages"][1]["content"])
    assert subprocess.run([sys.executable, "-c", reference], timeout=30).returncode == 0
    with pytest.raises(ValueError, match="only the 'test' split"):
        HumanEval(split="train", data_path=tmp_path)


def test_humaneval_evaluate_runs_the_sandbox(tmp_path):
    pytest.importorskip("nanopipe.execution", reason="the code sandbox (nanopipe/execution.py) is not available")
    write_jsonl(tmp_path / "test.jsonl", HUMANEVAL_ROWS)
    task = HumanEval(data_path=tmp_path / "test.jsonl", timeout_s=1.5)
    conversation = task[0]
    assert task.evaluate(conversation, "```python\ndef total(xs):\n    return sum(xs)\n```") == 1
    assert task.evaluate(conversation, "def total(xs):\n    return 0\n") == 0
    assert task.reward(conversation, "def total(xs):\n    while True: pass\n") == 0.0


def test_local_path_errors_name_what_was_tried(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        GSM8K(split="test", data_path=tmp_path / "nope")
    (tmp_path / "main").mkdir()
    with pytest.raises(TaskDataError, match=r"no files for split 'test'.*test\.jsonl"):
        GSM8K(split="test", data_path=tmp_path)
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(TaskDataError, match="unsupported task file type"):
        GSM8K(split="test", data_path=csv)


# -----------------------------------------------------------------------------
# CustomJSON

def test_customjson_reads_lists_and_objects(tmp_path):
    path = tmp_path / "identity.jsonl"
    path.write_text(
        json.dumps([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanopipe"}])
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                      "tag": "greeting"}) + "\n", encoding="utf-8")
    task = CustomJSON(path)
    assert len(task) == 2 and task[1]["tag"] == "greeting"
    assert task[0]["messages"][1]["content"] == "nanopipe"
    task[0]["messages"].clear()  # callers get copies
    assert len(task[0]["messages"]) == 2


@pytest.mark.parametrize("line, needle", [
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "line 2: message 1: role 'user'"),
    ('[{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]', "line 2: message 0 (user): empty"),
    ('[{"role": "user", "content": "a"}]', "line 2: a training conversation needs at least one assistant reply"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant"}]', "line 2: message 1: must be a dict with 'role'"),
    ('{"conversation": []}', "line 2: an object line needs a 'messages' list"),
    ('"just text"', "line 2: expected a list of messages"),
    ('[{"role": "user", "content": "a"', "line 2: invalid JSON"),
])
def test_customjson_errors_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "conv.jsonl"
    good = '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError) as info:
        CustomJSON(path)
    assert str(info.value).startswith(str(path)) and needle in str(info.value)


def test_customjson_missing_or_empty_file(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        CustomJSON(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="no conversations"):
        CustomJSON(tmp_path / "empty.jsonl")


# -----------------------------------------------------------------------------
# The hub path, for real, against a local HTTP endpoint that speaks the hub's protocol

class FakeHub(BaseHTTPRequestHandler):
    """Serves `root/<owner>/<name>/...` as dataset repos: repo info, tree listings and file downloads."""

    root: Path
    commit = "c0ffee" + "0" * 34
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", content_type="application/json", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, code=200):
        self._send(code, json.dumps(obj).encode())

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        type(self).requests.append(url.path)
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo, rest = self.root / parts[2] / parts[3], parts[4:]
            if not repo.is_dir():
                return self._json({"error": "Repository not found"}, 404)
            if not rest or rest[0] == "revision":
                files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
                return self._json({"id": f"{parts[2]}/{parts[3]}", "sha": self.commit, "private": False,
                                   "gated": False, "disabled": False, "tags": [],
                                   "siblings": [{"rfilename": f} for f in files]})
            if rest[0] == "tree":
                folder = repo.joinpath(*rest[2:])
                if not folder.is_dir():
                    return self._json({"error": "Entry not found"}, 404)
                recursive = urllib.parse.parse_qs(url.query).get("recursive") == ["true"]
                entries = []
                for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
                    rel = p.relative_to(repo).as_posix()
                    if p.is_dir():
                        entries.append({"type": "directory", "path": rel, "oid": "0" * 40})
                    else:
                        entries.append({"type": "file", "path": rel, "size": p.stat().st_size,
                                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()})
                return self._json(entries)
        if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
            path = self.root.joinpath(parts[1], parts[2], *parts[5:])
            if path.is_file():
                data = path.read_bytes()
                return self._send(200, data, "application/octet-stream",
                                  [("ETag", f'"{hashlib.sha1(data).hexdigest()}"'), ("X-Repo-Commit", self.commit)])
            return self._send(404, headers=[("X-Error-Code", "EntryNotFound")])
        return self._json({"error": "not found"}, 404)


def hub_readme(configs) -> str:
    """The dataset card front matter that maps configs and splits to files, as the real repos have it."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    return "\n".join(lines + ["---", ""])


@pytest.fixture
def fake_hub(tmp_path):
    root = tmp_path / "hub"
    repos = {
        "openai/gsm8k": ({"main": {"train": "main/train-*", "test": "main/test-*"}}, {
            "main/train-00000-of-00001.parquet": [{"question": "Add 2 and 2.", "answer": "2+2=<<2+2=4>>4\n#### 4"}],
            "main/test-00000-of-00001.parquet": [{"question": "Double 5.", "answer": "2*5=<<2*5=10>>10\n#### 10"}]}),
        "cais/mmlu": ({"all": {"test": "all/test-*", "auxiliary_train": "all/auxiliary_train-*"},
                       "auxiliary_train": {"train": "auxiliary_train/train-*"}}, {
            "all/test-00000-of-00001.parquet": MMLU_ROWS,
            "all/auxiliary_train-00000-of-00001.parquet": MMLU_ROWS[:1],
            "auxiliary_train/train-00000-of-00001.parquet": [{"train": row} for row in MMLU_ROWS[:2]]}),
        "allenai/ai2_arc": ({"ARC-Easy": {"test": "ARC-Easy/test-*"}, "ARC-Challenge": {"test": "ARC-Challenge/test-*"}}, {
            "ARC-Easy/test-00000-of-00001.parquet": ARC_ROWS[:1],
            "ARC-Challenge/test-00000-of-00001.parquet": ARC_ROWS[1:]}),
        "HuggingFaceTB/smol-smoltalk": ({"default": {"train": "data/train-*", "test": "data/test-*"}}, {
            "data/train-00000-of-00001.parquet": SMOLTALK_ROWS,
            "data/test-00000-of-00001.parquet": SMOLTALK_ROWS[1:]}),
        "openai/openai_humaneval": ({"openai_humaneval": {"test": "openai_humaneval/test-*"}}, {
            "openai_humaneval/test-00000-of-00001.parquet": HUMANEVAL_ROWS}),
    }
    for repo, (configs, files) in repos.items():
        (root / repo).mkdir(parents=True)
        (root / repo / "README.md").write_text(hub_readme(configs), encoding="utf-8")
        for name, rows in files.items():
            write_parquet(root / repo / name, rows)
    handler = type("Hub", (FakeHub,), {"root": root, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


HUB_SCRIPT = """
import json
from nanopipe.tasks import ARC, GSM8K, MMLU, HumanEval, SmolTalk, TaskDataError
tasks = [GSM8K("main", "train"), GSM8K("main", "test"), MMLU("all", "test", shuffle_seed=None),
         MMLU("all", "auxiliary_train"), MMLU("auxiliary_train", "train", shuffle_seed=None), ARC("ARC-Easy", "test"),
         ARC("ARC-Challenge", "test"), SmolTalk("train", shuffle_seed=None), SmolTalk("test"), HumanEval()]
try:
    GSM8K("socratic", "test")  # a config this hub does not have
    error = None
except TaskDataError as e:
    error = str(e)
print(json.dumps({"tasks": [[len(t), t[0]] for t in tasks], "error": error}))
"""


def test_hub_path_through_a_local_endpoint(fake_hub, tmp_path):
    endpoint, handler = fake_hub
    # a child process, because huggingface_hub and datasets read their environment at import time
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1",
               PYTHONPATH=str(REPO_ROOT))
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert [n for n, _ in loaded["tasks"]] == [1, 1, 3, 1, 2, 1, 1, 2, 1, 1]
    gsm_train, gsm_test, mmlu, _, aux, easy, challenge, smol, _, humaneval = [c for _, c in loaded["tasks"]]
    assert gsm_train["messages"][1]["content"][1] == {"type": "python", "text": "2+2"}
    assert gsm_test["messages"][0]["content"] == "Double 5."
    assert mmlu["messages"][1]["content"] == "B" and aux["messages"][1]["content"] == "B"
    assert easy["messages"][1]["content"] == "B" and challenge["letters"] == ["1", "2", "3"]
    assert smol["messages"][0]["role"] == "system" and humaneval["entry_point"] == "total"
    assert any(path.endswith("main/test-00000-of-00001.parquet") for path in handler.requests)
    # a failure says what was asked for and how to work offline
    assert "could not load openai/gsm8k (socratic, split test)" in loaded["error"]
    assert "data_path=" in loaded["error"]
