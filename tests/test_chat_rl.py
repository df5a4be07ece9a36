"""The chat_rl stage on CPU: its config, one real RL step that moves the weights (either baseline, with and
without replayed SFT conversations), exact resume (one process, and two under torchrun), the dry run, and clear
errors before any work. The pieces it is made of (rewards, advantages, the loss and pass@k) are
tests/test_rl.py's, on this module's tiny policy.

The policy is a tiny SFT-like model: depth 2, width 64, taught in a few seconds to answer a GSM8K question with
`#### d` for a random digit d. On real GSM8K rows whose answer is one digit it is then right about one time
in nine, so groups of samples have mixed rewards and the policy gradient is not zero."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanopipe.chat_format import render_conversation
from nanopipe.checkpoint import list_steps, load_checkpoint, meta_path, optim_path, save_checkpoint
from nanopipe.configs.base import ConfigError, build_config
from nanopipe.configs.flags import parse_config as parse_cli
from nanopipe.configs.chat_rl import ChatRLConfig, check_world_size
from nanopipe.gpt import GPT, build_model_config
from nanopipe.stages import chat_rl
from nanopipe.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*\| reward: ([\d.]+) \| sequence length: ([\d.]+)", re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


def single_digit_rows(path: Path, count: int, tokenizer=None, max_tokens: int = 120) -> list[dict]:
    """Real GSM8K rows whose final answer is one digit 1-9 (and, given a tokenizer, whose question is short)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if re.search(r"#### [1-9]\s*$", row["answer"]) and (
                tokenizer is None or len(tokenizer.encode(row["question"])) <= max_tokens):
            rows.append(row)
            if len(rows) == count:
                break
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sft_warmup(model, tokenizer, questions: list[str], steps: int, seed: int = 0) -> None:
    """Teach the answer format: each question -> '#### d' for a random digit d (loss on the answer only)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = []
        for question in rng.sample(questions, 8):
            conversation = {"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": f"#### {rng.randint(1, 9)}"}]}
            batch.append(render_conversation(tokenizer, conversation))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
        mask = torch.tensor([m + [0] * (width - len(m)) for _, m in batch])
        targets = ids[:, 1:].clone()
        targets[mask[:, 1:] == 0] = -1
        model(ids[:, :-1], targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_dir):
    """A tokenizer, a one-digit subset of real GSM8K (train and test), and an SFT-like checkpoint."""
    root = tmp_path_factory.mktemp("chat_rl")
    gsm8k = shared_dir / "data" / "gsm8k"
    texts = [r["question"] + "\n" + r["answer"] for r in single_digit_rows(gsm8k / "train.jsonl", 200)]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=384)
    tokenizer.save(root / "tokenizer")
    train = single_digit_rows(gsm8k / "train.jsonl", 48, tokenizer)
    test = single_digit_rows(gsm8k / "test.jsonl", 8, tokenizer)
    write_jsonl(root / "gsm8k" / "train.jsonl", train)
    write_jsonl(root / "gsm8k" / "test.jsonl", test)
    torch.manual_seed(0)
    config = build_model_config(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=256,
                                vocab_size=tokenizer.get_vocab_size())
    model = GPT.create(config, "cpu")
    threads = torch.get_num_threads()  # module fixtures run before the per-test one_thread fixture
    torch.set_num_threads(1)
    try:
        sft_warmup(model, tokenizer, [r["question"] for r in train], steps=60)
    finally:
        torch.set_num_threads(threads)
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_dir": str(root / "tokenizer")}
    save_checkpoint(root / "sft" / "d2", 60, model.state_dict(), None, meta)
    return {"root": root, "ckpt": root / "sft" / "d2", "data": root / "gsm8k", "tokenizer": tokenizer,
            "model": model.eval()}


def rl_flags(tiny, out_dir: Path, **overrides) -> list[str]:
    values = dict(checkpoint_dir=tiny["ckpt"], gsm8k_path=tiny["data"], out_dir=out_dir, device_type="cpu",
                  num_iterations=2, examples_per_step=4, num_samples=8, device_batch_size=4, max_new_tokens=8,
                  eval_every=-1, eval_examples=4, save_every=-1, init_lr_frac=1.0, matrix_lr=0.05)
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def logged_steps(text: str) -> dict[int, tuple[float, float]]:
    """{step: (mean reward, mean sequence length)} from the log lines."""
    return {int(s): (float(r), float(n)) for s, r, n in STEP_LINE.findall(text)}


def subprocess_env(home: Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOPIPE_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return {**env, **extra}


# -----------------------------------------------------------------------------
# Flags

def test_defaults_are_the_reference_recipe():
    cfg = build_config(ChatRLConfig, {})
    assert (cfg.source, cfg.task, cfg.num_epochs, cfg.num_iterations) == ("sft", "gsm8k", 1, None)
    assert (cfg.examples_per_step, cfg.num_samples, cfg.device_batch_size) == (16, 16, 8)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k) == (256, 1.0, 50)
    assert (cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay) == (0.2, 0.004, 0.02, 0.0)
    assert (cfg.init_lr_frac, cfg.eval_every, cfg.eval_examples, cfg.save_every) == (0.05, 60, 400, 60)
    assert (cfg.resume_from_step, cfg.plan_only, cfg.baseline) == (None, False, "mean")


def test_seed_and_kebab_spellings_and_disabled_values():
    a = parse_cli(ChatRLConfig, ["--examples_per_step=4", "--num-samples", "8", "--top_k=0", "--eval_every=-1",
                                 "--resume-from-step", "latest", "--task=builtin-arithmetic", "--source", "mid"])
    assert (a.examples_per_step, a.num_samples, a.top_k, a.eval_every) == (4, 8, None, None)
    assert (a.resume_from_step, a.task, a.source) == ("latest", "builtin-arithmetic", "mid")
    assert parse_cli(ChatRLConfig, ["--resume_from_step=12"]).resume_from_step == 12
    assert parse_cli(ChatRLConfig, ["--baseline", "zero"]).baseline == "zero"
    for bad, needle in (({"source": "rl"}, "--source"), ({"task": "MATH"}, "--task"),
                        ({"baseline": "std"}, "--baseline"),
                        ({"num_samples": 0}, "--num_samples"), ({"temperature": 0}, "--temperature"),
                        ({"task": "builtin-arithmetic", "gsm8k_path": "x"}, "--gsm8k_path is only read")):
        with pytest.raises(ConfigError, match=needle):
            build_config(ChatRLConfig, bad)


def test_config_module_does_not_import_torch():
    code = "import sys, nanopipe.configs.chat_rl; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# -----------------------------------------------------------------------------
# The stage

def test_one_rl_step_learns_from_rewards_and_logs_them(tiny, tmp_path, capsys, home):
    out = tmp_path / "rl"
    metrics = chat_rl.main(rl_flags(tiny, out, num_iterations=1))
    log = capsys.readouterr().out
    steps = logged_steps(log)
    assert list(steps) == [0]
    reward, length = steps[0]
    assert 0.0 < reward < 1.0, "the tiny model must be right sometimes, or the step has nothing to learn"
    assert length > tiny["tokenizer"].encode("#### 1").__len__()
    assert re.search(r"@@nanopipe-progress .*\"reward\"", log) and "pass@4:" in log
    assert metrics["rewards"] == [pytest.approx(reward, abs=1e-4)] and metrics["reward"] == metrics["rewards"][0]
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@k"] <= 1.0 and metrics["k"] == 4
    written = json.loads((out / "metrics.json").read_text())
    assert written["reward"] == metrics["reward"] and written["pass@k"] == metrics["pass@k"]
    assert list_steps(out) == [1] and optim_path(out, 1, 0).is_file()
    before = tiny["model"].state_dict()
    after, _, meta = load_checkpoint(out, 1, "cpu")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "an RL step with mixed rewards must change the weights"
    assert meta["eval"]["pass@1"] == metrics["pass@1"] and meta["tokenizer_dir"] == str(tiny["root"] / "tokenizer")


def test_the_baseline_flag_sets_the_advantages_of_the_step(tiny, tmp_path, home):
    """The same step (same samples, same rewards) with each baseline: the weights it leaves differ."""
    weights = {}
    for baseline in ("mean", "zero"):
        out = tmp_path / baseline
        metrics = chat_rl.main(rl_flags(tiny, out, num_iterations=1, eval_every=-1, baseline=baseline))
        weights[baseline] = load_checkpoint(out, 1, "cpu")[0]
        assert 0.0 < metrics["rewards"][0] < 1.0, "mixed rewards: either baseline has something to learn"
    assert any(not torch.equal(weights["mean"][name], weights["zero"][name]) for name in weights["mean"])


def test_replay_joins_the_supervised_loss_of_sft_conversations_to_the_step(tiny, tmp_path, capsys, home):
    """--replay: the step also learns from builtin SFT conversations (logged loss > 0), so its update differs
    from the same step without; the conversations must split over the ranks."""
    plain = chat_rl.main(rl_flags(tiny, tmp_path / "plain", num_iterations=1))
    assert "replay loss" not in capsys.readouterr().out
    replayed = chat_rl.main(rl_flags(tiny, tmp_path / "replay", num_iterations=1, replay=4))
    log = capsys.readouterr().out
    assert "replayed SFT conversations per step: 4" in log
    assert float(re.search(r"\| replay loss: ([\d.]+) \|", log).group(1)) > 0
    assert replayed["rewards"] == plain["rewards"]   # the same samples ...
    a, b = (load_checkpoint(tmp_path / name, 1, "cpu")[0] for name in ("plain", "replay"))
    assert any(not torch.equal(a[name], b[name]) for name in a)   # ... and another update
    check_world_size(build_config(ChatRLConfig, {"replay": 4}), 2)
    with pytest.raises(ConfigError, match=r"--replay=3 does not split over 2 ranks; try --replay=2 or 4"):
        check_world_size(build_config(ChatRLConfig, {"replay": 3, "examples_per_step": 4}), 2)


@pytest.mark.parametrize("replay", [None, 4])
def test_resume_continues_exactly(tiny, tmp_path, capsys, home, replay):
    """4 steps straight (checkpoint at 2) vs. the step-2 checkpoint resumed in a fresh directory, also with
    replayed SFT conversations (chosen by the step, like the questions)."""
    common = dict(num_iterations=4, save_every=2, eval_every=2, **({"replay": replay} if replay else {}))
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = chat_rl.main(rl_flags(tiny, straight_dir, **common))
    straight_log = logged_steps(capsys.readouterr().out)
    assert list_steps(straight_dir) == [2, 4] and len(straight["rewards"]) == 4
    resumed_dir.mkdir()
    for path in straight_dir.glob("*_000002*"):
        shutil.copy(path, resumed_dir)
    resumed = chat_rl.main(rl_flags(tiny, resumed_dir, resume_from_step="latest", **common))
    log = capsys.readouterr().out
    assert "Resuming from step 2" in log
    resumed_log = logged_steps(log)
    assert sorted(resumed_log) == [2, 3]
    for step in (2, 3):
        assert resumed_log[step] == straight_log[step]
    assert resumed["rewards"] == straight["rewards"] and resumed["evals"] == straight["evals"]
    a, _, _ = load_checkpoint(straight_dir, 4, "cpu")
    b, _, _ = load_checkpoint(resumed_dir, 4, "cpu")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(0 < r < 1 for r in straight["rewards"])  # there was something to learn (the weights moved)


@pytest.mark.slow
def test_torchrun_two_processes_resume_exactly(tiny, tmp_path):
    """Two gloo ranks: 4 steps straight vs. stopped at the step-2 checkpoint and resumed; same rewards, same
    weights, and every rank's sampling generator saved; each rank replays its share of SFT conversations."""
    common = dict(num_iterations=4, save_every=2, num_samples=4, replay=2)
    env = subprocess_env(tmp_path)

    def torchrun(out: Path, **extra):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "nanopipe.stages.chat_rl", *rl_flags(tiny, out, **common, **extra)],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    straight_log = logged_steps(torchrun(tmp_path / "straight"))
    assert sorted(straight_log) == [0, 1, 2, 3]
    meta = json.loads(meta_path(tmp_path / "straight", 2).read_text())
    ranks = meta["loader_state"]["ranks"]
    assert meta["loader_state"]["world_size"] == 2 and ranks[0]["sampler_rng"] != ranks[1]["sampler_rng"]
    assert optim_path(tmp_path / "straight", 2, 1).is_file()
    (tmp_path / "resumed").mkdir()
    for path in (tmp_path / "straight").glob("*_000002*"):
        shutil.copy(path, tmp_path / "resumed")
    resumed_out = torchrun(tmp_path / "resumed", resume_from_step="latest")
    assert "Resuming from step 2" in resumed_out
    resumed_log = logged_steps(resumed_out)
    assert sorted(resumed_log) == [2, 3] and all(resumed_log[s] == straight_log[s] for s in (2, 3))
    a, _, _ = load_checkpoint(tmp_path / "straight", 4, "cpu")
    b, _, _ = load_checkpoint(tmp_path / "resumed", 4, "cpu")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert m1["rewards"] == m2["rewards"] and m1["world_size"] == 2 and any(0 < r < 1 for r in m1["rewards"])


