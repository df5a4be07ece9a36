"""The inference engine: KV-cache decoding equals cache-free decoding, sampling, stop rules, per-sample
budgets, calculator tool use with forced (mask 0) output, and the calculator's whitelist."""

import warnings

import pytest
import torch

from nanopipe.engine import (CalculatorError, Engine, evaluate_expression, format_number, sample_next_token,
                             use_calculator)
from nanopipe.gpt import GPT, build_model_config
from nanopipe.tokenizer import Tokenizer

TEXT = [
    "The quick brown fox jumps over the lazy dog. Twelve times three is 36, and 7 plus 5 is 12. " * 8,
    "hello world, how are you today? I count the letters in strawberry: s t r a w b e r r y. " * 8,
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_from_iterator(TEXT, vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    """depth 2, width 64, with weights scaled up so that greedy choices are far from ties."""
    torch.manual_seed(0)
    config = build_model_config(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=128,
                                vocab_size=tokenizer.get_vocab_size())
    gpt = GPT.create(config, "cpu").eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0.0, 0.5)
    return gpt


def naive_greedy(model, prompt, max_tokens, stop_ids):
    """Reference decoding: re-run the whole sequence every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt):]


def test_greedy_with_cache_equals_without_cache(model, tokenizer):
    engine = Engine(model, tokenizer)
    stop_ids = {engine.assistant_end, engine.bos}
    for text in ("hello world", "The quick brown fox", "7 plus 5 is"):
        prompt = tokenizer.encode(text, prepend="<|bos|>")
        reference = naive_greedy(model, prompt, 40, stop_ids)
        assert len(reference) >= 10, "the fixture model stops too early to compare anything"
        streamed = [column[0] for column, _ in engine.generate(prompt, max_tokens=40, temperature=0.0)]
        assert streamed == reference
        results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
        expected = prompt + [t for t in reference if t not in stop_ids]
        assert results == [expected] * 3
        assert masks == [[0] * len(prompt) + [1] * (len(expected) - len(prompt))] * 3
        # the model's own cache-free sampler agrees too
        assert list(model.generate(prompt, max_tokens=len(reference), temperature=0.0)) == reference


def test_cached_logits_match_full_forward(model, tokenizer):
    """Prefill + token-by-token decode gives the same logits as one full forward (not only the argmax)."""
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode("hello world, how are you today?", prepend="<|bos|>")
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        cache = engine._new_cache(1, 4, torch.device("cpu"))  # too short on purpose: the cache grows
        step_logits = [model(torch.tensor([ids[:5]]), kv_cache=cache)[0]]
        for token in ids[5:]:
            step_logits.append(model(torch.tensor([[token]]), kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(step_logits), full, rtol=1e-4, atol=1e-4)


def test_sampling_diverges_across_samples_and_is_reproducible(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    kwargs = dict(num_samples=6, max_tokens=16, temperature=1.5)
    first, masks = engine.generate_batch(prompt, seed=1, **kwargs)
    again, _ = engine.generate_batch(prompt, seed=1, **kwargs)
    other, _ = engine.generate_batch(prompt, seed=2, **kwargs)
    assert first == again, "the same seed must reproduce the same samples"
    assert len({tuple(r) for r in first}) > 1, "samples of one prompt should differ under temperature 1.5"
    assert first != other, "a different seed should give different samples"
    assert all(r[:len(prompt)] == prompt for r in first)
    assert all(len(m) == len(r) for m, r in zip(masks, first))


def test_top_k_one_is_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, rng, temperature=1.0, top_k=1), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next_token(logits, None, temperature=0.0), logits.argmax(-1, keepdim=True))
    top3 = torch.topk(logits, 3).indices
    for _ in range(20):
        picked = sample_next_token(logits, rng, temperature=2.0, top_k=3)
        assert bool((picked == top3).any(dim=1).all()), "top-k sampling picked a token outside the top k"


# -----------------------------------------------------------------------------
# A scripted model: the real GPT runs (so the KV cache advances as in real decoding), but the next token
# is chosen by a policy over what each row has seen so far.

class ScriptedModel(torch.nn.Module):
    """policy(row, history) -> the token row `row` writes next, history being that row's tokens so far (its
    prompt without padding, then what it was fed). Follows the engine's cache: left-padded prompts, the copy of
    each prompt's cache to its samples, and rows dropped from the batch."""

    def __init__(self, gpt, policy):
        super().__init__()
        self.gpt, self.policy = gpt, policy
        self.config, self.lm_head = gpt.config, gpt.lm_head
        self.histories: list[list[int]] = []
        self.row_ids: list[int] = []  # the engine's row number of each cache row
        self.cache = None

    def get_device(self):
        return self.gpt.get_device()

    def _follow_dropped_rows(self, kv_cache):
        keep_rows = kv_cache.keep_rows

        def keep(rows):
            self.histories = [self.histories[r] for r in rows]
            self.row_ids = [self.row_ids[r] for r in rows]
            keep_rows(rows)

        kv_cache.keep_rows = keep

    def forward(self, idx, kv_cache=None):
        start = kv_cache.get_pos() if kv_cache is not None else 0
        logits = self.gpt(idx, kv_cache=kv_cache)
        if start == 0:
            valid = kv_cache.key_valid if kv_cache is not None else None
            self.histories = [row[valid[i, :idx.size(1)]].tolist() if valid is not None else row.tolist()
                              for i, row in enumerate(idx)]
            self.row_ids = list(range(idx.size(0)))
            self.cache = kv_cache
        else:
            if kv_cache is not self.cache:  # the decode cache, filled with num_samples copies of each prompt
                self.cache = kv_cache
                repeats = idx.size(0) // len(self.histories)
                self.histories = [list(h) for h in self.histories for _ in range(repeats)]
                self.row_ids = list(range(idx.size(0)))
                self._follow_dropped_rows(kv_cache)
            for history, row in zip(self.histories, idx.tolist()):
                history.extend(row)
        scripted = torch.full_like(logits, -1e4)
        for i, history in enumerate(self.histories):
            scripted[i, -1, self.policy(self.row_ids[i], history)] = 0.0
        return scripted


