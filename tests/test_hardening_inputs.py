"""Bad inputs end in one line, never a traceback, and nothing is accepted silently: a non-UTF-8 or directory input to
`data prepare`, a checkpoint whose meta disagrees with its weights or whose weights are not finite, an empty dataset
file, rows longer than the model's rotary tables, a resume in another stage's directory or with another batch
shape, conversations cut to the context, and an evaluation with nothing to measure (issue 21)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nanopipe.chat_batches import PaddedChatBatcher, evaluate_chat_loss
from nanopipe.checkpoint import (BadCheckpointError, CheckpointError, build_model, load_checkpoint,
                                 load_resume_checkpoint, meta_path, model_path, save_checkpoint)
from nanopipe.common import PROGRESS_PREFIX
from nanopipe.configs.flags import parse_config
from nanopipe.data.cli import main as data_main
from nanopipe.exit_codes import ExitCode
from nanopipe.stages import chat_cli, chat_eval, chat_rl, chat_sft, mid_train
from nanopipe.tasks import GSM8K, TaskDataError
from tests.chat_fixtures import build_chat_tokenizer, tiny_chat_flags, write_base_checkpoint
from tests.test_hardening_data import one_line_exit_2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A chat tokenizer and a depth-2 base checkpoint (context 128), shared by the module's tests."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = build_chat_tokenizer(root / "tokenizer")
    write_base_checkpoint(root / "base" / "d2", root / "tokenizer", tokenizer.get_vocab_size())
    return {"root": root, "tokenizer": tokenizer, "base": root / "base" / "d2"}


def copy_checkpoint(src: Path, dst: Path, step: int = 10, edit_meta=None, edit_state=None) -> Path:
    """A copy of checkpoint `step` with its meta and/or model state edited."""
    state, _, meta = load_checkpoint(src, step, "cpu")
    if edit_state:
        edit_state(state)
    if edit_meta:
        edit_meta(meta)
    save_checkpoint(dst, step, state, None, {k: v for k, v in meta.items() if k != "step"})
    return dst


def eval_flags(ckpt_dir: Path, tmp_path: Path) -> list[str]:
    return [f"--checkpoint_dir={ckpt_dir}", "--task=Arithmetic", "--synthetic_size=4", "--device_type=cpu",
            "--max_new_tokens=4", f"--out_dir={tmp_path / 'eval'}"]


# -----------------------------------------------------------------------------
# data prepare

def test_prepare_names_the_line_that_is_not_utf8_and_a_directory_as_one(tmp_path, capsys):
    bad = tmp_path / "docs.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n')
    one_line_exit_2(capsys, lambda: data_main(["prepare", "--input", str(bad), "--out", str(tmp_path / "out")]),
                    f"{bad}:2", "UTF-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    line = one_line_exit_2(capsys, lambda: data_main(["prepare", "--input", str(folder), "--out",
                                                      str(tmp_path / "out")]), str(folder), "is a directory")
    assert "does not exist" not in line
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Checkpoints: a meta that disagrees with the weights, weights that are not finite

def test_a_meta_that_disagrees_with_the_weights_is_one_line_naming_the_file(inputs, tmp_path, capsys):
    bad = copy_checkpoint(inputs["base"], tmp_path / "d2", edit_meta=lambda m: m["model_config"].update(n_layer=3))
    with pytest.raises(BadCheckpointError) as err:
        build_model(bad, 10, "cpu", phase="eval")
    message = str(err.value)
    assert str(meta_path(bad, 10)) in message and "n_layer=3" in message and "\n" not in message
    assert "missing from the weights" in message
    wide = copy_checkpoint(inputs["base"], tmp_path / "wide",
                           edit_meta=lambda m: m["model_config"].update(n_embd=128, n_head=4, n_kv_head=4))
    with pytest.raises(BadCheckpointError, match=r"is \[\d+, 64\] in the weights, \[\d+, 128\] per the meta"):
        build_model(wide, 10, "cpu", phase="eval")
    one_line_exit_2(capsys, lambda: chat_eval.main(eval_flags(bad, tmp_path)), str(meta_path(bad, 10)), "n_layer=3")


def test_non_finite_weights_are_refused_at_load_for_every_stage(inputs, tmp_path, home, capsys):
    def poison(state):
        state[next(k for k in state if k.endswith("attn.c_q.weight"))][0, 0] = float("nan")

    nan = copy_checkpoint(inputs["base"], tmp_path / "nan" / "d2", edit_state=poison)
    with pytest.raises(BadCheckpointError, match=rf"{re.escape(str(model_path(nan, 10)))} holds non-finite weights"):
        build_model(nan, 10, "cpu", phase="eval")
    # chat_eval would score it; chat_rl would die inside torch.multinomial
    one_line_exit_2(capsys, lambda: chat_eval.main(eval_flags(nan, tmp_path)), str(model_path(nan, 10)),
                    "non-finite")
    rl = [f"--checkpoint_dir={nan}", "--source=base", "--task=builtin-arithmetic", "--synthetic_size=8",
          "--device_type=cpu", "--num_iterations=1", "--examples_per_step=2", "--num_samples=2",
          "--device_batch_size=2", "--max_new_tokens=4", "--eval_every=-1", "--eval_examples=2",
          f"--out_dir={tmp_path / 'rl'}"]
    one_line_exit_2(capsys, lambda: chat_rl.main(rl), str(model_path(nan, 10)), "non-finite")


def test_a_resume_skips_a_non_finite_checkpoint_or_names_it(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    for step, value in ((2, 0.5), (4, float("inf"))):
        save_checkpoint(out, step, {"w": torch.full((8,), value)}, {"opt": step},
                        {"loader_state": {"world_size": 1, "ranks": [None]}, "loop_state": {}})
    point = load_resume_checkpoint(out, "latest", 1, "cpu")
    assert point.step == 2 and "step 4 (model_000004.pt holds non-finite weights" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="step 4 .*non-finite weights"):
        load_resume_checkpoint(out, 4, 1, "cpu")


# -----------------------------------------------------------------------------
# Datasets: an empty file, a hub that cannot be reached

def test_an_empty_dataset_file_is_refused_at_load(inputs, tmp_path, home, capsys):
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    (data / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(TaskDataError, match=rf"{re.escape(str(data / 'train.jsonl'))} holds no rows for split "
                                            rf"'train': the dataset file is empty"):
        GSM8K("main", "train", data)
    assert len(GSM8K("main", "test", data)) == 1
    # chat_rl divided by the number of training questions (ZeroDivisionError)
    rl = [f"--checkpoint_dir={inputs['base']}", "--source=base", f"--gsm8k_path={data}", "--device_type=cpu",
          f"--out_dir={tmp_path / 'rl'}"]
    one_line_exit_2(capsys, lambda: chat_rl.main(rl), str(data / "train.jsonl"), "empty")


def test_a_hub_dataset_that_cannot_load_names_the_flag_of_a_local_copy(monkeypatch):
    import datasets

    from nanopipe.tasks import HumanEval

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskDataError, match=r"openai/openai_humaneval .*--humaneval_path=PATH"):
        HumanEval()
    with pytest.raises(TaskDataError, match=r"--gsm8k_path=PATH"):
        GSM8K()


# -----------------------------------------------------------------------------
# Chat training: rows past the rotary tables, a resume in another stage's directory or with another batch shape,
# conversations cut to the context, an evaluation with nothing to measure

MID = dict(source="base", builtin_size=8, device_batch_size=2, max_seq_len=64, total_batch_size=256, eval_every=-1,
           eval_tokens=128)


def mid_flags(inputs, out_dir: Path, **overrides) -> list[str]:
    return tiny_chat_flags(inputs["base"], out_dir, **{**MID, **overrides})


def test_rows_longer_than_the_rotary_tables_are_refused_before_loading(inputs, tmp_path, home, capsys):
    # the base model's context is 128 tokens: its rotary tables hold 1280 positions
    long_rows = dict(max_seq_len=2048, device_batch_size=1, total_batch_size=2048, eval_tokens=2048)
    for extra in ([], ["--plan_only=true"]):
        one_line_exit_2(capsys, lambda: mid_train.main(mid_flags(inputs, tmp_path / "mid", **long_rows) + extra),
                        "--max_seq_len=2048", "rotary tables", "1280 positions")
    assert not (tmp_path / "mid").exists()
    mid_train.main(mid_flags(inputs, tmp_path / "mid", plan_only="true", max_seq_len=1280, device_batch_size=1,
                             total_batch_size=1280, eval_tokens=1280))


def test_a_resume_with_another_stage_or_batch_shape_is_refused_naming_it(inputs, tmp_path, home, capsys):
    out = tmp_path / "mid"
    mid_train.main(mid_flags(inputs, out, num_iterations=2, save_every=1))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--max_seq_len=64" in warnings[0] and "cropped" in warnings[0]
    assert json.loads((out / "metrics.json").read_text())["cropped_conversations"] > 0
    for flag, value, saved in (("total_batch_size", 512, 256), ("max_seq_len", 32, 64)):
        resumed = mid_flags(inputs, out, num_iterations=3, resume_from_step="latest", **{flag: value})
        one_line_exit_2(capsys, lambda: mid_train.main(resumed),
                        f"--{flag}={value} differs from --{flag}={saved} of checkpoint step 2 in {out}")
    # chat_sft resumed in mid_train's directory ("packed is not padded")
    sft = tiny_chat_flags(inputs["base"], out, source="base", builtin_size=8, device_batch_size=2,
                          target_examples_per_step=2, num_iterations=3, eval_every=-1, eval_steps=1,
                          eval_metrics_every=-1, resume_from_step="latest")
    one_line_exit_2(capsys, lambda: chat_sft.main(sft), f"step 2 in {out} was written by mid_train, not chat_sft",
                    "another stage")


def test_resume_checks_each_stage_batch_flags(tmp_path):
    from nanopipe.checkpoint import check_resumable
    from nanopipe.configs.base import ConfigError, build_config
    from nanopipe.configs.base_train import BaseTrainConfig
    from nanopipe.configs.chat_rl import ChatRLConfig
    from nanopipe.configs.chat_sft import ChatSFTConfig

    for cls, stage, flag, old, new in ((ChatSFTConfig, "sft", "target_examples_per_step", 32, 64),
                                       (ChatRLConfig, "rl", "examples_per_step", 16, 8),
                                       (ChatRLConfig, "rl", "num_samples", 16, 4),
                                       (BaseTrainConfig, None, "total_batch_size", 524288, 262144)):
        meta = {"user_config": build_config(cls, {}).model_dump(mode="json"), **({"stage": stage} if stage else {})}
        check_resumable(build_config(cls, {}), stage, meta, tmp_path, 5)
        with pytest.raises(ConfigError, match=rf"--{flag}={new} differs from --{flag}={old} of checkpoint step 5"):
            check_resumable(build_config(cls, {flag: new}), stage, meta, tmp_path, 5)
    with pytest.raises(ConfigError, match="written by base_train, not chat_rl"):
        check_resumable(build_config(ChatRLConfig, {}), "rl", {"user_config": {}}, tmp_path, 5)


def chats(count: int, user_words: int):
    """A task of `count` conversations whose user message has `user_words` words (200 fill the 128-token context)."""
    from nanopipe.tasks.base import Task

    class Chats(Task):
        def num_examples(self):
            return count

        def get_example(self, index):
            return {"messages": [{"role": "user", "content": f"question {index}: " + "and so " * user_words},
                                 {"role": "assistant", "content": "The answer."}]}

    return Chats()


def strict_json(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON: {text}"))


def test_sft_drops_conversations_cut_before_their_answer_and_reports_no_nan(inputs, tmp_path, home, monkeypatch,
                                                                            capsys):
    from nanopipe.tasks import TaskMixture
    from nanopipe.tasks.mixtures import ChatMixtures

    tok = inputs["tokenizer"]
    train = TaskMixture([chats(12, user_words=3), chats(4, user_words=200)], seed=1)
    val = TaskMixture([chats(4, user_words=200)], seed=1)
    batcher = PaddedChatBatcher(tok, train, batch_size=4, max_tokens=128)
    for _ in range(6):  # two passes: every long conversation came by, and none was trained on
        _, targets = next(batcher)
        assert (targets >= 0).any(dim=1).all()
    assert batcher.cut == batcher.dropped == 8 and batcher.position == 32
    assert PaddedChatBatcher(tok, val, 2, 128, drop_unsupervised=False).__next__()[1].lt(0).all()
    with pytest.raises(Exception, match="none of the 4 conversations .* keeps an assistant token within 128"):
        next(PaddedChatBatcher(tok, val, 2, 128))
    assert evaluate_chat_loss(lambda x, y, loss_reduction: torch.zeros(y.numel()), iter([(torch.zeros(1, 3,
                              dtype=torch.long), torch.full((1, 3), -1))]), 1, torch.ones(8))["loss"] is None

    mixtures = ChatMixtures(train, val, {"train": {"mixed": len(train)}, "val": {"long": len(val)}})
    monkeypatch.setattr(chat_sft, "sft_mixtures", lambda cfg: mixtures)
    out = tmp_path / "sft"
    chat_sft.main(tiny_chat_flags(inputs["base"], out, source="base", device_batch_size=4, target_examples_per_step=4,
                                  num_iterations=5, eval_every=2, eval_steps=1, eval_metrics_every=-1))
    log = capsys.readouterr().out
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    counts = re.search(r"(\d+) of the (\d+) training conversations read were longer than the model's context "
                       r"\(128 tokens\) and were cut; (\d+) of them kept no assistant token and were dropped",
                       warnings[0]) if len(warnings) == 1 else None
    cut, read, dropped = map(int, counts.groups())
    assert cut == dropped >= 1 and read == 4 * 4 + dropped  # 4 optimizer steps of 4 trained conversations
    metrics = strict_json((out / "metrics.json").read_text())
    assert metrics["val_loss"] is None and metrics["val_bpb"] is None
    assert (metrics["cut_conversations"], metrics["dropped_conversations"]) == (cut, dropped)
    progress = [strict_json(line[len(PROGRESS_PREFIX):]) for line in log.splitlines() if
                line.startswith(PROGRESS_PREFIX)]
    assert {p["val_loss"] for p in progress if "val_loss" in p} == {None}
    assert "val loss (assistant tokens): n/a" in log and not re.search(r"\bnan\b", log, re.I)


# -----------------------------------------------------------------------------
# Planning: inputs a late stage reads, the artifact store

def pipeline_plans(home: Path, **sections):
    from flows.config import PipelineConfig
    from flows.plan import plan_pipeline

    values = {"preset": "demo-cpu", "run_rl": True, "resources": {"nproc_per_node": 1}, **sections}
    return plan_pipeline(PipelineConfig.model_validate(values), home=home)


def test_planning_names_the_flag_of_each_input_a_late_stage_would_miss(tmp_path, monkeypatch):
    from flows import plan as planning

    monkeypatch.setattr(planning, "dry_run", lambda *a, **k: pytest.fail("a dry run started before the input check"))
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    plans = pipeline_plans(tmp_path, mid_train={"mixture": "seed", "identity_path": str(tmp_path / "who.jsonl")},
                           chat_eval={"task": ["HumanEval", "Arithmetic"]},
                           chat_rl={"task": "gsm8k", "gsm8k_path": str(tmp_path / "gsm8k")})
    with pytest.raises(planning.PlanError) as err:  # a missing file fails at planning, online or not
        planning.preflight(plans)
    problems = str(err.value).split("; ")
    assert problems == [f"stage mid_train: --mid_train.identity_path={tmp_path / 'who.jsonl'} does not exist",
                        f"stage chat_rl: --chat_rl.gsm8k_path={tmp_path / 'gsm8k'} does not exist"]
    (tmp_path / "who.jsonl").write_text("")
    (tmp_path / "gsm8k").mkdir()
    planning.check_inputs(plans)  # online: the hub datasets are the stages' business
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(planning.PlanError) as err:
        planning.check_inputs(plans)
    problems = str(err.value).split("; ")
    assert all("comes from the Hugging Face hub, which is offline (HF_HUB_OFFLINE=1)" in p for p in problems)
    assert [p.rpartition(" ")[2] for p in problems] == [
        "--mid_train.smoltalk_path=PATH", "--mid_train.mmlu_path=PATH", "--mid_train.gsm8k_path=PATH",
        *["--chat_eval.humaneval_path=PATH"] * 3]  # chat_eval runs after mid_train, SFT and RL
    (tmp_path / "hf" / "hub" / "datasets--openai--openai_humaneval").mkdir(parents=True)  # in the cache
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # it wins over HF_HUB_OFFLINE, as in `datasets`
    planning.check_inputs(plans)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(planning.PlanError) as err:
        planning.check_inputs(plans)
    assert "humaneval" not in str(err.value) and "--mid_train.smoltalk_path=PATH" in str(err.value)


@pytest.mark.parametrize("store, why", [
    ("ftp://example.org/store", "unsupported protocol ftp://"),
    ("/proc/nanopipe-store", "cannot be written"),
    ("relative/store", "is a relative path: it would resolve against the flow's working directory"),
    ("file://relative/store", "is a relative path"),
])
def test_an_unusable_artifact_store_is_refused_at_planning(tmp_path, monkeypatch, store, why):
    from flows.plan import PlanError

    monkeypatch.delenv("NANOPIPE_ARTIFACT_STORE", raising=False)
    with pytest.raises(PlanError) as err:
        pipeline_plans(tmp_path, artifact_store=store)
    assert str(err.value).startswith(f"artifact_store {store!r}") and why in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("NANOPIPE_ARTIFACT_STORE", store)
    with pytest.raises(PlanError, match=r"^\$NANOPIPE_ARTIFACT_STORE"):
        pipeline_plans(tmp_path)
    monkeypatch.delenv("NANOPIPE_ARTIFACT_STORE")
    for good in (str(tmp_path / "store"), (tmp_path / "new" / "store").as_uri()):
        assert pipeline_plans(tmp_path, artifact_store=good)
    assert not (tmp_path / "new").exists()  # probing writes nothing that stays


# -----------------------------------------------------------------------------
# chat_cli

def test_an_empty_prompt_is_an_error_not_the_interactive_chat(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("the interactive chat opened"))
    for argv in (["-p", ""], ["--prompt="], ["-p", "  "]):
        one_line_exit_2(capsys, lambda: chat_cli.main([f"--checkpoint_dir={inputs['base']}", "--device_type=cpu",
                                                       *argv]), "-p/--prompt is empty")
    assert parse_config(chat_cli.ChatCliConfig, [], short_aliases=chat_cli.SHORT_FLAGS).prompt is None