def test_builtin_arithmetic_runs_offline(tiny, tmp_path, capsys, home):
    metrics = chat_rl.main(rl_flags(tiny, tmp_path / "out", task="builtin-arithmetic", gsm8k_path="none",
                                    num_iterations=1, examples_per_step=2, num_samples=2, eval_examples=2))
    assert metrics["task"] == "builtin-arithmetic" and len(metrics["rewards"]) == 1
    assert metrics["evals"][-1]["problems"] == 2


def test_eval_batch_size_sets_the_evaluation_batches_not_the_scores(tiny, tmp_path, home, monkeypatch):
    rows = []
    evaluate = chat_rl.evaluate_pass_at_k
    monkeypatch.setattr(chat_rl, "evaluate_pass_at_k",
                        lambda *a, **kw: (rows.append(kw["rows_per_batch"]), evaluate(*a, **kw))[1])
    flags = dict(task="builtin-arithmetic", gsm8k_path="none", num_iterations=1, examples_per_step=2, num_samples=2,
                 eval_examples=6, eval_samples=1, temperature=1.0)
    alone = chat_rl.main(rl_flags(tiny, tmp_path / "a", **flags))
    together = chat_rl.main(rl_flags(tiny, tmp_path / "b", eval_batch_size=6, **flags))
    assert rows == [4, 6]   # device_batch_size, then the evaluation's own
    assert alone["evals"] == together["evals"] and alone["evals"][-1]["problems"] == 6
    assert ChatRLConfig.model_fields["eval_batch_size"].default is None
    assert "eval_batch_size" in ChatRLConfig.NON_SEMANTIC


