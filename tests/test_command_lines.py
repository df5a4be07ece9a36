"""Every documented command line of the chat stages parses: those of the README and of the stages' own
docstrings, and nanochat's (its speedrun and run1000 scripts at 061f83c, `scripts.<stage>` read as
`nanopipe.stages.<stage>`), with nanochat's meaning where the two share a flag."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nanopipe.configs.chat_eval import CHATCORE_TASKS, SHORT_FLAGS, ChatEvalConfig
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.configs.chat_sft import ChatSFTConfig
from nanopipe.configs.flags import parse_config, stage_docstring
from nanopipe.configs.mid_train import MidTrainConfig

REPO = Path(__file__).resolve().parents[1]
STAGES = {"chat_eval": (ChatEvalConfig, SHORT_FLAGS), "mid_train": (MidTrainConfig, None),
          "chat_sft": (ChatSFTConfig, None), "chat_rl": (ChatRLConfig, None)}
COMMAND = re.compile(r"-m (?:nanopipe\.stages|scripts)\.(" + "|".join(STAGES) + r")\b(.*)$")

# the chat stages' lines of nanochat's speedrun.sh and run1000.sh (061f83c)
NANOCHAT_LINES = [
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.mid_train -- --run=$WANDB_RUN",
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.chat_eval -- -i mid",
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.chat_sft -- --run=$WANDB_RUN",
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.chat_eval -- -i sft",
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.chat_rl -- --run=$WANDB_RUN",
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.chat_eval -- -i rl -a GSM8K",
    "torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m scripts.mid_train -- --device_batch_size=8 "
    "--run=$WANDB_RUN",
    # the usage lines of nanochat's chat_eval and mid_train
    "python -m scripts.chat_eval -a ARC-Easy",
    "torchrun --nproc_per_node=8 -m scripts.chat_eval -- -a ARC-Easy",
    "torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size=16",
]


def command_lines(text: str) -> list[str]:
    """The command lines of a text: continuation lines joined, inline code spans taken out of prose."""
    lines = text.replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        spans = re.findall(r"`([^`]+)`", line)
        found += [span for span in (spans or [line]) if COMMAND.search(span)]
    return found


def stage_args(line: str) -> tuple[str, list[str]]:
    """(stage, its arguments) of a command line: placeholders (<dir>, $VAR) made concrete, comments dropped."""
    stage, rest = COMMAND.search(line).groups()
    rest = re.sub(r"<[^>]*>", "placeholder", rest)
    rest = re.sub(r"\$\{?\w+\}?", "placeholder", rest)
    args = shlex.split(rest, comments=True)
    return stage, args[1:] if args[:1] == ["--"] else args


def documented_lines() -> list[str]:
    texts = [(REPO / "README.md").read_text(encoding="utf-8")]
    texts += [stage_docstring(cls) or "" for cls, _ in STAGES.values()]
    return [line for text in texts for line in command_lines(text)]


def parse(line: str):
    stage, args = stage_args(line)
    cls, aliases = STAGES[stage]
    return stage, parse_config(cls, args, prog=stage, short_aliases=aliases)


def test_the_documents_hold_command_lines_of_every_chat_stage():
    stages = {stage_args(line)[0] for line in documented_lines()}
    assert stages == set(STAGES)


@pytest.mark.parametrize("line", documented_lines() + NANOCHAT_LINES)
def test_a_documented_command_line_parses(line):
    parse(line)   # a bad flag exits with status 2


def test_nanochats_command_lines_mean_what_they_mean_there():
    configs = [parse(line) for line in NANOCHAT_LINES]
    evals = [cfg for stage, cfg in configs if stage == "chat_eval"]
    assert [(cfg.source, cfg.task) for cfg in evals[:3]] == [
        ("mid", list(CHATCORE_TASKS)), ("sft", list(CHATCORE_TASKS)), ("rl", ["GSM8K"])]
    assert evals[3].task == ["ARC-Easy"] and evals[3].max_problems is None
    mids = [cfg for stage, cfg in configs if stage == "mid_train"]
    assert [cfg.device_batch_size for cfg in mids] == [32, 8, 16] and not any(cfg.dry_run for cfg in mids)


def test_extraction_reads_code_spans_continuations_and_placeholders():
    text = ("Run `python -m nanopipe.stages.chat_eval -i sft -a \"ARC-Easy|GSM8K\"` or\n"
            "    python -m nanopipe.stages.chat_rl --gsm8k_path=<dir with .jsonl> \\\n        --source=mid  # a note\n")
    lines = command_lines(text)
    assert [stage_args(line) for line in lines] == [
        ("chat_eval", ["-i", "sft", "-a", "ARC-Easy|GSM8K"]),
        ("chat_rl", ["--gsm8k_path=placeholder", "--source=mid"])]


def test_the_stages_without_nanochats_dry_run_point_to_plan_only(capsys):
    """base_train and chat_rl have no --dry_run in nanochat: the flag is refused, naming the planning mode."""
    from nanopipe.configs.base_train import BaseTrainConfig

    for cls in (BaseTrainConfig, ChatRLConfig):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(cls, ["--dry_run"], prog=cls.__name__)
        assert exit_info.value.code == 2 and "use --plan_only" in capsys.readouterr().err
        assert parse_config(cls, ["--plan_only"], prog=cls.__name__).plan_only is True
