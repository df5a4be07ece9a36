"""
HumanEval: 164 Python programming problems (https://huggingface.co/datasets/openai/openai_humaneval).

A row is {"task_id", "prompt", "canonical_solution", "test", "entry_point"}: the prompt is a function
signature with its docstring, the test defines check(candidate). The user message is the prompt, the
reference answer the prompt completed by the canonical solution. A completion passes when check(entry_point)
passes with "imports of the prompt + the completion's code" defining the function: that code runs in the
sandbox of nanopipe.execution, the test in a separate judge process that calls the function with literal
values only, so nothing the completion executes can score itself (issue 21).
"""

from __future__ import annotations

import re
from pathlib import Path

from nanopipe.tasks.base import Task
from nanopipe.tasks.sources import load_rows, require_keys

HF_REPO = "openai/openai_humaneval"
HF_SUBSET = "openai_humaneval"
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)\n?```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (comments and blank lines skipped), so that a completion
    that restates only the function still has them."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The code of a completion: its first fenced code block if it has one, else all of it."""
    match = _CODE_BLOCK.search(completion)
    return (match.group(1) if match else completion).strip("\n")


def candidate_code(conversation: dict, completion: str) -> str:
    """The code that defines the completion's function: the prompt's imports, then the completion's code."""
    prompt = conversation["messages"][0]["content"]
    return "\n\n".join([extract_imports(prompt), extract_program(completion)]) + "\n"


def problem_context(prompt: str) -> str:
    """The prompt as code the test may use (its imports and helper functions, run by the judge): it ends with
    the function to write, which gets a body if it has none (its docstring is one)."""
    for context in (prompt, prompt.rstrip() + "\n    pass\n"):
        try:
            compile(context, "<prompt>", "exec")
            return context
        except SyntaxError:
            continue
    return extract_imports(prompt)


def build_program(conversation: dict, completion: str) -> str:
    """The whole program, as one file, whose clean exit means the completion passes the problem's tests
    (for reading and for plain Python; evaluate() keeps the test out of the completion's process)."""
    return "\n\n".join([candidate_code(conversation, completion).rstrip("\n"), conversation["test"],
                        f"check({conversation['entry_point']})\n"])


class HumanEval(Task):
    """HumanEval from the hub or local files; evaluate() runs the completion in a sandboxed subprocess and
    the tests in a judge process that calls it."""

    eval_type = "generative"

    def __init__(self, split: str = "test", data_path: str | Path | None = None, shuffle_seed: int | None = 42,
                 timeout_s: float = 5.0, max_memory_bytes: int = 256 * 1024 * 1024, allow_weaker_sandbox: bool = False,
                 **slicing: int | None):
        super().__init__(**slicing)
        if split != "test":
            raise ValueError(f"HumanEval has only the 'test' split, got {split!r}")
        self.timeout_s, self.max_memory_bytes = timeout_s, max_memory_bytes
        self.allow_weaker_sandbox = allow_weaker_sandbox  # see nanopipe.execution: refused by default
        self.rows = load_rows(HF_REPO, HF_SUBSET, split, data_path, shuffle_seed, local_flag="--humaneval_path")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        row = require_keys(self.rows[index], keys, self.rows, index)
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        from nanopipe.execution import check_candidate  # imported here: only HumanEval needs the sandbox

        prompt = conversation["messages"][0]["content"]
        result = check_candidate(candidate_code(conversation, completion), conversation["test"],
                                 conversation["entry_point"], context=problem_context(prompt),
                                 timeout=self.timeout_s, max_memory_bytes=self.max_memory_bytes,
                                 allow_weaker_sandbox=self.allow_weaker_sandbox)
        return int(result.success)
