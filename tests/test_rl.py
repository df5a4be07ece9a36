"""The pieces chat_rl is made of (nanopipe/rl.py), on the RL test's tiny policy: GSM8K rewards on real rows,
the advantages (group mean and zero baselines), the loss mask (prompt, forced tool output and padding excluded)
and its normalisation, pass@k and which questions a rank takes at a step."""

from __future__ import annotations

import random
import re

import pytest
import torch

from nanopipe.chat_format import render_for_completion
from nanopipe.engine import Engine
from nanopipe.gpt import GPT
from nanopipe.rl import (Group, accumulate_policy_gradient, group_advantages, pass_at_k_counts, policy_batch,
                         step_questions)
from nanopipe.tasks import GSM8K
from tests.test_chat_rl import tiny  # noqa: F401 (the tiny SFT-like policy, a module fixture)
from tests.test_engine import ScriptedModel

pytestmark = pytest.mark.usefixtures("one_thread")



def test_reward_on_real_gsm8k_rows(shared_dir):
    task = GSM8K("main", "test", shared_dir / "data" / "gsm8k" / "test.jsonl", shuffle_seed=None)
    for index in range(5):
        conversation = task[index]
        answer = re.search(r"#### (.+)$", task.rows[index]["answer"]).group(1).strip()
        assert task.reward(conversation, f"Let me think.\n#### {answer}") == 1.0
        assert task.reward(conversation, f"#### {answer}.00") == 0.0   # nanochat's exact match: another string
        assert task.reward(conversation, f"#### {int(answer.replace(',', '')) + 1}") == 0.0
        assert task.reward(conversation, f"the answer is {answer}") == 0.0   # no '####': no reward
    assert task.reward(task[0], "#### 1,000,000") in (0.0, 1.0)


