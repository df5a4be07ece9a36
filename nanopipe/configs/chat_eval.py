"""Flags of the chat evaluation stage (`python -m nanopipe.stages.chat_eval`), and the tasks it knows."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field, field_validator

from nanopipe.configs.base import CalculatorFlags, CheckpointSource, DownstreamConfig, TopK

CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
OFFLINE_TASKS = ("Arithmetic", "MultipleChoice")  # builtin stand-ins for GSM8K and MMLU, generated locally
EVAL_TASKS = CHATCORE_TASKS + OFFLINE_TASKS
SYNTHETIC_TASKS = ("SpellingBee",) + OFFLINE_TASKS
EvalTaskName = Literal["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "Arithmetic",
                       "MultipleChoice"]



def chatcore_label(tasks: Sequence[str]) -> str:
    """'ChatCORE' for a mean over all of nanochat's six tasks, 'ChatCORE (partial: k of 6 tasks)' otherwise."""
    if all(name in tasks for name in CHATCORE_TASKS):
        return "ChatCORE"
    return f"ChatCORE (partial: {sum(name in CHATCORE_TASKS for name in tasks)} of {len(CHATCORE_TASKS)} tasks)"


def chatcore_of(metrics: dict) -> tuple[float | None, float | None]:
    """(ChatCORE, partial ChatCORE) of chat_eval's metrics, at most one of them set. Metrics written before the
    partial one had its own key kept it under "chatcore" with "chatcore_complete" false: read as partial."""
    if metrics.get("chatcore_partial") is not None:
        return None, metrics["chatcore_partial"]
    tasks = metrics.get("chatcore_tasks") or CHATCORE_TASKS
    complete = metrics.get("chatcore_complete", all(name in tasks for name in CHATCORE_TASKS))
    return (metrics.get("chatcore"), None) if complete else (None, metrics.get("chatcore"))


# config field holding the local data of each task (None: the task's hub dataset / builtin word list)
DATA_PATH_FIELDS = {"ARC-Easy": "arc_easy_path", "ARC-Challenge": "arc_challenge_path", "MMLU": "mmlu_path",
                    "GSM8K": "gsm8k_path", "HumanEval": "humaneval_path", "SpellingBee": "spelling_words_path"}

# nanochat's chat_eval flags (061f83c): `-i sft -a "ARC-Easy|GSM8K" -x 100` works here too
SHORT_FLAGS = {"-i": "source", "-a": "task", "--task-name": "task", "-d": "dtype", "-t": "temperature",
               "-m": "max_new_tokens", "-n": "num_samples", "-k": "top_k", "-b": "batch_size", "-g": "model_tag",
               "-s": "model_step", "--step": "model_step", "-x": "max_problems"}

class ChatEvalConfig(CalculatorFlags, DownstreamConfig):
    """Flags of the chat evaluation stage."""

    source: CheckpointSource = Field("sft", description="which stage's checkpoints to load")
    task: list[EvalTaskName] = Field(
        list(CHATCORE_TASKS), min_length=1,
        description=f"tasks to evaluate, separated by ',' or '|', from: {', '.join(EVAL_TASKS)}")
    batch_size: int = Field(8, ge=1, description="problems per forward pass (generative tasks: decoded together, "
                                                "batch_size * num_samples sequences)")
    max_problems: int | None = Field(None, ge=1, description="evaluate at most this many problems per task "
                                                            "(none: all)")
    num_samples: int = Field(1, ge=1, le=1024, description="completions sampled per generative problem "
                                                           "(a problem passes if any one does: pass@k)")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature on generative tasks; 0 is greedy")
    top_k: TopK = Field(50, ge=1, description="sample among the k most likely tokens (none, 0 or -1: all)")
    max_new_tokens: int = Field(512, ge=1, description="tokens generated at most per completion")
    synthetic_size: int = Field(256, ge=1, description="problems generated for SpellingBee, Arithmetic and "
                                                       "MultipleChoice")
    arc_easy_path: str | None = Field(None, description="local ARC-Easy data, file or directory (none: the hub)")
    arc_challenge_path: str | None = Field(None, description="local ARC-Challenge data (none: the hub)")
    mmlu_path: str | None = Field(None, description="local MMLU 'all' data, file or directory (none: the hub)")
    gsm8k_path: str | None = Field(None, description="local GSM8K data, file or directory (none: the hub)")
    humaneval_path: str | None = Field(None, description="local HumanEval data, file or directory (none: the hub)")
    spelling_words_path: str | None = Field(None, description="word list for SpellingBee: a file, one word per "
                                                              "line, 'download' (the public 370K-word list) or an "
                                                              "http(s) URL (none: the builtin list)")
    tokenizer_dir: str | None = Field(None, description="tokenizer to use (default: the one the checkpoint records)")
    out_dir: str | None = Field(None, description="where metrics.json goes "
                                                  "(default: NANOPIPE_HOME/chat_eval/<source>-<model tag>)")
    gsm8k_lenient: bool = Field(False, description="nanopipe's lenient GSM8K scoring: '####18', '#### 18.00' and "
                                                   "'#### 18.' match 18 (default: nanochat's exact match)")
    allow_unsandboxed_code: bool = Field(
        False, description="run HumanEval completions even where the kernel cannot isolate them (no user, PID or "
                           "mount namespaces): only rlimits, a privilege drop and Python-level guards then")

    NON_SEMANTIC = ("allow_unsandboxed_code",)  # the same scores, or a refusal to run

    @field_validator("task", mode="before")
    @classmethod
    def _split_tasks(cls, value):
        """nanochat separates tasks with '|' (-a "ARC-Easy|GSM8K"); commas work as well."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            return value
        return [part.strip() for item in items for part in str(item).replace("|", ",").split(",") if part.strip()]
