"""
Conversations to token ids: the one place that decides what a chat looks like to the model.

A conversation is a dict with a "messages" list (tasks may add keys of their own, e.g. "letters"):

    {"messages": [
        {"role": "system", "content": "optional, merged into the first user message"},
        {"role": "user", "content": "How many r in strawberry?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me count. "},
            {"type": "python", "text": "'strawberry'.count('r')"},   # the model writes this call
            {"type": "python_output", "text": "3"},                 # the tool writes this result
            {"type": "text", "text": "#### 3"}]},
    ]}

Rendered with the special tokens of nanopipe.tokenizer, it is one string (wrapped here at the "+"):

    <|bos|><|user_start|>How many r in strawberry?<|user_end|><|assistant_start|>Let me count. +
    <|python_start|>'strawberry'.count('r')<|python_end|><|output_start|>3<|output_end|>#### 3<|assistant_end|>

(a leading system message becomes "<system text>\n\n" at the start of the first user message).

The training mask is 1 exactly on what the assistant writes at inference time: its text, its python calls
with their delimiters, and <|assistant_end|>. <|assistant_start|> is 0 because the prompt supplies it; user
text and tool outputs are 0 because the model never has to produce them.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

BOS = "<|bos|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
OUTPUT_START, OUTPUT_END = "<|output_start|>", "<|output_end|>"

PART_TYPES = ("text", "python", "python_output")


class ConversationError(ValueError):
    """A conversation does not have the shape render_conversation expects. The message says where."""


class ChatTokenizer(Protocol):
    """The part of nanopipe.tokenizer.Tokenizer that rendering needs."""

    def encode(self, text: str) -> list[int]: ...

    def encode_special(self, name: str) -> int: ...

    def get_bos_token_id(self) -> int: ...


# -----------------------------------------------------------------------------
# Validation

def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or "type" not in part or "text" not in part:
        raise ConversationError(f"{where}: a part must be a dict with 'type' and 'text', got {part!r:.200}")
    if part["type"] not in PART_TYPES:
        raise ConversationError(f"{where}: unknown part type {part['type']!r} (valid: {', '.join(PART_TYPES)})")
    if not isinstance(part["text"], str):
        raise ConversationError(f"{where}: part text must be a string, got {type(part['text']).__name__}")
    if part["type"] == "python" and not part["text"]:
        raise ConversationError(f"{where}: empty python call")


def _check_content(message: dict, where: str) -> None:
    content = message["content"]
    if isinstance(content, str):
        if not content:
            raise ConversationError(f"{where}: empty content")
        return
    if message["role"] != "assistant":
        raise ConversationError(
            f"{where}: {message['role']} content must be a string, got {type(content).__name__} "
            f"(only assistant messages may be a list of parts)")
    if not isinstance(content, list):
        raise ConversationError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        _check_part(part, f"{where} part {j}")
    if not any(part["text"] for part in content):
        raise ConversationError(f"{where}: empty content (no part has any text)")


def normalize_messages(conversation: dict) -> list[dict]:
    """Validate a conversation and return its messages with a leading system message merged into the first
    user message. Roles must go user, assistant, user, ... (ending with either). Raises ConversationError."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ConversationError(f"a conversation is a dict with a 'messages' list, got {conversation!r:.200}")
    messages = conversation["messages"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConversationError(f"message {i}: must be a dict with 'role' and 'content', got {message!r:.200}")
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0], messages[1:]
        if not isinstance(system["content"], str) or not system["content"]:
            raise ConversationError("message 0: a system message needs non-empty string content")
    if not messages:
        raise ConversationError("conversation has no user message")
    offset = 1 if system is not None else 0
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ConversationError(
                f"message {i + offset}: role {message['role']!r} but expected {expected!r} "
                f"(an optional system message, then user and assistant alternate, starting with user)")
        _check_content(message, f"message {i + offset} ({message['role']})")
    if system is not None:
        merged = {"role": "user", "content": system["content"] + "\n\n" + messages[0]["content"]}
        messages = [merged] + list(messages[1:])
    return list(messages)


def assistant_parts(message: dict) -> list[dict]:
    """An assistant message's content as a list of parts (a plain string is one text part)."""
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


# -----------------------------------------------------------------------------
# Rendering

def _segments(messages: Sequence[dict]) -> list[tuple[str, str, int]]:
    """The conversation as (kind, payload, mask) pieces: kind 'special' carries a token name, kind 'text'
    carries text to encode. Both renderers below walk this one list, so they cannot disagree."""
    pieces: list[tuple[str, str, int]] = [("special", BOS, 0)]
    for message in messages:
        if message["role"] == "user":
            pieces += [("special", USER_START, 0), ("text", message["content"], 0), ("special", USER_END, 0)]
            continue
        pieces.append(("special", ASSISTANT_START, 0))
        for part in assistant_parts(message):
            if part["type"] == "text":
                pieces.append(("text", part["text"], 1))
            elif part["type"] == "python":
                pieces += [("special", PYTHON_START, 1), ("text", part["text"], 1), ("special", PYTHON_END, 1)]
            else:  # python_output: written by the tool, never supervised
                pieces += [("special", OUTPUT_START, 0), ("text", part["text"], 0), ("special", OUTPUT_END, 0)]
        pieces.append(("special", ASSISTANT_END, 1))
    return pieces


def _encode_pieces(tokenizer: ChatTokenizer, pieces: list[tuple[str, str, int]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    for kind, payload, supervised in pieces:
        if kind == "special":
            new = [tokenizer.get_bos_token_id() if payload == BOS else tokenizer.encode_special(payload)]
        else:
            new = tokenizer.encode(payload) if payload else []
        ids.extend(new)
        mask.extend([supervised] * len(new))
    return ids, mask


def render_conversation(tokenizer: ChatTokenizer, conversation: dict,
                        max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a same-length 0/1 mask (1 = the assistant wrote this token).
    Both are cut to the first max_tokens tokens (None: no limit)."""
    assert max_tokens is None or max_tokens >= 1, f"max_tokens must be >= 1 or None, got {max_tokens}"
    ids, mask = _encode_pieces(tokenizer, _segments(normalize_messages(conversation)))
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tokenizer: ChatTokenizer, conversation: dict) -> list[int]:
    """Prompt ids that ask the assistant for its next message: a final assistant message (the reference
    answer) is dropped, then <|assistant_start|> is appended. A conversation ending with a user message
    is rendered whole. Never truncated: a cut prompt would be a different question."""
    messages = normalize_messages(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = _encode_pieces(tokenizer, _segments(messages))
    return ids + [tokenizer.encode_special(ASSISTANT_START)]


def conversation_text(conversation: dict) -> str:
    """The rendered conversation as text, special tokens spelled out: tokenizer.decode of
    render_conversation's ids (untruncated) gives back exactly this string."""
    return "".join(payload for _, payload, _ in _segments(normalize_messages(conversation)))