# -----------------------------------------------------------------------------
# Dry run and errors

def test_plan_only_plans_without_joining_a_process_group(tiny, tmp_path):
    """The flow's preflight: plain python with torchrun's variables. Joining a group of 2 would hang."""
    env = subprocess_env(tmp_path, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="1")
    result = subprocess.run([sys.executable, "-m", "nanopipe.stages.chat_rl", "--plan_only",
                             f"--checkpoint_dir={tiny['ckpt']}", f"--out_dir={tmp_path / 'out'}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"Model \(source checkpoint .*d2 step 60\): 2 layers, width 64", out)
    assert re.search(r"parameters total\s+: [\d,]+", out)
    assert "Steps: 467 over 7,473 training questions" in out   # GSM8K train / 16, counted without the data
    assert "16 questions per step (8 per rank, 2 rank(s)); samples per step: 256" in out
    assert re.search(r"Estimated peak memory per device: [\d.]+ GiB", out)
    assert not (tmp_path / "out").exists()
    bad = subprocess.run([sys.executable, "-m", "nanopipe.stages.chat_rl", "--plan_only", "--examples_per_step=3"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--examples_per_step=3 does not split over 2 ranks" in bad.stderr


def test_plan_only_before_the_source_exists_assumes_the_depth_hint(tmp_path, home, capsys):
    info = chat_rl.run(build_config(ChatRLConfig, {"plan_only": True, "depth": 4, "task": "builtin-arithmetic",
                                                   "examples_per_step": 8, "checkpoint_dir": str(tmp_path / "none")}))
    assert "assuming --depth=4" in capsys.readouterr().out
    assert info["model_config"]["n_layer"] == 4 and info["num_iterations"] == 1000 // 8
    assert info["samples_per_step"] == 8 * 16 and info["estimated_peak_memory_bytes"]["kv_cache"] > 0
    wide = chat_rl.run(build_config(ChatRLConfig, {"plan_only": True, "depth": 4, "task": "builtin-arithmetic",
                                                   "examples_per_step": 8, "checkpoint_dir": str(tmp_path / "none"),
                                                   "eval_batch_size": 32}))   # 4 x the default device batch
    kv_cache = info["estimated_peak_memory_bytes"]["kv_cache"]
    assert wide["estimated_peak_memory_bytes"]["kv_cache"] == 4 * kv_cache


def _fails_with(args: list[str], tmp_path: Path, code: int, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        chat_rl.main(args)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_missing_source_checkpoint_exits_2_naming_the_path(tmp_path, home, capsys):
    err = _fails_with(["--device_type=cpu", f"--checkpoint_dir={tmp_path / 'nowhere'}",
                       f"--out_dir={tmp_path / 'out'}"], tmp_path, 2, capsys)
    assert str(tmp_path / "nowhere") in err
    err = _fails_with(["--device_type=cpu", "--source=mid", f"--out_dir={tmp_path / 'out'}"], tmp_path, 2, capsys)
    assert str(home / "mid_checkpoints") in err


def test_vocabulary_mismatch_exits_2_naming_both(tiny, tmp_path, home, capsys):
    other = Tokenizer.train_from_iterator(["a small other tokenizer " * 20], vocab_size=300)
    other.save(tmp_path / "other_tok")
    err = _fails_with(rl_flags(tiny, tmp_path / "out", tokenizer_dir=tmp_path / "other_tok"), tmp_path, 2, capsys)
    assert str(tmp_path / "other_tok") in err and str(tiny["ckpt"]) in err
    assert f"has {other.get_vocab_size()} tokens" in err and "vocab_size=384" in err


def test_gsm8k_unavailable_names_the_dataset_and_the_flag(tiny, tmp_path, home, capsys):
    err = _fails_with(rl_flags(tiny, tmp_path / "out", gsm8k_path=tmp_path / "missing"), tmp_path, 2, capsys)
    assert f"--gsm8k_path: {tmp_path / 'missing'} does not exist" in err
    # the hub, offline (a fresh process: `datasets` reads these variables when first imported)
    env = subprocess_env(tmp_path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "nanopipe.stages.chat_rl",
                             *rl_flags(tiny, tmp_path / "out", gsm8k_path="none")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and not (tmp_path / "out").exists()  # a retry cannot fix it
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "openai/gsm8k" in err and "--gsm8k_path" in err and "--task=builtin-arithmetic" in err
