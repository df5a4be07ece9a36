"""Conversation rendering: exact token layout, the training mask, truncation, prompts, malformed input."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nanopipe.chat_format import (ConversationError, conversation_text, render_conversation,
                                  render_for_completion)
from nanopipe.tasks import builtin_chat_mixture
from nanopipe.tasks.gsm8k import gsm8k_conversation
from nanopipe.tokenizer import SPECIAL_TOKENS, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A real (small) BPE trained on chat-like text, so that words merge into multi-byte tokens."""
    mixture = builtin_chat_mixture("train", seed=0, size=40)
    texts = [json.dumps(mixture[i]) for i in range(len(mixture))]
    return Tokenizer.train_from_iterator(texts, vocab_size=700)


def special(tok, name):
    return tok.encode_special(name)


TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How many r in strawberry?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Counting: "},
        {"type": "python", "text": "'strawberry'.count('r')"},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": "\n#### 3"},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_exact_layout_of_a_tool_conversation(tok):
    ids, mask = render_conversation(tok, TOOL_CONVERSATION)
    expected = ("<|bos|><|user_start|>Be brief.\n\nHow many r in strawberry?<|user_end|>"
                "<|assistant_start|>Counting: <|python_start|>'strawberry'.count('r')<|python_end|>"
                "<|output_start|>3<|output_end|>\n#### 3<|assistant_end|>"
                "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>")
    assert tok.decode(ids) == expected == conversation_text(TOOL_CONVERSATION)
    assert len(ids) == len(mask)
    # the supervised tokens, in order, are exactly what the assistant writes
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == ("Counting: <|python_start|>'strawberry'.count('r')<|python_end|>\n#### 3<|assistant_end|>"
                          "You're welcome.<|assistant_end|>")
    by_id = dict(zip(ids, mask))
    for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|output_start|>",
                 "<|output_end|>"):
        assert by_id[special(tok, name)] == 0, name
    for name in ("<|assistant_end|>", "<|python_start|>", "<|python_end|>"):
        assert by_id[special(tok, name)] == 1, name
    # the tool output "3" is never supervised, the same digit in "#### 3" is
    out_start, out_end = ids.index(special(tok, "<|output_start|>")), ids.index(special(tok, "<|output_end|>"))
    assert out_end > out_start + 1 and not any(mask[out_start:out_end + 1])


def test_input_conversation_is_not_modified(tok):
    before = json.dumps(TOOL_CONVERSATION, sort_keys=True)
    render_conversation(tok, TOOL_CONVERSATION)
    render_for_completion(tok, TOOL_CONVERSATION)
    assert json.dumps(TOOL_CONVERSATION, sort_keys=True) == before


def test_truncation_keeps_a_prefix(tok):
    full_ids, full_mask = render_conversation(tok, TOOL_CONVERSATION, max_tokens=None)
    for limit in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = render_conversation(tok, TOOL_CONVERSATION, max_tokens=limit)
        assert ids == full_ids[:limit] and mask == full_mask[:limit]
    assert render_conversation(tok, TOOL_CONVERSATION)[0] == full_ids  # default 2048 is plenty here


def test_render_for_completion_primes_the_assistant(tok):
    prompt = render_for_completion(tok, TOOL_CONVERSATION)
    without_last = {"messages": TOOL_CONVERSATION["messages"][:-1]}
    assert prompt == render_conversation(tok, without_last)[0] + [special(tok, "<|assistant_start|>")]
    assert tok.decode(prompt).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    # a conversation that ends with the user (e.g. a live chat) is prompted as is
    assert render_for_completion(tok, without_last) == prompt


MALFORMED = [
    ({"messages": []}, "no user message"),
    ({"text": "hi"}, "'messages' list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "message 2: role 'assistant'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "unknown part type 'image'"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "python", "text": ""}]}]}, "empty python call"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, "user content must be a string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}, "expected 'user'"),
    ({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "b"}]}, "system message"),
    ({"messages": [{"role": "user", "content": "a"}, "hello"]}, "message 1: must be a dict"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}, "string or a list"),
]


@pytest.mark.parametrize("conversation, needle", MALFORMED)
def test_malformed_conversations_raise_clear_errors(tok, conversation, needle):
    with pytest.raises(ConversationError) as info:
        render_conversation(tok, conversation)
    assert needle in str(info.value)
    with pytest.raises(ConversationError):
        conversation_text(conversation)


def test_render_for_completion_rejects_malformed(tok):
    with pytest.raises(ConversationError, match="expected 'user'"):
        render_for_completion(tok, {"messages": [{"role": "assistant", "content": "x"}]})


# -----------------------------------------------------------------------------
# Property tests: an independent re-statement of the format, checked on random conversations

