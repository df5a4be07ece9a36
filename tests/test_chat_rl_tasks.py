"""chat_rl's builtin training questions: drawn with their own seed (never the problems mid-training and SFT
drew), while evaluation stays on the held-out arithmetic problems chat_eval scores."""

from __future__ import annotations

from nanopipe.configs.base import build_config
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.stages.chat_rl import RL_DATA_SEED_OFFSET, count_train_questions, load_tasks
from nanopipe.tasks import ArithmeticProblems
from nanopipe.tasks.mixtures import SFT_DATA_SEED_OFFSET


def _questions(task) -> list[str]:
    return [task[i]["messages"][0]["content"] for i in range(len(task))]


def test_rl_questions_are_not_the_ones_mid_training_and_sft_drew():
    cfg = build_config(ChatRLConfig, {"task": "builtin-arithmetic", "synthetic_size": 64, "seed": 7})
    train, test = load_tasks(cfg)
    assert RL_DATA_SEED_OFFSET not in (0, SFT_DATA_SEED_OFFSET)
    rl = set(_questions(train))
    for seed in (7, 7 + SFT_DATA_SEED_OFFSET):   # mid-training's and SFT's draws of the same run seed
        assert not rl & set(_questions(ArithmeticProblems(64, "train", seed)))
    assert _questions(train) == _questions(ArithmeticProblems(64, "train", 7 + RL_DATA_SEED_OFFSET))
    assert _questions(test) == _questions(ArithmeticProblems(cfg.eval_examples, "test"))
    assert len(train) == count_train_questions(cfg) == 64
