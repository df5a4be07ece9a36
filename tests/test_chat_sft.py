"""chat_sft on CPU: seed flags, assistant-only targets with per-micro-batch padding, batcher resume, failures
before training, dry run without a process group, learning with exact resume, multiple-choice accuracy equal
to chat_eval's, the final checkpoint before the final evaluations, and two ranks under torchrun resuming to
the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanopipe.chat_format import render_conversation
from nanopipe.chat_batches import PaddedChatBatcher, supervised_loss
from nanopipe.checkpoint import list_steps, load_checkpoint, load_model, optim_path
from nanopipe.configs.base import ConfigError, build_config
from nanopipe.configs.flags import parse_config
from nanopipe.configs.chat_sft import ChatSFTConfig
from nanopipe.exit_codes import ExitCode
from nanopipe.stages import chat_eval, chat_sft
from nanopipe.tasks import TaskMixture, builtin_chat_mixture
from nanopipe.tasks.builtin import ArithmeticProblems
from nanopipe.tasks.mixtures import sft_mixtures
from nanopipe.gpt import GPT, GPTConfig
from tests.chat_fixtures import tiny_chat_flags, tokenizer_and_base, write_base_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss: ([\d.]+) \(this step ([\d.]+)\)", re.M)
TINY = dict(source="base", builtin_size=16, device_batch_size=4, target_examples_per_step=8, init_lr_frac=1.0,
            eval_every=-1, eval_steps=4, eval_metrics_every=-1, eval_metrics_max_problems=24)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tokenizer_and_base(tmp_path_factory.mktemp("sft"))


def flags(inputs, out_dir: Path, **overrides) -> list[str]:
    return tiny_chat_flags(inputs["base"], out_dir, **{**TINY, **overrides})


def step_losses(text: str) -> dict[int, tuple[float, float]]:
    return {int(s): (float(a), float(b)) for s, a, b in STEP_LINE.findall(text)}


# -----------------------------------------------------------------------------
# Flags

def test_defaults_are_the_seeds():
    cfg = build_config(ChatSFTConfig, {})
    assert (cfg.num_epochs, cfg.num_iterations, cfg.device_batch_size, cfg.target_examples_per_step) == (1, None, 4, 32)
    assert (cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.init_lr_frac) == (0.2, 0.004, 0.02, 0.02)
    assert (cfg.eval_every, cfg.eval_steps, cfg.eval_metrics_every, cfg.eval_metrics_max_problems) == (100, 100, 200, 1024)
    assert (cfg.source, cfg.mixture, cfg.weight_decay, cfg.save_every) == ("mid", "seed", 0.0, None)
    assert build_config(ChatSFTConfig, {"source": "base"}).source == "base"
    with pytest.raises(ConfigError, match=r"--target_examples_per_step=30 is not a multiple of --device_batch_size "
                                          r"\(4\) x world size \(1\) = 4; try --target_examples_per_step=28 or 32"):
        build_config(ChatSFTConfig, {"target_examples_per_step": 30})


def test_loss_per_defaults_to_tokens_and_takes_both_spellings():
    assert build_config(ChatSFTConfig, {}).loss_per == "token"   # nanochat's averaging unless asked
    for argv in (["--loss_per=conversation"], ["--loss-per", "conversation"]):
        assert parse_config(ChatSFTConfig, argv, prog="sft").loss_per == "conversation"
    with pytest.raises(ConfigError, match="loss_per"):
        build_config(ChatSFTConfig, {"loss_per": "example"})


@pytest.mark.parametrize("flag, arg", [
    ("--chat_sft.loss_per=conversation", "--loss_per=conversation"),
    ("--chat-sft.loss-per=conversation", "--loss_per=conversation"),
    ("--chat_sft.mc_first=64", "--mc_first=64"),
    ("--chat-sft.mc-first=64", "--mc_first=64"),
])
def test_sft_data_and_loss_flags_reach_the_stage_command_and_its_hash(flag, arg, tmp_path):
    from flows.cli import build_pipeline_config
    from flows.plan import plan_pipeline

    def sft_plan(*argv):
        config = build_pipeline_config(["--preset=demo-cpu", *argv])
        return next(p for p in plan_pipeline(config, home=tmp_path) if p.stage == "chat_sft")

    default, changed = sft_plan(), sft_plan(flag)
    name, value = arg[2:].split("=")
    assert arg in changed.args and not any(a.startswith(f"--{name}=") for a in default.args)
    assert changed.hash != default.hash
    assert str(getattr(parse_config(ChatSFTConfig, changed.args, prog="sft"), name)) == value


def test_mc_first_opens_the_builtin_mixture_and_needs_it():
    cfg = build_config(ChatSFTConfig, {"mixture": "builtin", "builtin_size": 20})
    plain, first = sft_mixtures(cfg), sft_mixtures(cfg.model_copy(update={"mc_first": 6}))
    assert len(first.train) == len(plain.train) + 6
    assert first.describe()["parts"]["train"]["MultipleChoice first"] == 6
    for index in range(6):   # multiple choice: one letter of the four as the whole answer
        assert first.train[index]["messages"][-1]["content"] in "ABCD"
    assert [first.train[6 + i] for i in range(len(plain.train))] == [plain.train[i] for i in range(len(plain.train))]
    assert parse_config(ChatSFTConfig, ["--mc-first", "6", "--mixture=builtin"], prog="sft").mc_first == 6
    with pytest.raises(ConfigError, match="--mc_first=6 opens the builtin mixture"):
        build_config(ChatSFTConfig, {"mc_first": 6})


def test_lr_restart_decays_each_part_of_the_curriculum_on_its_own():
    assert [chat_sft.lr_multiplier(s, 10) for s in (0, 5, 9)] == pytest.approx([1, 0.5, 0.1])  # nanochat's
    assert [chat_sft.lr_multiplier(s, 10, restart_at=4) for s in (0, 2, 3, 4, 7, 9)] == pytest.approx(
        [1, 0.5, 0.25, 1, 0.5, 1 / 6])
    assert [chat_sft.lr_multiplier(s, 10, 4, restart_frac=0.5) for s in (3, 4, 7)] == pytest.approx([0.25, 0.5, 0.25])
    assert chat_sft.lr_multiplier(3, 10, restart_at=10) == pytest.approx(0.7)  # no restart inside the run: one decay
    cfg = build_config(ChatSFTConfig, {"mixture": "builtin", "mc_first": 100, "target_examples_per_step": 32})
    assert chat_sft.lr_restart_step(cfg) == 0 and cfg.lr_restart == 0            # off unless asked
    # the first step that is not all multiple choice: 3 x 32 = 96 of the 100 opening conversations
    assert chat_sft.lr_restart_step(cfg.model_copy(update={"lr_restart": 0.5})) == 3
    for argv in (["--lr_restart=0.5"], ["--lr-restart", "0.5"]):
        assert parse_config(ChatSFTConfig, ["--mixture=builtin", "--mc_first=64", *argv], prog="sft").lr_restart == 0.5
    with pytest.raises(ConfigError, match="--lr_restart=0.5 restarts the learning rate after the --mc_first"):
        build_config(ChatSFTConfig, {"mixture": "builtin", "lr_restart": 0.5})
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="lr_restart"):
            build_config(ChatSFTConfig, {"mixture": "builtin", "mc_first": 8, "lr_restart": bad})


def test_a_run_with_lr_restart_logs_the_two_decays(inputs, tmp_path, home, capsys):
    """8 opening conversations of 8 a step, 4 iterations: step 0 alone, then steps 1-2 from half the rate."""
    chat_sft.main(flags(inputs, tmp_path / "out", mixture="builtin", mc_first=8, lr_restart=0.5, num_iterations=4,
                        save_every=-1))
    log = capsys.readouterr().out
    assert "linear decay over the multiple-choice opening's 1 steps, then again from 0.5 x 1 of the flags' rates" in log
    assert [float(v) for v in re.findall(r"\| lrm: ([\d.]+) \|", log)] == [1.0, 0.5, pytest.approx(1 / 3, abs=1e-4)]


def test_gpu_presets_average_the_loss_over_tokens():
    from flows.config import PipelineConfig
    from flows.presets import PRESETS
    for name in PRESETS:
        config = PipelineConfig(preset=name)
        if config.common.device_type != "cpu":
            assert config.chat_sft.loss_per == "token", name


# -----------------------------------------------------------------------------
# The loss

def _tiny_model_and_batch() -> tuple[GPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    for param in model.parameters():   # random everywhere, so that every token has its own loss
        torch.nn.init.normal_(param, std=0.5)
    inputs, targets = torch.randint(0, 32, (3, 8)), torch.randint(0, 32, (3, 8))
    targets[0, :7] = -1   # one supervised token, as a multiple-choice letter
    targets[1, :2] = -1   # six
    targets[2, :] = -1    # none: a row that does not count
    return model, inputs, targets


def test_token_loss_is_the_mean_over_supervised_tokens_by_default():
    model, inputs, targets = _tiny_model_and_batch()
    per_token = model(inputs, targets, loss_reduction="none").view_as(targets)
    expected = per_token[targets >= 0].mean()
    torch.testing.assert_close(supervised_loss(model, inputs, targets), expected)
    torch.testing.assert_close(supervised_loss(model, inputs, targets, "token"), expected)


def test_conversation_loss_is_the_mean_of_each_supervised_rows_mean():
    model, inputs, targets = _tiny_model_and_batch()
    per_token = model(inputs, targets, loss_reduction="none").view_as(targets)
    loss = supervised_loss(model, inputs, targets, "conversation")
    torch.testing.assert_close(loss, (per_token[0, 7] + per_token[1, 2:].mean()) / 2)
    assert not torch.isclose(loss, supervised_loss(model, inputs, targets, "token"))


@pytest.mark.parametrize("per, weights", [
    ("token", [[0] * 7 + [1 / 7], [0, 0] + [1 / 7] * 6, [0] * 8]),
    ("conversation", [[0] * 7 + [1 / 2], [0, 0] + [1 / 12] * 6, [0] * 8]),
])
def test_how_much_each_supervised_token_weighs(per, weights):
    """The gradient of the loss with respect to each token's loss: by conversation, the one-letter answer weighs
    as much as the whole six-token one."""
    _, inputs, targets = _tiny_model_and_batch()
    token_losses = torch.rand(targets.shape, requires_grad=True)

    def model(inputs_, targets_, loss_reduction):
        losses = torch.where(targets_ >= 0, token_losses, 0.0)
        return losses.sum() if loss_reduction == "sum" else losses.reshape(-1)

    supervised_loss(model, inputs, targets, per).backward()
    torch.testing.assert_close(token_losses.grad, torch.tensor(weights))
    nothing = torch.full_like(targets, -1)
    assert supervised_loss(model, inputs, nothing, per).item() == 0.0


# -----------------------------------------------------------------------------
# Batches

def test_targets_are_the_assistant_tokens_only_and_padding_is_ignored(inputs):
    tok = inputs["tokenizer"]
    data = TaskMixture([ArithmeticProblems(6, "train", 1), *builtin_chat_mixture("train", 1, 6).tasks], seed=1)
    batcher = PaddedChatBatcher(tok, data, batch_size=4, max_tokens=128)
    pad = tok.encode_special("<|assistant_end|>")
    output_start = tok.encode_special("<|output_start|>")
    position = 0
    for _ in range(4):
        inputs_, targets = next(batcher)
        rendered = [render_conversation(tok, data[position + i], max_tokens=128) for i in range(4)]
        position += 4
        assert inputs_.shape[1] == max(len(ids) for ids, _ in rendered) - 1  # padded to the longest of this batch
        for row, (ids, mask) in enumerate(rendered):
            n = len(ids) - 1
            assert inputs_[row, :n].tolist() == ids[:-1] and (inputs_[row, n:] == pad).all()
            expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
            assert targets[row, :n].tolist() == expected and (targets[row, n:] == -1).all()
            assert targets[row, :n].ge(0).any()  # the answer is supervised
            if output_start in ids:  # tool output comes from the calculator, never a target
                assert output_start not in targets[row].tolist() and ids.index(output_start) > 0


def test_batcher_resumes_exactly_and_ranks_split_the_data(inputs):
    tok = inputs["tokenizer"]
    data = builtin_chat_mixture("train", seed=2, size=3)  # 18 conversations: the loader wraps into epoch 2
    batcher = PaddedChatBatcher(tok, data, batch_size=4, max_tokens=96)
    for _ in range(3):
        next(batcher)
    state = json.loads(json.dumps(batcher.state_dict()))
    expected = [next(batcher) for _ in range(3)]
    assert batcher.epoch == 2
    resumed = PaddedChatBatcher(tok, data, batch_size=4, max_tokens=96, resume_state=state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    firsts = [next(PaddedChatBatcher(tok, data, 1, 96, rank=r, world_size=2))[0][0].tolist() for r in range(2)]
    assert firsts[0] != firsts[1]


# -----------------------------------------------------------------------------
# Failures before training, dry run

def test_missing_or_mismatched_source_exits_2_with_one_line(inputs, tmp_path, home, capsys):
    with pytest.raises(SystemExit) as exc:
        chat_sft.main(flags(inputs, tmp_path / "out", checkpoint_dir=tmp_path / "nowhere"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert f"source checkpoint directory {tmp_path / 'nowhere'} does not exist" in err
    write_base_checkpoint(tmp_path / "other", inputs["root"] / "tokenizer", vocab_size=640)
    with pytest.raises(SystemExit) as exc:
        chat_sft.main(flags(inputs, tmp_path / "out", checkpoint_dir=tmp_path / "other"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "has vocab_size=640 but tokenizer" in err and "has 512 tokens" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_local_dataset_exits_2_naming_itself_and_its_flag(inputs, tmp_path, home, capsys):
    with pytest.raises(SystemExit) as exc:
        chat_sft.main(flags(inputs, tmp_path / "out", identity_path=tmp_path / "no_identity.jsonl"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == ExitCode.BAD_INPUT and len(err.splitlines()) == 1
    assert "dataset identity conversations is not available" in err and "--identity_path=PATH" in err
    assert not (tmp_path / "out").exists()


def test_plan_only_plans_without_a_process_group(inputs, tmp_path, home, monkeypatch, capsys):
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    info = chat_sft.main(flags(inputs, tmp_path / "out", plan_only=True))
    out = capsys.readouterr().out
    assert not dist.is_initialized() and not (tmp_path / "out").exists()
    # builtin_size x BUILTIN_SFT_WEIGHTS: identity 4, arithmetic 32, MC 32, SimpleSpelling 4, SpellingBee 32
    assert info["train_examples"] == 4 + 32 + 32 + 4 + 32
    assert info["num_iterations"] == info["train_examples"] // 8 and info["grad_accum_steps"] == 1
    assert re.search(r"parameters total\s+: [\d,]+", out) and "Estimated peak memory per device" in out
    assert f"Iterations: {info['num_iterations']} (1 epoch(s) of 104 conversations" in out and "Tokens: at most" in out
    seed = chat_sft.run(build_config(ChatSFTConfig, {"plan_only": True, "checkpoint_dir": str(tmp_path / "none")}))
    assert seed["num_iterations"] == 22443 // 32 and seed["model_config"]["n_layer"] == 20


# -----------------------------------------------------------------------------
# Training

def test_sft_learns_resumes_exactly_and_reports_chat_eval_accuracy(inputs, tmp_path, home, capsys):
    straight = tmp_path / "straight"
    metrics = chat_sft.main(flags(inputs, straight, num_iterations=8, save_every=4, eval_every=4,
                                  eval_metrics_every=4))
    log = capsys.readouterr().out
    losses = step_losses(log)
    # nanochat's count: 8 iterations, the last only evaluates, so 7 optimizer steps
    assert sorted(losses) == list(range(7)) and losses[6][0] < losses[0][0] - 0.2
    assert "val loss (assistant tokens)" in log and "MultipleChoice accuracy" in log
    written = json.loads((straight / "metrics.json").read_text())
    assert written["val_loss"] == pytest.approx(metrics["val_loss"]) and written["step"] == 7
    assert set(written["accuracy"]) == {"MultipleChoice"} and "builtin offline identity" in written["identity"]
    assert list_steps(straight) == [4, 7]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for path in straight.glob("*_000004*"):
        shutil.copy(path, resumed)
    again = chat_sft.main(flags(inputs, resumed, num_iterations=8, save_every=4, eval_every=4, eval_metrics_every=4,
                                resume_from_step="latest"))
    log = capsys.readouterr().out
    assert "Resuming from step 4" in log
    resumed_losses = step_losses(log)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step, values in resumed_losses.items():
        assert values == pytest.approx(losses[step], rel=1e-5), step
    a, _, meta = load_checkpoint(straight, 7, "cpu")
    b, _, _ = load_checkpoint(resumed, 7, "cpu")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-7)
    assert again["val_loss"] == pytest.approx(written["val_loss"], rel=1e-5)
    assert again["accuracy"] == written["accuracy"] and meta["accuracy"] == written["accuracy"]

    # the accuracy is chat_eval's, on the same problems
    model, _, _ = load_model("sft", "cpu", "eval", checkpoint_dir=straight)
    evaluated = chat_eval.main([f"--checkpoint_dir={straight}", "--device_type=cpu", "--task=MultipleChoice",
                                "--max_problems=24", "--synthetic_size=256", f"--out_dir={tmp_path / 'eval'}"])
    assert evaluated["accuracy"]["MultipleChoice"] == pytest.approx(written["accuracy"]["MultipleChoice"])


def test_final_checkpoint_is_written_before_the_final_evaluations(inputs, tmp_path, home, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation blew up")

    monkeypatch.setattr(chat_sft, "evaluate_chat_loss", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation blew up"):
        chat_sft.main(flags(inputs, out, num_iterations=3))
    assert list_steps(out) == [2] and optim_path(out, 2, 0).is_file() and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_resume_to_the_same_weights(inputs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOPIPE_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "nanopipe.stages.chat_sft"]
    common = dict(num_iterations=5, save_every=2, eval_every=2, eval_metrics_every=4)
    one = subprocess.run([*command, *flags(inputs, tmp_path / "straight", **common)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert optim_path(tmp_path / "straight", 2, 1).is_file()
    (tmp_path / "resumed").mkdir()
    for path in (tmp_path / "straight").glob("*_000002*"):
        shutil.copy(path, tmp_path / "resumed")
    two = subprocess.run([*command, *flags(inputs, tmp_path / "resumed", resume_from_step="latest", **common)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    straight, resumed = step_losses(one.stdout), step_losses(two.stdout)
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
    a, _, _ = load_checkpoint(tmp_path / "straight", 4, "cpu")
    b, _, _ = load_checkpoint(tmp_path / "resumed", 4, "cpu")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-7)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert m2["world_size"] == 2 and m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-5)
    assert m2["accuracy"] == m1["accuracy"]