def test_tool_call_output_is_forced_with_mask_zero(model, tokenizer):
    engine = Engine(ScriptedModel(model, None), tokenizer)
    prompt = tokenizer.encode("what is twelve times three?", prepend="<|bos|>")
    call = [engine.python_start, *tokenizer.encode("12*3"), engine.python_end]
    wrong = tokenizer.encode("9")[0]
    tail = [*tokenizer.encode(" is the answer"), engine.assistant_end]

    def policy(row, history):
        generated = history[len(prompt):]
        if engine.python_end not in generated:
            return call[len(generated)]
        if engine.output_end not in generated:
            return wrong  # the model would write a wrong result: the engine must override it
        return tail[len(generated) - generated.index(engine.output_end) - 1]

    engine.model.policy = policy
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=64, temperature=1.0)
    forced = [engine.output_start, *tokenizer.encode("36"), engine.output_end]
    expected = prompt + call + forced + tail[:-1]
    assert results == [expected, expected]
    expected_mask = [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1] * (len(tail) - 1)
    assert masks == [expected_mask, expected_mask]
    assert tokenizer.decode(results[0][len(prompt):]).count("<|output_start|>36<|output_end|>") == 1


def test_unsupported_python_is_not_answered(model, tokenizer):
    """A python block the calculator refuses gets no forced output: the model keeps writing freely."""
    engine = Engine(ScriptedModel(model, None), tokenizer)
    prompt = tokenizer.encode("hi", prepend="<|bos|>")
    script = [engine.python_start, *tokenizer.encode("__import__('os')"), engine.python_end,
              *tokenizer.encode("ok"), engine.assistant_end]
    engine.model.policy = lambda row, history: script[len(history) - len(prompt)]
    results, masks = engine.generate_batch(prompt, max_tokens=64, temperature=0.0)
    assert results[0] == prompt + script[:-1]
    assert masks[0] == [0] * len(prompt) + [1] * (len(script) - 1)


def test_stop_tokens_and_per_sample_budgets(model, tokenizer):
    engine = Engine(ScriptedModel(model, None), tokenizer)
    prompt = tokenizer.encode("count", prepend="<|bos|>")
    letter = tokenizer.encode("a")[0]
    # row 0 never stops by itself; row 1 says <|bos|> after 2 tokens; row 2 ends its turn after 4
    stops = {1: (2, engine.bos), 2: (4, engine.assistant_end)}

    def policy(row, history):
        n = len(history) - len(prompt)
        if row in stops and n == stops[row][0]:
            return stops[row][1]
        return letter

    engine.model.policy = policy
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=[7, 9, 9], temperature=0.0))
    assert len(columns) == 7, "decoding stops once every row has finished"
    assert [column[1] for column, _ in columns[:3]] == [letter, letter, engine.bos]
    assert [column[1] for column, _ in columns[3:]] == [engine.assistant_end] * 4, "a finished row pads"
    assert [mask[1] for _, mask in columns[3:]] == [0] * 4, "padding after a row finished is not sampled"
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=[7, 9, 9], temperature=0.0)
    assert [len(r) - len(prompt) for r in results] == [7, 2, 4]
    assert all(set(r[len(prompt):]) == {letter} for r in results)
    assert [len(m) for m in masks] == [len(r) for r in results]
    assert engine.generate_batch(prompt, num_samples=2, max_tokens=0)[0] == [prompt, prompt]


# -----------------------------------------------------------------------------
# Calculator

