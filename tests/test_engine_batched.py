"""Generation of several different prompts in one batch: a left-padded prefill with the padding masked out
gives each prompt's own logits; a prompt's completions (greedy, and sampled with its own seed) are the same
alone or in any batch, also when finished prompts leave the batch; the calculator is forced per row; and the
batched callers (chat evaluation, RL rollouts) give what one problem at a time gives."""

import random

import pytest
import torch

from nanopipe.chat_format import render_for_completion
from nanopipe.chat_scoring import evaluate_generative
from nanopipe.engine import Engine
from nanopipe.gpt import GPT, build_model_config
from nanopipe.kv_cache import KVCache
from nanopipe.rl import draw_seed, sample_group, sample_groups
from nanopipe.tasks.builtin import ArithmeticProblems
from nanopipe.tokenizer import Tokenizer
from tests.test_engine import TEXT, ScriptedModel

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["hello", "The quick brown fox jumps over", "7 plus 5 is", "I count the letters in strawberry: s t r",
         "how are you today?"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(TEXT, vocab_size=320)


def scaled_model(vocab_size: int, n_kv_head: int | None = None, seed: int = 0) -> GPT:
    """depth 2, width 64, weights N(0, 0.5): logits far from uniform, greedy choices far from ties."""
    torch.manual_seed(seed)
    config = build_model_config(depth=2, aspect_ratio=32, head_dim=16, max_seq_len=128, vocab_size=vocab_size,
                                n_kv_head=n_kv_head)
    gpt = GPT.create(config, "cpu").eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0.0, 0.5)
    return gpt


@pytest.fixture(scope="module")
def model(tokenizer):
    return scaled_model(tokenizer.get_vocab_size())


def prompts_of(tokenizer, texts=WORDS) -> list[list[int]]:
    return [tokenizer.encode(text, prepend="<|bos|>") for text in texts]


# -----------------------------------------------------------------------------
# The KV cache with left padding

@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_left_padded_batch_gives_each_prompt_its_own_logits(n_kv_head):
    model = scaled_model(300, n_kv_head=n_kv_head, seed=1)
    c = model.config
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (9, 2, 14, 1, 6)]
    fed = torch.randint(0, 300, (len(prompts), 20), generator=gen)  # 20 decode steps, one token each
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])

    def padded_run(mask: bool) -> torch.Tensor:
        cache = KVCache(len(prompts), c.n_kv_head, 8, c.head_dim, c.n_layer)  # short: grows while decoding
        if mask:
            cache.set_key_mask(valid)
        with torch.no_grad():
            logits = [model(ids, kv_cache=cache)[:, -1:]]
            logits += [model(fed[:, t:t + 1], kv_cache=cache) for t in range(fed.size(1))]
        return torch.cat(logits, dim=1)  # (B, 21, V): the prefill's last position, then each step

    batched = padded_run(mask=True)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.tensor([prompt + fed[i].tolist()]))[0, len(prompt) - 1:]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=1e-4)
    # the mask is what makes it exact: unmasked padding changes the padded rows' logits
    unmasked = padded_run(mask=False)
    assert not torch.allclose(unmasked[1], batched[1], atol=1e-2)
    torch.testing.assert_close(unmasked[2], batched[2], rtol=0, atol=1e-4)  # the longest prompt has no padding