SPECIALS = set(SPECIAL_TOKENS)
text = st.text(min_size=1, max_size=24)
parts = st.lists(st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=24)),
    st.builds(lambda t: {"type": "python", "text": t}, text),
    st.builds(lambda t: {"type": "python_output", "text": t}, st.text(max_size=12)),
), min_size=1, max_size=5).filter(lambda ps: any(p["text"] for p in ps))
assistant_content = st.one_of(text, parts)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    for _ in range(turns):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(assistant_content)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(text)})
    return {"messages": messages}


def expected_pieces(conversation):
    """(text, supervised) pieces, written from the format's definition and nothing else."""
    messages = list(conversation["messages"])
    if messages[0]["role"] == "system":
        messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
    pieces = [("<|bos|>", False)]
    for m in messages:
        if m["role"] == "user":
            pieces.append(("<|user_start|>" + m["content"] + "<|user_end|>", False))
            continue
        pieces.append(("<|assistant_start|>", False))
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        for p in content:
            if p["type"] == "text":
                pieces.append((p["text"], True))
            elif p["type"] == "python":
                pieces.append(("<|python_start|>" + p["text"] + "<|python_end|>", True))
            else:
                pieces.append(("<|output_start|>" + p["text"] + "<|output_end|>", False))
        pieces.append(("<|assistant_end|>", True))
    return pieces


def runs(tok, ids, mask, value):
    """Decoded maximal runs of tokens whose mask equals `value`."""
    out, current = [], []
    for i, m in zip(ids, mask):
        if m == value:
            current.append(i)
        elif current:
            out.append(tok.decode(current))
            current = []
    if current:
        out.append(tok.decode(current))
    return out


def merge_runs(pieces, value):
    out, current = [], ""
    for piece, supervised in pieces:
        if not piece:  # an empty text part renders to no tokens at all
            continue
        if supervised == value:
            current += piece
        elif current:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


property_settings = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@property_settings
@given(conversations())
def test_decode_reproduces_the_conversation(tok, conversation):
    ids, mask = render_conversation(tok, conversation, max_tokens=None)
    assert tok.decode(ids) == "".join(p for p, _ in expected_pieces(conversation))
    assert len(ids) == len(mask) and set(mask) <= {0, 1}


@property_settings
@given(conversations())
def test_mask_covers_exactly_the_assistant_spans(tok, conversation):
    ids, mask = render_conversation(tok, conversation, max_tokens=None)
    pieces = expected_pieces(conversation)
    assert runs(tok, ids, mask, 1) == merge_runs(pieces, True)
    assert runs(tok, ids, mask, 0) == merge_runs(pieces, False)
    # every special token is a single id, with the mask its role dictates
    for i, m in zip(ids, mask):
        name = tok.decode([i])
        if name in SPECIALS and tok.is_special(i):
            assert m == (name in ("<|assistant_end|>", "<|python_start|>", "<|python_end|>")), name


@property_settings
@given(conversations(), st.integers(1, 400))
def test_truncation_is_a_prefix_of_the_full_render(tok, conversation, limit):
    full = render_conversation(tok, conversation, max_tokens=None)
    cut = render_conversation(tok, conversation, max_tokens=limit)
    assert cut == (full[0][:limit], full[1][:limit])


@property_settings
@given(conversations())
def test_completion_prompt_is_the_history_plus_assistant_start(tok, conversation):
    messages = conversation["messages"]
    history = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    prompt = render_for_completion(tok, conversation)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.decode(prompt) == conversation_text({"messages": history}) + "<|assistant_start|>"


# -----------------------------------------------------------------------------
# Real data renders

def test_real_gsm8k_rows_render_with_tool_calls(tok):
    path = SHARED / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"shared GSM8K not found at {path} (the ../shared folder beside the repo)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:50]]
    for row in rows:
        conversation = gsm8k_conversation(row["question"], row["answer"])
        ids, mask = render_conversation(tok, conversation, max_tokens=None)
        text = tok.decode(ids)
        # decoding restores the solution with <<expr=result>> spelled with the special tokens
        restored = (text.split("<|assistant_start|>")[1].removesuffix("<|assistant_end|>")
                    .replace("<|python_start|>", "<<").replace("<|python_end|><|output_start|>", "=")
                    .replace("<|output_end|>", ">>"))
        assert restored == row["answer"]
        assert runs(tok, ids, mask, 1)[-1].endswith("<|assistant_end|>")
        supervised = tok.decode([i for i, m in zip(ids, mask) if m])
        assert row["question"] not in supervised and "<|output_start|>" not in supervised


def test_builtin_mixture_renders(tok):
    mixture = builtin_chat_mixture("val", seed=3, size=20)
    for conversation in mixture:
        ids, mask = render_conversation(tok, conversation)
        assert sum(mask) > 0 and tok.decode(ids) == conversation_text(conversation)
