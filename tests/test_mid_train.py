"""mid_train on CPU: seed flags, best-fit packing that never crops a conversation that fits, loader resume,
clear failures before training (source checkpoint, vocab, datasets), dry run without a process group, one
pass with exact resume, the final checkpoint before the final evaluation, and two ranks under torchrun
resuming to the same weights as an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanopipe.chat_format import render_conversation
from nanopipe.chat_batches import PackedChatLoader, RankStride
from nanopipe.checkpoint import list_steps, load_checkpoint, load_model, optim_path
from nanopipe.configs.base import ConfigError, build_config
from nanopipe.configs.flags import parse_config as parse_cli
from nanopipe.configs.mid_train import MidTrainConfig
from nanopipe.exit_codes import ExitCode
from nanopipe.stages import mid_train
from nanopipe.tasks import builtin_chat_mixture
from nanopipe.tasks.mixtures import mid_mixtures
from tests.chat_fixtures import tiny_chat_flags, tokenizer_and_base, write_base_checkpoint
from tests.procs import pids_with_cmdline

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+) \| progress +([\d.]+)% \| loss: ([\d.]+) \(this step ([\d.]+)\)", re.M)
# a tiny run: 4 rows of 128 tokens per micro-step, 2 micro-steps per step; learning rates high enough that the
# loss moves visibly in a few steps (used as given: mid-training does not scale them with the batch size)
TINY = dict(max_seq_len=128, device_batch_size=4, total_batch_size=1024, eval_every=-1, eval_tokens=1024,
            builtin_size=12, matrix_lr=0.0133, embedding_lr=0.133, unembedding_lr=0.00265)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tokenizer_and_base(tmp_path_factory.mktemp("mid"))


def flags(inputs, out_dir: Path, **overrides) -> list[str]:
    return tiny_chat_flags(inputs["base"], out_dir, **{**TINY, **overrides})


def step_losses(text: str) -> dict[int, tuple[float, float, float]]:
    """{step: (progress %, smoothed loss, this step's loss)} from the log lines."""
    return {int(s): (float(p), float(a), float(b)) for s, p, a, b in STEP_LINE.findall(text)}


def subprocess_env(home: Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOPIPE_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return {**env, **extra}


# -----------------------------------------------------------------------------
# Flags

def test_defaults_are_the_seeds():
    cfg = build_config(MidTrainConfig, {})
    assert (cfg.device_batch_size, cfg.total_batch_size, cfg.max_seq_len, cfg.init_lr_frac) == (32, 524288, 2048, 1.0)
    assert (cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay) == (0.2, 0.004, 0.02, 0.0)
    assert (cfg.eval_every, cfg.eval_tokens, cfg.num_iterations, cfg.save_every) == (150, 20 * 524288, None, None)
    assert (cfg.source, cfg.mixture, cfg.resume_from_step, cfg.plan_only) == ("base", "seed", None, False)


def test_both_spellings_minus_one_and_bad_batch_sizes():
    a = parse_cli(MidTrainConfig, ["--num_iterations=-1", "--eval-every", "-1", "--resume_from_step=latest"])
    b = parse_cli(MidTrainConfig, ["--num-iterations", "-1", "--eval_every=-1", "--resume-from-step", "latest"])
    assert a == b and (a.num_iterations, a.eval_every, a.resume_from_step) == (None, None, "latest")
    with pytest.raises(ConfigError, match=r"--total_batch_size=100000 is not a multiple of .* = 65536 tokens "
                                          r"per micro-step; try --total_batch_size=65536 or 131072"):
        build_config(MidTrainConfig, {"total_batch_size": 100_000})
    with pytest.raises(ConfigError, match="--source"):
        build_config(MidTrainConfig, {"source": "sft"})
    steps = [build_config(MidTrainConfig, {"resume_from_step": v}).resume_from_step for v in (" 7 ", "-1", "none", -1)]
    assert steps == [7, None, None, None]
    for bad in ("-2", -2):  # as typed on the command line, and from a flow parameter
        with pytest.raises(ConfigError, match=r"--resume_from_step: .*must be a step >= 0, 'latest', or -1/none"):
            build_config(MidTrainConfig, {"resume_from_step": bad})


def test_every_training_stage_takes_the_cpu_matmul_precision():
    from nanopipe.configs import BaseTrainConfig
    from nanopipe.configs.chat_rl import ChatRLConfig
    from nanopipe.configs.chat_sft import ChatSFTConfig
    for cls in (BaseTrainConfig, MidTrainConfig, ChatSFTConfig, ChatRLConfig):
        assert build_config(cls, {}).cpu_matmul_precision == "auto"
        assert parse_cli(cls, ["--cpu-matmul-precision", "ieee"]).cpu_matmul_precision == "ieee"
        with pytest.raises(ConfigError, match="cpu_matmul_precision"):
            build_config(cls, {"cpu_matmul_precision": "fp8"})


def test_config_module_does_not_import_torch():
    code = "import sys, nanopipe.configs.mid_train, nanopipe.configs.chat_sft; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# -----------------------------------------------------------------------------
# Packing

def unpack_rows(inputs: torch.Tensor, targets: torch.Tensor, bos: int) -> list[tuple[list[list[int]], int]]:
    """Each row as (its conversations, padding length), from inputs and targets alone."""
    rows = []
    for x, y in zip(inputs.tolist(), targets.tolist()):
        full = x + [y[-1] if y[-1] >= 0 else bos]  # the last token, or padding
        content = next((i + 1 for i, t in enumerate(y) if t == -1), len(full))
        assert all(t == -1 for t in y[content - 1:]) and all(t == bos for t in full[content:])
        assert full[0] == bos, "every row starts at a conversation boundary"
        starts = [i for i in range(content) if full[i] == bos]
        convs = [full[a:b] for a, b in zip(starts, starts[1:] + [content])]
        rows.append((convs, len(full) - content))
    return rows


def test_best_fit_packing_never_crops_a_conversation_that_fits(inputs):
    tok = inputs["tokenizer"]
    data = builtin_chat_mixture("train", seed=3, size=40)
    seq_len = 192
    rendered = {tuple(render_conversation(tok, data[i], max_tokens=None)[0]) for i in range(len(data))}
    loader = PackedChatLoader(tok, data, batch_size=4, seq_len=seq_len, buffer_size=16)
    whole = cropped = padded_rows = 0
    for _ in range(12):
        inputs_, targets = next(loader)
        assert inputs_.shape == targets.shape == (4, seq_len)
        for convs, pad in unpack_rows(inputs_, targets, tok.get_bos_token_id()):
            padded_rows += pad > 0
            for conv in convs:
                if tuple(conv) in rendered:
                    whole += 1
                else:  # only a conversation longer than a row may be cut, and then it fills the row alone
                    assert len(convs) == 1 and pad == 0 and len(conv) == seq_len + 1
                    assert any(r[:seq_len + 1] == tuple(conv) for r in rendered if len(r) > seq_len + 1)
                    cropped += 1
    assert whole > 30 and padded_rows > 0 and cropped > 0
    assert cropped == loader.cropped - sum(len(ids) > seq_len + 1 for _, ids in loader.buffer)
    # every token of a packed conversation is a target (mid-training learns the whole format)
    assert loader.pad_fraction() < 0.5


def test_packed_loader_resumes_exactly_and_ranks_read_disjoint_examples(inputs):
    tok = inputs["tokenizer"]
    data = builtin_chat_mixture("train", seed=3, size=20)
    loader = PackedChatLoader(tok, data, batch_size=2, seq_len=64, buffer_size=8)
    for _ in range(5):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # it goes through the meta JSON
    expected = [next(loader) for _ in range(4)]
    resumed = PackedChatLoader(tok, data, batch_size=2, seq_len=64, buffer_size=8, resume_state=state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(4))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.consumed == loader.consumed
    with pytest.raises(ValueError, match="rank 0 of 1, this is rank 1 of 2"):
        PackedChatLoader(tok, data, batch_size=2, seq_len=64, rank=1, world_size=2, resume_state=state)
    strides = [RankStride(len(data), r, 2) for r in range(2)]
    seen = [{s.index(p) for p in range(s.per_pass)} for s in strides]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(data)))


def test_real_gsm8k_joins_the_builtin_mixture_with_calculator_calls(shared_dir, inputs):
    gsm8k = shared_dir / "data" / "gsm8k"
    cfg = build_config(MidTrainConfig, {"mixture": "builtin", "builtin_size": 10, "gsm8k_path": str(gsm8k)})
    mixtures = mid_mixtures(cfg)
    assert mixtures.parts["train"]["GSM8K"] > 7000 and mixtures.parts["val"]["GSM8K"] == 100
    # builtin_size x the builtin mixture's identity weight (nanopipe.tasks.mixtures.BUILTIN_MID_WEIGHTS)
    assert mixtures.parts["train"]["identity"] == 5 and "builtin offline identity" in mixtures.identity
    tok = inputs["tokenizer"]
    python_start = tok.encode_special("<|python_start|>")
    gsm = next(mixtures.train[i] for i in range(len(mixtures.train))
               if isinstance(mixtures.train[i]["messages"][-1]["content"], list)
               and "####" in mixtures.train[i]["messages"][-1]["content"][-1]["text"]
               and len(mixtures.train[i]["messages"][-1]["content"]) > 2)
    assert python_start in render_conversation(tok, gsm)[0]


def test_builtin_hard_share_sets_the_harder_word_problems_of_the_builtin_mixtures():
    """cpu-small's curriculum: --builtin_hard_share=0 leaves the harder word problems out of mid-training's
    mixture (training and validation); by default both stages' have word_problems.HARD_SHARE of them."""
    from nanopipe.configs.chat_sft import ChatSFTConfig
    from nanopipe.tasks.mixtures import sft_mixtures
    from nanopipe.tasks.word_problems import HARD_SHARE
    from tests.test_tasks_generated import is_hard

    def hard_share(mixtures, split: str) -> float:
        mixture = getattr(mixtures, split)
        questions = [mixture[i]["messages"][0]["content"] for i in range(len(mixture))]
        return sum(is_hard({"question": q}) for q in questions) / mixtures.parts[split]["Arithmetic"]

    builtin = {"mixture": "builtin", "builtin_size": 100}
    assert MidTrainConfig().builtin_hard_share == ChatSFTConfig().builtin_hard_share == HARD_SHARE
    short = mid_mixtures(build_config(MidTrainConfig, {**builtin, "builtin_hard_share": 0}))
    assert hard_share(short, "train") == 0 and hard_share(short, "val") == 0
    for mixtures in (mid_mixtures(build_config(MidTrainConfig, builtin)),
                     sft_mixtures(build_config(ChatSFTConfig, builtin))):
        assert 0.35 < hard_share(mixtures, "train") < 0.65 and hard_share(mixtures, "val") > 0.1
    only_hard = sft_mixtures(build_config(ChatSFTConfig, {**builtin, "builtin_hard_share": 1}))
    assert hard_share(only_hard, "train") == 1
    assert parse_cli(MidTrainConfig, ["--builtin-hard-share", "0.25"], prog="mid").builtin_hard_share == 0.25
    with pytest.raises(ConfigError, match="builtin_hard_share"):
        build_config(MidTrainConfig, {"builtin_hard_share": 1.5})


def test_builtin_restate_counts_reaches_the_workshop_answers_of_sft_and_rl_and_only_cpu_small_sets_it():
    """--builtin_restate_counts reaches chat_sft's builtin mixture (training and validation), chat_rl's builtin
    training problems and its replayed conversations; cpu-small sets it, the demo and the defaults do not."""
    from flows.presets import PRESETS
    from nanopipe.configs.chat_rl import ChatRLConfig
    from nanopipe.configs.chat_sft import ChatSFTConfig
    from nanopipe.stages.chat_rl import builtin_train_task, replay_mixture
    from nanopipe.tasks.mixtures import sft_mixtures

    def restated(conversations) -> int:
        answers = [c["messages"][-1]["content"] for c in conversations]
        return sum((a if isinstance(a, str) else a[0].get("text", "")).startswith("The workshop has ") for a in answers)

    def workshops(conversations) -> int:
        return sum(c["messages"][0]["content"].startswith("A workshop has ") for c in conversations)

    builtin = {"mixture": "builtin", "builtin_size": 200}
    for flag in (False, True):
        sft = sft_mixtures(build_config(ChatSFTConfig, {**builtin, "builtin_restate_counts": flag}))
        rl_cfg = build_config(ChatRLConfig, {"task": "builtin-arithmetic", "synthetic_size": 400, "replay": 8,
                                             "builtin_restate_counts": flag})
        rl_train, replayed = builtin_train_task(rl_cfg), replay_mixture(rl_cfg, 40)
        for conversations in ([sft.train[i] for i in range(len(sft.train))],
                              [sft.val[i] for i in range(len(sft.val))],
                              [rl_train.get_example(i) for i in range(len(rl_train))],
                              [replayed[i] for i in range(len(replayed))]):
            assert workshops(conversations) > 0
            assert restated(conversations) == (workshops(conversations) if flag else 0)
    assert not ChatSFTConfig().builtin_restate_counts and not ChatRLConfig().builtin_restate_counts
    assert parse_cli(ChatSFTConfig, ["--builtin-restate-counts", "true"], prog="sft").builtin_restate_counts
    small, demo = PRESETS["cpu-small"], PRESETS["demo-cpu"]
    assert small["chat_sft"]["builtin_restate_counts"] and small["chat_rl"]["builtin_restate_counts"]
    assert "builtin_restate_counts" not in demo["chat_sft"] and "builtin_restate_counts" not in demo["chat_rl"]


def test_identity_conversations_from_a_jsonl_count_twice(tmp_path):
    path = tmp_path / "identity.jsonl"
    lines = [[{"role": "user", "content": f"who are you {i}?"}, {"role": "assistant", "content": "nanopipe"}]
             for i in range(5)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = build_config(MidTrainConfig, {"mixture": "builtin", "builtin_size": 10, "identity_path": str(path)})
    mixtures = mid_mixtures(cfg)
    assert mixtures.parts["train"]["identity"] == 10 and str(path) in mixtures.identity
    texts = [mixtures.train[i]["messages"][0]["content"] for i in range(len(mixtures.train))]
    assert sum(text.startswith("who are you") for text in texts) == 10


# -----------------------------------------------------------------------------
# Failures before training

def test_missing_source_checkpoint_exits_2_with_one_line(inputs, tmp_path, home, capsys):
    with pytest.raises(SystemExit) as exc:
        mid_train.main(tiny_chat_flags(tmp_path / "nowhere", tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nowhere") in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_exits_2_naming_both(inputs, tmp_path, home, capsys):
    write_base_checkpoint(tmp_path / "other", inputs["root"] / "tokenizer", vocab_size=600)
    with pytest.raises(SystemExit) as exc:
        mid_train.main(tiny_chat_flags(tmp_path / "other", tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(rf"{re.escape(str(tmp_path / 'other'))} step 10 has vocab_size=600 but tokenizer "
                     rf".*tokenizer has 512 tokens", err)
    assert not (tmp_path / "out").exists()


def test_a_missing_local_dataset_names_itself_and_its_flag(inputs, tmp_path, home, capsys):
    with pytest.raises(SystemExit) as exc:
        mid_train.main(tiny_chat_flags(inputs["base"], tmp_path / "out", gsm8k_path=tmp_path / "no_gsm8k"))
    assert exc.value.code == ExitCode.BAD_INPUT  # a retry would read the same missing path
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "dataset GSM8K (train) is not available" in err and "--gsm8k_path=PATH" in err
    assert not (tmp_path / "out").exists()


def test_hub_datasets_unavailable_offline_fail_before_training(inputs, tmp_path):
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "nanopipe.stages.mid_train",
                             *tiny_chat_flags(inputs["base"], tmp_path / "out", mixture="seed")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr[-2000:]  # offline, a retry cannot fix it
    assert "dataset SmolTalk (train) is not available" in result.stderr and "--smoltalk_path=PATH" in result.stderr
    assert "step 0" not in result.stdout and not (tmp_path / "out").exists()


def test_plan_only_needs_no_process_group(inputs, tmp_path):
    env = subprocess_env(tmp_path, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")  # as the flow runs it: no torchrun
    result = subprocess.run([sys.executable, "-m", "nanopipe.stages.mid_train", "--plan_only",
                             *flags(inputs, tmp_path / "out", total_batch_size=2048)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert re.search(r"Model \(source checkpoint .*d2 step 10\): 2 layers, width 64", out)
    assert re.search(r"parameters total\s+: [\d,]+", out) and "Estimated peak memory per device" in out
    assert re.search(r"Iterations: \d+ \(about one pass over 162 conversations", out)
    assert "World size 2, gradient accumulation steps: 2" in out
    assert not (tmp_path / "out").exists()
    # planning before base_train has run: the shape comes from the flags
    info = mid_train.run(build_config(MidTrainConfig, {"plan_only": True, "checkpoint_dir": str(tmp_path / "none"),
                                                       "depth": 12, "num_iterations": 10}))
    assert info["model_config"]["n_embd"] == 768 and info["total_tokens"] == 10 * 524288


def test_dry_run_trains_and_writes_nothing(inputs, tmp_path, home, capsys):
    """nanochat's --dry_run: the steps and the final evaluation run, no checkpoint or metrics.json is written."""
    metrics = mid_train.main(flags(inputs, tmp_path / "out", dry_run="true", num_iterations=2, save_every=1))
    log = capsys.readouterr().out
    assert sorted(step_losses(log)) == [1, 2] and metrics["step"] == 2 and metrics["val_loss"] is not None
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Training

def test_one_pass_learns_and_resume_is_exact(inputs, tmp_path, home, capsys):
    straight = tmp_path / "straight"
    precision_before = torch.backends.mkldnn.matmul.fp32_precision
    metrics = mid_train.main(flags(inputs, straight, save_every=3, eval_every=3))
    log = capsys.readouterr().out
    # the CPU matmul precision is chosen for the run, said in the log, and put back afterwards
    assert re.search(r"^float32 matmuls on CPU: (bf16|ieee) \(auto: ", log, re.M), log[:2000]
    assert torch.backends.mkldnn.matmul.fp32_precision == precision_before
    losses = step_losses(log)
    last = max(losses)
    assert sorted(losses) == list(range(1, last + 1)) and last >= 6
    assert losses[last][0] >= 100.0 > losses[last - 1][0]  # one pass over the mixture, then stop
    assert losses[last][2] < losses[1][2] - 0.3
    assert "identity conversations: builtin offline identity set" in log
    written = json.loads((straight / "metrics.json").read_text())
    assert written["step"] == last and written["val_loss"] == pytest.approx(metrics["val_loss"])
    assert written["progress"] >= 1.0 and "builtin offline identity" in written["identity"]
    assert written["data"]["parts"]["train"]["identity"] == 6 and written["total_tokens"] == last * 1024
    assert list_steps(straight)[-1] == last and 3 in list_steps(straight)
    # the flags' learning rates, whatever the batch size: nanochat's mid-training does not scale them
    muon_groups = torch.load(optim_path(straight, last, 0), weights_only=False)["optimizers"][1]["param_groups"]
    assert {group["initial_lr"] for group in muon_groups} == {TINY["matrix_lr"]}

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for path in straight.glob("*_000003*"):
        shutil.copy(path, resumed)
    mid_train.main(flags(inputs, resumed, save_every=3, eval_every=3, resume_from_step="latest"))
    log = capsys.readouterr().out
    assert "Resuming from step 3" in log
    again = step_losses(log)
    assert sorted(again) == list(range(4, last + 1))
    for step, values in again.items():
        assert values == pytest.approx(losses[step], rel=1e-5), step  # progress, EMA and raw loss
    a, _, meta = load_checkpoint(straight, last, "cpu")
    b, _, _ = load_checkpoint(resumed, last, "cpu")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-7)
    resumed_metrics = json.loads((resumed / "metrics.json").read_text())
    assert resumed_metrics["val_loss"] == pytest.approx(written["val_loss"])
    # the base model's loss on the held-out conversations (step 0) is the "before" of mid-training
    assert written["initial_val_loss"] > written["val_loss"] and written["val_tokens"] > 0
    assert resumed_metrics["initial_val_bpb"] == written["initial_val_bpb"]
    assert meta["val_loss"] == written["val_loss"] and meta["stage"] == "mid"
    # a downstream stage loads it like any other checkpoint
    model, tokenizer, _ = load_model("mid", "cpu", "eval", checkpoint_dir=straight)
    assert tokenizer.get_vocab_size() == model.config.vocab_size == 512


def test_final_checkpoint_is_written_before_the_final_evaluation(inputs, tmp_path, home, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation blew up")

    monkeypatch.setattr(mid_train, "evaluate_chat_loss", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation blew up"):
        mid_train.main(flags(inputs, out, num_iterations=2))
    assert list_steps(out) == [2] and optim_path(out, 2, 0).is_file()
    assert not (out / "metrics.json").exists()


def kill_all_writing_to(out_dir: Path) -> None:
    """SIGKILL every process whose command line names out_dir, until none is left."""
    for _ in range(100):
        pids = pids_with_cmdline(str(out_dir))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"processes writing to {out_dir} survived SIGKILL")


@pytest.mark.slow
def test_torchrun_two_ranks_killed_mid_run_resume_to_the_same_weights(inputs, tmp_path):
    """Two gloo ranks: an uninterrupted run vs. one SIGKILLed (launcher and workers) after its first
    checkpoint and resumed with the same command: same losses after the resume point, same final weights."""
    env = subprocess_env(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "nanopipe.stages.mid_train"]
    common = dict(num_iterations=8, save_every=2, eval_every=-1)
    one = subprocess.run([*command, *flags(inputs, tmp_path / "straight", **common)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    killed = subprocess.Popen([*command, *flags(inputs, tmp_path / "resumed", **common)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None and not (tmp_path / "resumed" / "meta_000002.json").exists():
        time.sleep(0.01)
    kill_all_writing_to(tmp_path / "resumed")   # torchrun and both ranks (in sessions of their own)
    killed.wait()
    assert (tmp_path / "resumed" / "meta_000002.json").exists() and not (tmp_path / "resumed" / "metrics.json").exists()
    two = subprocess.run([*command, *flags(inputs, tmp_path / "resumed", resume_from_step="latest", **common)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    resumed_from = int(re.search(r"Resuming from step (\d+)", two.stdout).group(1))
    assert resumed_from in (2, 4, 6)   # the newest complete checkpoint when the kill landed
    straight, resumed = step_losses(one.stdout), step_losses(two.stdout)
    assert sorted(resumed) == list(range(resumed_from + 1, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
    a, _, _ = load_checkpoint(tmp_path / "straight", 8, "cpu")
    b, _, meta = load_checkpoint(tmp_path / "resumed", 8, "cpu")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-7)
    assert [s["rank"] for s in meta["loader_state"]["ranks"]] == [0, 1]
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-5) and m2["world_size"] == 2
