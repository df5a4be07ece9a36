"""
What the models wrote, as a `<stage>-samples` card: a base model's completions of the sample prompts and its
unconditioned samples, each flagged when it says nothing (empty after its prompt, or one word repeated); a
chat evaluation's problems with the model's answer, right or wrong. Torch-free: the sample prompts are read
from nanopipe/sampling.py as text.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from flows.artifacts import PARSE_LOCK

SAMPLING_MODULE = Path(__file__).resolve().parents[1] / "nanopipe" / "sampling.py"


@functools.lru_cache(maxsize=1)
def sample_prompts() -> tuple[str, ...]:
    """nanopipe.sampling.SAMPLE_PROMPTS, read without importing it (it imports torch)."""
    try:
        with PARSE_LOCK:   # see flows.artifacts.PARSE_LOCK
            tree = ast.parse(SAMPLING_MODULE.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return ()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "SAMPLE_PROMPTS":
            return tuple(ast.literal_eval(node.value))
    return ()


def flag(text: str) -> str:
    """A line before a sample that says nothing: empty after its prompt, or one word over and over."""
    prompt = max((p for p in sample_prompts() if text.startswith(p)), key=len, default="")
    words = text[len(prompt):].split()
    if not words:
        return "**empty:** the model wrote nothing" + (" after the prompt" if prompt else "") + "\n\n"
    return "**degenerate:** one word repeated\n\n" if len(words) >= 4 and len(set(words)) == 1 else ""


def _fence(text: str) -> str:
    return "```text\n" + str(text).replace("```", "'''") + "\n```"


def samples_markdown(stage: str, metrics: dict) -> str | None:
    """base_train / base_eval completions of the sample prompts (and unconditioned ones); a chat
    evaluation's problems with the model's answer and whether it was right. None when there are none."""
    lines = []
    texts = [("completions of the sample prompts", metrics.get("samples")),
             ("unconditioned samples", metrics.get("unconditioned_samples"))]
    for heading, items in texts:
        items = [t for t in (items or []) if isinstance(t, str)]
        if items:
            said_nothing = sum(1 for t in items if flag(t))
            note = [f"{said_nothing} of {len(items)} say nothing (flagged below).", ""] if said_nothing else []
            lines += [f"## {heading}", "", *note] + [flag(t) + _fence(t) + "\n" for t in items]
    chats = [s for s in (metrics.get("samples") or []) if isinstance(s, dict)]
    for s in chats:
        verdict = "correct" if s.get("correct") else "wrong"
        lines += [f"### {s.get('task', '?')}: {verdict}", "", "question:", _fence(s.get("question", "")),
                  "model answer:", _fence(s.get("answer", ""))]
        if s.get("reference"):
            lines += ["reference:", _fence(s["reference"])]
        lines.append("")
    return f"# {stage} samples\n\n" + "\n".join(lines) if lines else None