def test_advantage_is_reward_minus_the_group_mean():
    torch.testing.assert_close(group_advantages([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert not group_advantages([1.0, 1.0, 1.0]).any() and not group_advantages([0.0, 0.0]).any()


def test_with_a_zero_baseline_the_advantage_is_the_reward():
    torch.testing.assert_close(group_advantages([1.0, 0.0, 0.0, 1.0], "zero"), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(group_advantages([1.0, 1.0, 1.0], "zero"), torch.tensor([1.0, 1.0, 1.0]))
    assert not group_advantages([0.0, 0.0], "zero").any()
    with pytest.raises(AssertionError, match="baseline"):
        group_advantages([1.0], "median")


def test_loss_mask_leaves_out_prompt_forced_tool_output_and_padding(tiny):
    """A scripted model calls the calculator: the engine forces the result (mask 0), and those tokens, the
    prompt and the padding get target -1; exactly the tokens the model wrote are scored."""
    tokenizer = tiny["tokenizer"]
    engine = Engine(ScriptedModel(tiny["model"], None), tokenizer)
    prompt = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": "What is 6 times 7?"}]})
    call = [engine.python_start, *tokenizer.encode("6*7"), engine.python_end]
    tails = {0: tokenizer.encode("#### 42"), 1: tokenizer.encode("#### 4")}

    def policy(row, history):
        written = history[len(prompt):]
        if engine.python_end not in written:
            return call[len(written)]
        if engine.output_end not in written:
            return call[0]  # anything: the engine feeds the calculator's output instead
        after = written[written.index(engine.output_end) + 1:]
        tail = tails[row] + [engine.assistant_end]
        return tail[min(len(after), len(tail) - 1)]  # a finished row is still asked; its answer is unused

    engine.model.policy = policy
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=32, temperature=1.0)
    forced = [engine.output_start, *tokenizer.encode("42"), engine.output_end]
    assert sequences[0] == prompt + call + forced + tails[0]
    assert masks[0] == [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1] * len(tails[0])
    pad = engine.assistant_end
    inputs, targets = policy_batch(sequences, masks, pad_id=pad)
    assert inputs.shape == targets.shape == (2, len(sequences[0]) - 1)
    for row, (sequence, mask) in enumerate(zip(sequences, masks)):
        scored = [t for t, m in zip(sequence[1:], mask[1:]) if m]
        assert targets[row][targets[row] >= 0].tolist() == scored
        assert len(scored) == len(call) + len(tails[row])  # the model's tokens and nothing else
        assert all(t == -1 for t in targets[row, len(sequence) - 1:].tolist())  # padding of the shorter row
        assert inputs[row, :len(sequence) - 1].tolist() == sequence[:-1]


def _manual_loss(model, groups: list[Group], per_pass: int, baseline: str = "mean") -> torch.Tensor:
    """nanochat's normalisation, from full log-softmaxes one sequence at a time: each pass of `per_pass`
    sequences of a group adds -sum(A * log p) over its sampled tokens / (those tokens x passes x groups)."""
    loss = torch.zeros(())
    for group in groups:
        mean = sum(group.rewards) / len(group.rewards) if baseline == "mean" else 0.0
        advantages = torch.tensor(group.rewards) - mean
        passes = [range(b0, min(b0 + per_pass, len(group.sequences))) for b0 in range(0, len(group.sequences),
                                                                                       per_pass)]
        for rows in passes:
            tokens = sum(sum(group.masks[i][1:]) for i in rows)
            for i in rows:
                sequence, mask = group.sequences[i], group.masks[i]
                logp = torch.log_softmax(model(torch.tensor([sequence[:-1]]))[0].float(), dim=-1)
                for t in range(1, len(sequence)):
                    if mask[t]:
                        loss = loss - advantages[i] * logp[t - 1, sequence[t]] / (tokens * len(passes) * len(groups))
    return loss


@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_policy_gradient_is_normalised_per_pass_as_nanochats(tiny, baseline):
    """The accumulated gradient equals that of a hand-written loss over the masked tokens, normalised per
    forward pass as nanochat does (the pass's sampled tokens, the group's passes, the rank's groups), with either
    baseline (a group that got everything right teaches only with the zero baseline)."""
    tokenizer = tiny["tokenizer"]
    model = GPT.create(tiny["model"].config, "cpu")
    model.load_state_dict(tiny["model"].state_dict())
    prompt = tokenizer.encode("Ann has 3 apples.", prepend="<|bos|>")
    rng = random.Random(1)

    def group(rewards):
        g = Group(prompt_len=len(prompt))
        for reward in rewards:
            completion = [rng.randrange(300) for _ in range(rng.randint(2, 7))]
            forced = [0] * rng.randint(0, 2)  # some "tool output" inside the completion
            cut = rng.randint(0, len(completion))
            mask = [1] * cut + [0] * len(forced) + [1] * (len(completion) - cut)
            completion = completion[:cut] + [rng.randrange(300) for _ in forced] + completion[cut:]
            g.sequences.append(prompt + completion)
            g.masks.append([0] * len(prompt) + mask)
            g.rewards.append(reward)
        return g

    groups = [group([1.0, 0.0, 0.0]), group([0.0, 0.0, 0.0]), group([1.0, 1.0, 0.0]), group([1.0, 1.0, 1.0])]
    total = sum(g.sampled_tokens() for g in groups)
    assert total == sum(sum(m[1:]) for g in groups for m in g.masks) > 0
    for per_pass in (1, 2, 3):   # one, two (3 = 2 + 1 sequences) and one pass per group
        expected = _manual_loss(model, groups, per_pass, baseline)
        expected.backward()
        want = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        loss = accumulate_policy_gradient(model, groups, pad_id=0, device_batch_size=per_pass, baseline=baseline)
        assert loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=f"{name} ({per_pass} per pass)")
        model.zero_grad(set_to_none=True)

    model.zero_grad(set_to_none=True)  # groups whose advantages are all 0 teach nothing, but every parameter steps
    accumulate_policy_gradient(model, [groups[1 if baseline == "zero" else 3]], pad_id=0, device_batch_size=2,
                               baseline=baseline)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_pass_at_k_and_question_assignment():
    outcomes = [[False, True, False], [False, False, False], [True, True, True], [False, False, True]]
    assert pass_at_k_counts(outcomes, 3) == [1, 2, 3]
    assert pass_at_k_counts(outcomes, 1) == [1]
    # the ranks split each step's questions between them; steps walk the task in order and wrap around
    one = step_questions(3, 4, 10, rank=0, world_size=1)
    assert one == [2, 3, 4, 5]
    two = [step_questions(3, 4, 10, rank=r, world_size=2) for r in range(2)]
    assert sorted(two[0] + two[1]) == one and two[0] == [2, 4]


def test_pass_at_k_is_the_same_one_problem_or_several_per_batch(tiny):
    from nanopipe.engine import Engine
    from nanopipe.rl import evaluate_pass_at_k
    from nanopipe.tasks import GSM8K

    task = GSM8K(split="test", data_path=tiny["data"])
    engine = Engine(tiny["model"], tiny["tokenizer"])
    args = (engine, tiny["tokenizer"], task, 6, 4, 24, 1.0, None, 3)
    one_at_a_time = evaluate_pass_at_k(*args)
    assert evaluate_pass_at_k(*args, rows_per_batch=12) == one_at_a_time   # three problems per forward pass
    assert one_at_a_time[1] == 6
    # the ranks split the problems: their counts add up to one process's
    halves = [evaluate_pass_at_k(*args, rank=r, world_size=2, rows_per_batch=8) for r in range(2)]
    assert [a + b for a, b in zip(halves[0][0], halves[1][0])] == one_at_a_time[0]
