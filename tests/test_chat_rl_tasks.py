"""chat_rl's builtin training questions: drawn with their own seed (never the problems mid-training and SFT
drew), optionally mixed with SpellingBee questions, while evaluation stays on the held-out arithmetic."""

from __future__ import annotations

import pytest

from nanopipe.configs.base import ConfigError, build_config
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.stages.chat_rl import RL_DATA_SEED_OFFSET, builtin_train_task, count_train_questions, load_tasks
from nanopipe.tasks import ArithmeticProblems, SpellingBee
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


def test_spelling_share_mixes_spelling_bee_into_training_only():
    cfg = build_config(ChatRLConfig, {"task": "builtin-arithmetic", "synthetic_size": 40, "spelling_share": 0.25})
    train, test = load_tasks(cfg)
    assert len(train) == count_train_questions(cfg) == 40
    spelling = set(_questions(SpellingBee(10, "train", cfg.seed + RL_DATA_SEED_OFFSET)))
    arithmetic = set(_questions(ArithmeticProblems(30, "train", cfg.seed + RL_DATA_SEED_OFFSET)))
    questions = _questions(train)
    assert sorted(questions) == sorted(spelling | arithmetic) and len(spelling | arithmetic) == 40
    assert set(questions[:20]) & spelling and set(questions[:20]) & arithmetic   # mixed, not one after the other
    assert train[questions.index(next(iter(spelling)))]["messages"] and isinstance(test[0]["messages"][0]["content"], str)
    assert all(q not in spelling for q in _questions(test))
    # a completion with the right count earns the reward on a spelling question
    index = next(i for i, q in enumerate(questions) if q in spelling)
    answer = train[index]["messages"][-1]["content"][-1]["text"].rsplit("#### ", 1)[1]
    assert train.reward(train[index], f"#### {answer}") == 1.0 and train.reward(train[index], "#### 99") == 0.0


@pytest.mark.parametrize("bad", [{"spelling_share": 0.2}, {"task": "builtin-arithmetic", "spelling_share": 1.0}])
def test_spelling_share_needs_the_builtin_task_and_a_share_below_one(bad):
    with pytest.raises(ConfigError):
        build_config(ChatRLConfig, bad)
