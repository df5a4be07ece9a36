"""
The pipeline's steps, in order. A stage joins the pipeline with its config field on `PipelineConfig`
(flows/config.py) and one `Step(...)` line here (plus, as data, a `stage-<name>` deployment in
prefect.yaml). For example, mid-training would join as

    Step("mid_train", "nanopipe.stages.mid_train", "mid_train",
         inputs={"checkpoint_dir": ("base_train", "checkpoints"), "tokenizer_dir": ("tok_train", "tokenizer")},
         output="checkpoints", resume_flag=("resume_from_step", "latest"), dry_run_flag="dry_run",
         tag=_tag_field("d{depth}"))

with whatever its config calls those fields; an optional stage names its switch with `when="run_rl"`.

A step names the stage module it launches, which config fields the orchestrator wires to upstream
artifacts (field -> (upstream step, path inside that artifact)), and where in its own artifact directory
the stage writes (`out_dir`). Several steps may launch the same module (e.g. one evaluation per phase).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _tag_field(template: str) -> Callable[[Any], str]:
    """A readable directory tag from config values, e.g. 'd{depth}' -> 'd12'."""
    return lambda cfg: template.format(**cfg.model_dump())


@dataclass(frozen=True)
class Step:
    name: str                                   # unique step name: artifact subdirectory, task name
    module: str                                 # python -m <module>
    config_field: str                           # PipelineConfig attribute holding its config
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)   # config field -> (step, subpath)
    output: str = "out"                         # subdirectory of the artifact passed as --out_dir
    distributed: bool = True                    # launched with torchrun (else plain python -m)
    resume_flag: tuple[str, str] | None = None  # (flag, value) always passed: resume from the checkpoints in
                                                # output if any (so every node gets the same command)
    checkpoint_glob: str = "model_*.pt"         # what counts as "a checkpoint exists" for resume
    dry_run_flag: str | None = None             # flag for the preflight check (shapes, memory), if any
    tag: Callable[[Any], str] = lambda cfg: "run"
    fixed: dict[str, Any] = field(default_factory=dict)   # values this step always sets on its config
    when: str | None = None                     # PipelineConfig bool field that enables the step
    key_metrics: tuple[str, ...] = ()           # shown in the summary table (all scalars if empty)


STEPS: list[Step] = [
    Step("tok_train", "nanopipe.stages.tok_train", "tok_train", output="tokenizer", distributed=False,
         tag=_tag_field("v{vocab_size}"), key_metrics=("vocab_size", "train_chars", "val_bytes_per_token")),
    Step("tok_eval", "nanopipe.stages.tok_eval", "tok_eval", inputs={"tokenizer_dir": ("tok_train", "tokenizer")},
         distributed=False, tag=lambda cfg: "eval", key_metrics=("val_bytes_per_token",)),
    Step("base_train", "nanopipe.stages.base_train", "base_train", inputs={"tokenizer_dir": ("tok_train", "tokenizer")},
         output="checkpoints", resume_flag=("resume_from_step", "latest"), dry_run_flag="dry_run",
         tag=_tag_field("d{depth}"), key_metrics=("val_bpb", "core_metric", "train_loss", "num_params", "tokens_per_sec")),
    Step("base_eval", "nanopipe.stages.base_eval", "base_eval",
         inputs={"checkpoint_dir": ("base_train", "checkpoints"), "tokenizer_dir": ("tok_train", "tokenizer")},
         fixed={"source": "base"}, tag=lambda cfg: "eval", key_metrics=("core_metric", "val_bpb", "train_bpb")),
]

STEP_NAMES = [s.name for s in STEPS]


def get_step(name: str) -> Step:
    for step in STEPS:
        if step.name == name:
            return step
    raise KeyError(f"unknown stage {name!r}; the pipeline's stages are: {', '.join(STEP_NAMES)}")
