"""
Talk to a chat model in the terminal. The conversation is rendered with the chat special tokens each turn
(nanopipe.chat_format), and the calculator tool works: when the model writes a python block, the engine
evaluates it and feeds the result back before the model goes on.

Run alone (single process; torchrun brings nothing here):
    python -m nanopipe.stages.chat_cli                                  # interactive, latest sft model
    python -m nanopipe.stages.chat_cli --source=mid -p "What is 12 times 31?"   # one answer, then exit
    python -m nanopipe.stages.chat_cli --checkpoint_dir=<dir> --temperature=0 --max_new_tokens=128

In the interactive mode, 'clear' starts a new conversation and 'quit' / 'exit' (or Ctrl-D) leaves.
With --out_dir, the transcript and timing are written to <out_dir>/metrics.json at the end.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from nanopipe.chat_format import render_for_completion
from nanopipe.checkpoint import load_model
from nanopipe.common import compute_cleanup, compute_init, print0, write_metrics
from nanopipe.configs.flags import stage_main
from nanopipe.configs.chat_cli import SHORT_FLAGS, ChatCliConfig
from nanopipe.engine import Engine

PROG = "python -m nanopipe.stages.chat_cli"

# -----------------------------------------------------------------------------
# A conversation with the model

class ChatSession:
    """Messages so far, and the model's next answer to a new user message."""

    def __init__(self, engine: Engine, max_new_tokens: int = 256, temperature: float = 0.6,
                 top_k: int | None = 50, seed: int = 42):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed
        self.messages: list[dict] = []
        self.turns = 0

    def clear(self) -> None:
        self.messages = []

    def prompt_tokens(self) -> list[int]:
        """The conversation so far, ending with <|assistant_start|>: what the model continues."""
        return render_for_completion(self.tokenizer, {"messages": self.messages})

    def _fit_context(self) -> list[int]:
        """Drop the oldest exchanges until the prompt plus an answer fits the model's context."""
        context = self.engine.model.config.sequence_len
        prompt = self.prompt_tokens()
        while len(prompt) + self.max_new_tokens > context and len(self.messages) > 1:
            self.messages = self.messages[2:]
            print0("(the conversation outgrew the model's context: the oldest exchange was dropped)")
            prompt = self.prompt_tokens()
        return prompt

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the answer (streamed to on_text piece by piece), remember it."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._fit_context()
        tokens: list[int] = []
        shown = ""
        stream = self.engine.generate(prompt, num_samples=1, max_tokens=self.max_new_tokens,
                                      temperature=self.temperature, top_k=self.top_k, seed=self.seed + self.turns)
        for column, _ in stream:
            if column[0] in (self.engine.assistant_end, self.engine.bos):
                break
            tokens.append(column[0])
            text_so_far = self.tokenizer.decode(tokens)
            if on_text is not None and not text_so_far.endswith("\ufffd"):  # wait for whole characters
                on_text(text_so_far[len(shown):])
                shown = text_so_far
        self.turns += 1
        answer = self.tokenizer.decode(tokens)
        if on_text is not None and answer != shown:
            on_text(answer[len(shown):])
        parts = assistant_parts_from_tokens(self.engine, tokens)
        if parts:
            self.messages.append({"role": "assistant", "content": parts})
        else:  # an empty answer cannot be rendered back: leave the exchange out of the conversation
            self.messages.pop()
        return answer


def assistant_parts_from_tokens(engine: Engine, tokens: list[int]) -> list[dict]:
    """Split an answer into chat_format parts (text / python / python_output) at the tool tokens, so the
    next turn renders the tool call and its output with their special tokens again."""
    decode = engine.tokenizer.decode
    opens = {engine.python_start: "python", engine.output_start: "python_output"}
    closes = {engine.python_end: "python", engine.output_end: "python_output"}
    parts: list[dict] = []
    kind, buffer = "text", []

    def flush() -> None:
        text = decode(buffer)
        if text or kind == "python_output":
            parts.append({"type": kind, "text": text})

    for token in tokens:
        if token in opens or (token in closes and closes[token] == kind):
            flush()
            kind, buffer = (opens[token] if token in opens else "text"), []
        else:
            buffer.append(token)
    flush()
    if not any(part["text"] for part in parts):
        return []
    return parts


# -----------------------------------------------------------------------------
# The stage

def interactive(session: ChatSession) -> list[dict]:
    print("nanopipe chat: 'clear' starts over, 'quit' or 'exit' (or Ctrl-D) leaves", flush=True)
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "clear":
            session.clear()
            print("Conversation cleared.", flush=True)
            continue
        if not text:
            continue
        print("\nAssistant: ", end="", flush=True)
        session.ask(text, on_text=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
    return session.messages


def run(cfg: ChatCliConfig) -> dict:
    rt = compute_init(cfg.device_type, cfg.dtype, cfg.seed)
    try:
        model, tokenizer, meta = load_model(cfg.source, rt.device, phase="eval", model_tag=cfg.model_tag,
                                            step=cfg.model_step, checkpoint_dir=cfg.checkpoint_dir,
                                            tokenizer_dir=cfg.tokenizer_dir)
        session = ChatSession(Engine(model, tokenizer, extended_calculator=cfg.extended_calculator), cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed)
        autocast = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                    if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
        start = time.perf_counter()
        with autocast:
            if cfg.prompt is not None:
                answer = session.ask(cfg.prompt)
                print(answer, flush=True)
            else:
                interactive(session)
        seconds = time.perf_counter() - start
    finally:
        compute_cleanup()
    metrics = {"checkpoint_step": meta.get("step"), "messages": session.messages, "turns": session.turns,
               "seconds": seconds}
    if cfg.out_dir is not None:
        write_metrics(Path(cfg.out_dir).expanduser(), metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return stage_main(ChatCliConfig, run, argv, prog=PROG, short_aliases=SHORT_FLAGS)


if __name__ == "__main__":
    main(sys.argv[1:])