# nanochat's calculator (061f83c): Python's str() of the value, commas dropped, no ** or %, count calls alone
@pytest.mark.parametrize("expr, value", [
    ("12*3", "36"), ("48/2", "24.0"), ("10/4", "2.5"), ("7//2", "3"), ("7.0//2", "3.0"), ("-(2+3)*4", "-20"),
    ("0.1+0.2", "0.30000000000000004"), ("1,200/3", "400.0"), ("1/3", "0.3333333333333333"), ("1,2,3+1", "124"),
    ("'strawberry'.count('r')", "3"), ('"banana".count("an")', "2"), ("  3 + 4  ", "7"), ("3.", "3.0"),
    ("'Hello'.lower().count('h')", "1"),
    ("'a,b,c'.count(',')", "4"), ("10000000000000000.0*1", "1e+16"), ("1" * 400 + "*" + "1" * 400,
                                                                     str(int("1" * 400) ** 2)),
])
def test_calculator_gives_nanochats_outputs(expr, value):
    assert use_calculator(expr) == value


@pytest.mark.parametrize("expr", [
    "2**10", "7 % 3", "1e5", "1_000", "0x10", "3\n+4", "'abc'.count('a') + 1", "2*'ab'.count('a')",
    "'directory'.count('d')", "'profile'.count('f')", "'Evaluate'.count('e')", "'abc'.upper()", "len('abc')",
    "'a'.count", "x.count('a')", "'abc'.count('a', 1)", "1/0", "5//0", "",
])
def test_calculator_refuses_what_nanochat_refuses(expr):
    assert use_calculator(expr) is None


@pytest.mark.parametrize("expr, value", [
    ("12*3", "36"), ("48/2", "24"), ("10/4", "2.5"), ("7//2", "3"), ("7 % 3", "1"), ("-(2+3)*4", "-20"),
    ("2**10", "1024"), ("2**-1", "0.5"), ("0.1+0.2", "0.3"), ("1,200/3", "400"), ("1/3", "0.333333"),
    ("'strawberry'.count('r')", "3"), ('"banana".count("an")', "2"), ("  3 + 4  ", "7"),
    ("2*'abc'.count('a')", "2"),
])
def test_extended_calculator_evaluates_arithmetic_and_count(expr, value):
    assert use_calculator(expr, extended=True) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "import os", "(1).__class__", "'a'.upper()", "'a'.count", "x + 1",
    "'abc'.count('a', 1)", "str(1)", "open('f')", "[1, 2]", "lambda: 1", "1 if 1 else 2", "2**100000",
    "9**9**9", "10.0**400", "2.0**1e10", "1/0", "5 % 0", "'a' * 10", "'a' + 'b'", "True + 1", "-'a'",
    "(-8) ** 0.5", "1" * 600 + "*" + "1" * 600, "1 < 2", "(" * 600 + "1" + ")" * 600, "'a'.count('a')" * 80,
    "", "1;2", "globals()",
])
def test_calculator_rejects_everything_else(expr):
    assert use_calculator(expr) is None and use_calculator(expr, extended=True) is None
    with pytest.raises(CalculatorError):
        evaluate_expression(expr)


@pytest.mark.parametrize("expr", ["5or 1", "1if 2 else 3", "12is 3"])
def test_calculator_refuses_a_models_malformed_literal_without_a_warning(expr):
    """Python's parser warns about '5or' (a number run into a keyword); a sampling model writes such things,
    and each would print a SyntaxWarning into the stage's log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert use_calculator(expr) is None and use_calculator(expr, extended=True) is None
    assert [w.message for w in caught] == []


def test_extended_calculator_formats_numbers_like_the_training_data():
    assert format_number(24.0) == "24"
    assert format_number(2.5) == "2.5"
    assert format_number(10 ** 20) == str(10 ** 20)
    assert format_number(1e300) == "1e+300"


def test_cpu_presets_sample_with_the_calculator_their_builtin_problems_are_written_for():
    """The builtin arithmetic annotations write 48/2 as 24 (as GSM8K does); nanochat's calculator answers 24.0.
    The CPU presets' sampling stages use nanopipe's calculator, whose every output matches the annotation."""
    import re

    from flows.presets import PRESETS
    from nanopipe.calculator import use_calculator
    from nanopipe.tasks.builtin import ArithmeticProblems

    calls = [call for i in range(200) for call in re.findall(r"<<([^=>]+)=([^>]+)>>",
                                                             ArithmeticProblems(200, "test").get_row(i)["answer"])]
    assert any("/" in expr for expr, _ in calls)
    assert all(use_calculator(expr, extended=True) == result for expr, result in calls)
    assert any(use_calculator(expr) != result for expr, result in calls)  # why the presets need the flag
    for name in ("demo-cpu", "cpu-small"):
        assert PRESETS[name]["chat_rl"]["extended_calculator"] and PRESETS[name]["chat_eval"]["extended_calculator"]
