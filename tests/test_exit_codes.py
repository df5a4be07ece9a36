"""One exit code per kind of failure (issue 21): every stage, run as `python -m nanopipe.stages.<name>`, meets the
same table of bad inputs (a missing checkpoint directory, step or tag, a garbled meta, a tokenizer that does not
fit the checkpoint, a resume from a step that was never written) with exit code 2 and one line on stderr naming
the problem, never a traceback; and a torchrun launch whose worker refused its input is classified the same."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.launcher import LaunchResult, classify, failure_from, without_torchrun_report
from nanopipe.exit_codes import ExitCode, StageError

REPO = Path(__file__).resolve().parents[1]
STEP = 10   # the fixture checkpoint's step


# -----------------------------------------------------------------------------
# The inputs, built once: a tokenizer, a tiny base checkpoint, and the damaged or mismatched variants of them

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    import torch
    from nanopipe.checkpoint import meta_path, optim_path
    from nanopipe.data import prepare_shards
    from tests.chat_fixtures import build_chat_tokenizer, chat_texts, tokenizer_and_base
    root = tmp_path_factory.mktemp("exit_codes")
    fixture = tokenizer_and_base(root)   # tokenizer (vocab 512) and base/d2 (step 10, random weights)
    build_chat_tokenizer(root / "tokenizer_300", vocab_size=300)   # valid, but not the checkpoint's vocabulary
    garbled = shutil.copytree(fixture["base"], root / "garbled")
    meta_path(garbled, STEP).write_text("{not json")
    torch.save({}, optim_path(fixture["base"], STEP, 0))   # resumable by one process, as base_train leaves it
    (root / "corpus.txt").write_text("\n\n".join(chat_texts(120)))
    prepare_shards([root / "corpus.txt"], root / "data", val_fraction=0.1, doc_chars=1500, row_group_docs=8)
    garbled_tokenizer = shutil.copytree(root / "tokenizer", root / "garbled_tokenizer")
    (garbled_tokenizer / "tokenizer.json").write_text("{not json")
    home = root / "home"
    home.mkdir()
    return {"root": root, "home": home, "base": fixture["base"], "garbled": garbled, "missing": root / "missing",
            "tokenizer": root / "tokenizer", "tokenizer_300": root / "tokenizer_300",
            "garbled_tokenizer": garbled_tokenizer, "data": root / "data"}


# -----------------------------------------------------------------------------
# The table: stage x kind of bad input, with what the one line must say

def eval_flags(stage: str, out: Path) -> list[str]:
    return {"base_eval": ["--eval=sample"], "chat_eval": ["--task=Arithmetic"], "chat_cli": ["-p", "hello"]}[stage]


def chat_train_flags(stage: str, out: Path) -> list[str]:
    data = {"chat_rl": ["--task=builtin-arithmetic"], "mid_train": ["--mixture=builtin", "--max_seq_len=128"]}
    return [*data.get(stage, ["--mixture=builtin"]), f"--out_dir={out}"]


LOADERS = {"base_eval": eval_flags, "chat_eval": eval_flags, "chat_cli": eval_flags,
           "mid_train": chat_train_flags, "chat_sft": chat_train_flags, "chat_rl": chat_train_flags}
RESUMERS = ("mid_train", "chat_sft", "chat_rl")

# kind -> (flags of a stage that loads a checkpoint, patterns the one line must match)
LOAD_KINDS = {
    "missing checkpoint dir": (lambda i: [f"--checkpoint_dir={i['missing']}"],
                               lambda i: [re.escape(str(i["missing"]))]),
    "missing step": (lambda i: [f"--checkpoint_dir={i['base']}", "--model_step=99"], lambda i: [r"step[ =]99"]),
    "missing tag": (lambda i: ["--model_tag=no_such_tag"],
                    lambda i: [re.escape(str(i["home"] / "base_checkpoints" / "no_such_tag"))]),
    "garbled meta": (lambda i: [f"--checkpoint_dir={i['garbled']}"], lambda i: [f"meta_0000{STEP}.json", "JSON"]),
    "wrong tokenizer": (lambda i: [f"--checkpoint_dir={i['base']}", f"--tokenizer_dir={i['tokenizer_300']}"],
                        lambda i: [r"\b300\b", r"\b512\b"]),
    # 'latest' with no checkpoint is a fresh start (the flow always passes it); a step never written is an error
    "resume from a step never written": (lambda i: [f"--checkpoint_dir={i['base']}", "--resume_from_step=5"],
                                         lambda i: [r"step 5\b", "meta_000005.json is missing"]),
}


def base_train_case(kind: str):
    """base_train reads a checkpoint only to resume (--checkpoint_dir, --resume_from_step); its own copy of the
    checkpoint per case, since a run locks the directory it resumes from."""
    def flags(i: dict, out: Path) -> list[str]:
        ckpt = out.parent / f"{out.name}-absent"   # the run creates the directory it resumes from (its lock)
        if kind != "missing checkpoint dir":
            ckpt = shutil.copytree(i["garbled" if kind == "garbled meta" else "base"], ckpt)
        tokenizer = i["tokenizer_300" if kind == "wrong tokenizer" else "tokenizer"]
        step = 99 if kind == "missing step" else STEP
        return ["--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=128", "--device_batch_size=2",
                "--total_batch_size=256", "--num_iterations=2", "--eval_every=-1", "--core_metric_every=-1",
                "--sample_every=-1", "--data_source=local", f"--data_dir={i['data']}", f"--tokenizer_dir={tokenizer}",
                f"--out_dir={out}", f"--checkpoint_dir={ckpt}", f"--resume_from_step={step}"]
    patterns = {"missing checkpoint dir": lambda i: ["-absent", f"meta_0000{STEP}.json is missing"],
                "missing step": lambda i: [r"step 99\b"],
                "garbled meta": lambda i: [f"meta_0000{STEP}.json", "JSON"],
                "wrong tokenizer": lambda i: [r"\b300\b", r"\b512\b"]}[kind]
    return flags, patterns


def tokenizer_case(stage: str, kind: str):
    """The tokenizer stages read no checkpoint: their inputs are the data directory and the tokenizer."""
    def flags(i: dict, out: Path) -> list[str]:
        if stage == "tok_train":
            return ["--data_source=local", f"--data_dir={i['missing']}", f"--out_dir={out}"]
        tokenizer = i["missing"] if kind == "missing input dir" else i["garbled_tokenizer"]
        return [f"--tokenizer_dir={tokenizer}", "--data_source=local", f"--data_dir={i['data']}", f"--out_dir={out}"]
    patterns = (lambda i: [re.escape(str(i["missing"]))]) if kind == "missing input dir" else \
        (lambda i: ["tokenizer.json", "JSON"])
    return flags, patterns


def cases() -> dict[str, tuple[str, object, object]]:
    """{case id: (stage, flags(inputs, out_dir), patterns(inputs))}."""
    table = {}
    for stage, stage_flags in LOADERS.items():
        for kind, (kind_flags, patterns) in LOAD_KINDS.items():
            if kind.startswith("resume") and stage not in RESUMERS:
                continue
            flags = (lambda i, out, s=stage, f=stage_flags, k=kind_flags: [*f(s, out), *k(i), "--source=base"])
            table[f"{stage}: {kind}"] = (stage, flags, patterns)
    for kind in ("missing checkpoint dir", "missing step", "garbled meta", "wrong tokenizer"):
        table[f"base_train: {kind}"] = ("base_train", *base_train_case(kind))
    table["tok_train: missing input dir"] = ("tok_train", *tokenizer_case("tok_train", "missing input dir"))
    for kind in ("missing input dir", "garbled tokenizer"):
        table[f"tok_eval: {kind}"] = ("tok_eval", *tokenizer_case("tok_eval", kind))
    return table


CASES = cases()


@pytest.fixture(scope="module")
def outcomes(inputs, request) -> dict[str, subprocess.CompletedProcess]:
    """Every selected case of the table, run as its own process, two at a time (each pays torch's import)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", NANOPIPE_HOME=str(inputs["home"]), PYTHONPATH=str(REPO))

    def run(case: str) -> subprocess.CompletedProcess:
        stage, flags, _ = CASES[case]
        out = inputs["root"] / "out" / re.sub(r"\W+", "_", case)
        out.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", f"nanopipe.stages.{stage}", *flags(inputs, out), "--device_type=cpu"]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        except subprocess.TimeoutExpired:   # that case fails, the others still report
            return subprocess.CompletedProcess(cmd, -1, "", "timed out after 600 s")

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(selected, pool.map(run, selected)))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_naming_it(case, inputs, outcomes):
    stage, _, patterns = CASES[case]
    result = outcomes[case]
    err = result.stderr.strip()
    assert result.returncode == ExitCode.BAD_INPUT, f"{case}: exit {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err and len(err.splitlines()) == 1, f"{case}: not one line:\n{err[-3000:]}"
    assert err.startswith(f"python -m nanopipe.stages.{stage}: "), err
    for pattern in patterns(inputs):
        assert re.search(pattern, err), f"{case}: {pattern!r} not in {err!r}"