def test_prefill_copies_each_prompt_to_its_samples_and_rows_can_be_dropped():
    model = scaled_model(300, n_kv_head=2, seed=2)
    c = model.config
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    samples = 2
    width = max(len(p) for p in prompts)
    fed = torch.randint(0, 300, (len(prompts) * samples, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        single = KVCache(len(prompts), c.n_kv_head, width, c.head_dim, c.n_layer)
        single.set_key_mask(torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts]))
        model(torch.tensor([[0] * (width - len(p)) + p for p in prompts]), kv_cache=single)
        cache = KVCache(len(prompts) * samples, c.n_kv_head, width + 6, c.head_dim, c.n_layer)
        cache.prefill(single)
        assert cache.get_pos() == width
        rows = list(range(len(prompts) * samples))
        decoded = {r: [] for r in rows}
        for t in range(6):
            if t == 3:  # prompt 1 (rows 2, 3) leaves the batch, the others' keys move up
                rows = [0, 1, 4, 5]
                cache.keep_rows([0, 1, 4, 5])
            logits = model(fed[rows, t:t + 1], kv_cache=cache)
            for i, r in enumerate(rows):
                decoded[r].append(logits[i, -1])
    for r, steps in decoded.items():
        prompt = prompts[r // samples]
        with torch.no_grad():
            alone = model(torch.tensor([prompt + fed[r, :len(steps)].tolist()]))[0, len(prompt):]
        torch.testing.assert_close(torch.stack(steps), alone, rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# The engine: the same completions alone or in a batch

def alone(engine, prompts, num_samples, max_tokens, seeds, **kwargs):
    """Each prompt by itself (generate_batch), rows concatenated in generate_multi's order."""
    results, masks = [], []
    for p, (prompt, seed) in enumerate(zip(prompts, seeds)):
        budget = max_tokens[p * num_samples:(p + 1) * num_samples] if isinstance(max_tokens, list) else max_tokens
        r, m = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget, seed=seed, **kwargs)
        results += r
        masks += m
    return results, masks


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (1.0, 20)])
def test_a_prompt_gives_the_same_completions_alone_or_in_a_batch(model, tokenizer, temperature, top_k):
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    seeds = [100 + i for i in range(len(prompts))]
    samples = 3
    # unequal budgets: prompts finish at different steps and leave the batch early
    budgets = [4 + (7 * r) % 23 for r in range(len(prompts) * samples)]
    kwargs = dict(temperature=temperature, top_k=top_k)
    batched = engine.generate_multi(prompts, num_samples=samples, max_tokens=budgets, seeds=seeds, **kwargs)
    assert batched == alone(engine, prompts, samples, budgets, seeds, **kwargs)
    results, masks = batched
    lengths = [len(r) - len(prompts[i // samples]) for i, r in enumerate(results)]
    assert all(n <= b for n, b in zip(lengths, budgets))
    assert all(m == [0] * len(prompts[i // samples]) + [1] * n for i, (m, n) in enumerate(zip(masks, lengths)))
    if temperature == 0:
        assert lengths == budgets, "greedy decoding of this model meets no stop token"
    if temperature > 0:
        assert len({tuple(r) for r in results[:samples]}) > 1, "a prompt's samples should differ"
    # grouping does not matter: a batch of other prompts, in another order, with the same seeds
    order = [3, 0, 4]
    regrouped = engine.generate_multi([prompts[i] for i in order], num_samples=samples, max_tokens=20,
                                      seeds=[seeds[i] for i in order], **kwargs)[0]
    for j, i in enumerate(order):
        reference = engine.generate_batch(prompts[i], num_samples=samples, max_tokens=20, seed=seeds[i], **kwargs)[0]
        assert regrouped[j * samples:(j + 1) * samples] == reference


def test_a_different_seed_gives_different_samples(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)[:2]
    first = engine.generate_multi(prompts, num_samples=2, max_tokens=16, temperature=1.5, seeds=[1, 2])[0]
    other = engine.generate_multi(prompts, num_samples=2, max_tokens=16, temperature=1.5, seeds=[1, 3])[0]
    assert first[:2] == other[:2] and first[2:] != other[2:]


def test_calculator_output_is_forced_per_row_in_a_batch(model, tokenizer):
    engine = Engine(ScriptedModel(model, None), tokenizer)
    prompts = prompts_of(tokenizer, ["hello", "what is 2+3?", "how are you today?"])
    call = [engine.python_start, *tokenizer.encode("2+3"), engine.python_end]
    tail = [*tokenizer.encode(" is the answer"), engine.assistant_end]
    chatter = [*tokenizer.encode("fine, thanks, fine"), engine.assistant_end]
    wrong = tokenizer.encode("9")[0]

    def policy(row, history):
        prompt = next(p for p in prompts if history[:len(p)] == p)
        written = history[len(prompt):]
        if prompt is not prompts[1]:
            return chatter[min(len(written), len(chatter) - 1)]
        if engine.python_end not in written:
            return call[len(written)]
        if engine.output_end not in written:
            return wrong  # the model would write a wrong result: the engine feeds the calculator's instead
        return tail[min(len(written) - written.index(engine.output_end) - 1, len(tail) - 1)]

    engine.model.policy = policy
    results, masks = engine.generate_multi(prompts, num_samples=2, max_tokens=64, temperature=1.0,
                                           seeds=[0, 1, 2])
    forced = [engine.output_start, *tokenizer.encode("5"), engine.output_end]
    for r, (result, mask) in enumerate(zip(results, masks)):
        prompt = prompts[r // 2]
        if r // 2 == 1:
            assert result == prompt + call + forced + tail[:-1]
            assert mask == [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1] * (len(tail) - 1)
        else:
            assert result == prompt + chatter[:-1]
            assert mask == [0] * len(prompt) + [1] * (len(chatter) - 1)


def test_generate_is_generate_multi_of_one_prompt(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = prompts_of(tokenizer)[1]
    streamed = list(engine.generate(prompt, num_samples=2, max_tokens=12, temperature=1.0, seed=5))
    assert streamed == list(engine.stream_multi([prompt], num_samples=2, max_tokens=12, temperature=1.0, seeds=[5]))
    assert engine.generate_multi([prompt], 2, max_tokens=0) == ([prompt, prompt], [[0] * len(prompt)] * 2)


# -----------------------------------------------------------------------------
# Callers: chat evaluation and RL rollouts

class Recorded:
    """A task that records every completion it is asked to evaluate, by problem."""

    def __init__(self, task):
        self.task, self.completions = task, {}

    def __getitem__(self, index):
        conversation = dict(self.task[index])
        conversation["index"] = index
        return conversation

    def evaluate(self, conversation, completion):
        self.completions.setdefault(conversation["index"], []).append(completion)
        return int(len(completion) % 3 == 0)  # an arbitrary verdict that depends on the completion


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generative_evaluation_is_the_same_for_any_batch_size_and_ranks(model, tokenizer, temperature):
    engine = Engine(model, tokenizer)
    kwargs = dict(num_problems=11, num_samples=2, max_new_tokens=12, temperature=temperature, top_k=None, seed=3)
    runs = {}
    for batch_size in (1, 8):
        task = Recorded(ArithmeticProblems(16, "test"))
        counts = evaluate_generative(task, engine, tokenizer, batch_size=batch_size, **kwargs)
        runs[batch_size] = counts, task.completions
    assert runs[1] == runs[8]
    assert runs[1][0][1] == 11 and 0 < runs[1][0][0] < 11
    halves, task = [], Recorded(ArithmeticProblems(16, "test"))
    for rank in (0, 1):
        halves.append(evaluate_generative(task, engine, tokenizer, rank=rank, world_size=2, batch_size=4, **kwargs))
    assert (sum(h[0] for h in halves), sum(h[1] for h in halves)) == runs[1][0]
    assert task.completions == runs[1][1]


def reference_groups(engine, tokenizer, task, conversations, num_samples, device_batch_size, max_new_tokens,
                     rng) -> list[tuple]:
    """What rollouts sampled before questions were batched: per question, batches of at most device_batch_size
    samples through generate_batch, each with the next seed from the rng."""
    groups = []
    for conversation in conversations:
        prompt = render_for_completion(tokenizer, conversation)
        sequences, masks, remaining = [], [], num_samples
        while remaining > 0:
            n = min(device_batch_size, remaining)
            s, m = engine.generate_batch(prompt, num_samples=n, max_tokens=max_new_tokens, temperature=1.0,
                                         top_k=20, seed=draw_seed(rng))
            sequences, masks, remaining = sequences + s, masks + m, remaining - n
        rewards = [float(task.reward(conversation, tokenizer.decode(s[len(prompt):]))) for s in sequences]
        groups.append((len(prompt), sequences, masks, rewards))
    return groups


@pytest.mark.parametrize("num_samples, device_batch_size", [(3, 8), (5, 4), (4, 4)])
def test_sample_groups_gives_the_groups_of_one_question_at_a_time(model, tokenizer, num_samples,
                                                                  device_batch_size):
    engine = Engine(model, tokenizer)
    task = ArithmeticProblems(8, "train")
    conversations = [task[i] for i in range(5)]
    args = (num_samples, device_batch_size, 10)
    rng, reference_rng, one_rng = random.Random(7), random.Random(7), random.Random(7)
    groups = sample_groups(engine, tokenizer, task, conversations, *args, temperature=1.0, top_k=20, rng=rng)
    expected = reference_groups(engine, tokenizer, task, conversations, *args, reference_rng)
    assert [(g.prompt_len, g.sequences, g.masks, g.rewards) for g in groups] == expected
    assert rng.getstate() == reference_rng.getstate(), "the rng must be left where the old loop left it"
    one = [sample_group(engine, tokenizer, task, c, *args, temperature=1.0, top_k=20, rng=one_rng)
           for c in conversations]
    assert [g.sequences for g in one] == [g.sequences for g in groups]
    assert all(len(g.sequences) == num_samples for g in groups)