# -----------------------------------------------------------------------------
# The rule, and torchrun

def test_an_input_error_is_bad_input_unless_its_class_says_otherwise():
    class MissingFile(StageError, FileNotFoundError):
        pass

    class BadValue(StageError, ValueError):
        pass

    class Crashed(StageError, RuntimeError):
        pass

    class Transient(MissingFile):
        exit_code = ExitCode.FAILED

    class StillTransient(Transient):
        pass

    assert MissingFile("x").exit_code == BadValue("x").exit_code == ExitCode.BAD_INPUT
    assert Crashed("x").exit_code == Transient("x").exit_code == StillTransient("x").exit_code == ExitCode.FAILED


TORCHRUN_REPORT = """\
W1204 19:43:18.644000 3128 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 3692 closing signal SIGTERM
E1204 19:43:20.441000 3128 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 3691) of binary: python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "site-packages/torch/distributed/run.py", line 1028, in main
    run(args)
  File "site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n\
============================================================
nanopipe.stages.base_train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_19:43:20
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 3692)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 3692
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_19:43:18
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 3691) \n\
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""


def test_a_worker_refusing_its_world_size_under_torchrun_fails_as_bad_input_in_one_line(tmp_path):
    """torchrun exits 1 and prints its own traceback for any failed worker: the launcher reports the worker's
    code (2) and its one line, and torchrun's 40-line report becomes one line naming the root cause."""
    said = ("python -m nanopipe.stages.base_train: WorldSizeMismatchError: checkpoint step 2 in /ckpt was written "
            "by 1 process(es) but this run has 2: resume with --nproc_per_node=1")
    tail = ["World size 2, gradient accumulation steps: 1", said, said, *TORCHRUN_REPORT.splitlines()]
    result = LaunchResult(["torchrun"], 1, 1.0, False, tail, tmp_path / "stage.log")
    assert classify(result)[:2] == ("config", False)
    failure = failure_from(result, "base_train")
    first, *rest = str(failure).splitlines()
    assert failure.returncode == ExitCode.BAD_INPUT and failure.kind == "config" and not failure.retryable
    assert said.split(": ", 1)[1] in first and "exit code 2" in first
    shown = "\n".join(rest)
    assert "Traceback" not in shown and "ChildFailedError" not in shown and "torch/distributed" not in shown
    assert rest[-1] == "torchrun: worker rank 0 failed first, with exit code 2 (torchrun's report is in the log)"
    assert rest[-2] == said
    # what follows the report (a multi-node launch's note on the node that failed first) stays
    note = "nanopipe: error: node 1 (flow run base_train-node-1) failed first"
    assert without_torchrun_report([*tail, note])[-2:] == [rest[-1], note]
