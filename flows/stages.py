"""
The pipeline's stages, in order: one `Stage(...)` row each. A stage joins the pipeline with its config field
on `PipelineConfig` (flows/config.py), one row here, and, as data, a `stage-<name>` deployment in prefect.yaml.

A row names the module it launches, which config fields the orchestrator wires to upstream artifacts
(field -> (upstream stage, path inside that artifact)), where in its own artifact directory the module
writes (`out_dir`), and `code`: the modules whose source decides what the stage produces. Only those are in
the artifact's hash (with comments, docstrings and log messages left out), so editing a log line, a sample
prompt or an evaluation elsewhere leaves a trained model Cached, while editing the model or the optimizer
retrains it. Review `code` when a stage starts to depend on another module. Several rows may launch the
same module (e.g. one chat evaluation per phase).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from nanopipe.configs.base import model_tag_for_depth


def _tag_field(template: str) -> Callable[[Any], str]:
    """A readable directory tag from config values, e.g. 'v{vocab_size}' -> 'v32768'."""
    return lambda cfg: template.format(**cfg.model_dump())


@dataclass(frozen=True)
class Stage:
    name: str                                   # unique stage name: artifact subdirectory, task name
    module: str                                 # python -m <module>
    config_field: str                           # PipelineConfig attribute holding its config
    code: tuple[str, ...]                       # nanopipe modules (or packages) that decide its output
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)   # config field -> (stage, subpath)
    output: str = "out"                         # subdirectory of the artifact passed as --out_dir
    distributed: bool = True                    # launched with torchrun (else plain python -m)
    resume_flag: tuple[str, str] | None = None  # (flag, value) always passed: resume from the checkpoints in
                                                # output if any (so every node gets the same command)
    checkpoint_glob: str = "model_*.pt"         # what counts as "a checkpoint exists" for resume
    dry_run_flag: str | None = None             # flag for the preflight check (shapes, memory), if any
    tag: Callable[[Any], str] = lambda cfg: "run"
    fixed: dict[str, Any] = field(default_factory=dict)   # values this stage always sets on its config
    when: str | None = None                     # PipelineConfig bool field that enables the stage
    key_metrics: tuple[str, ...] = ()           # shown in the summary table (all scalars if empty)


# What decides the output of each kind of stage. The stage's own module and config model are always in.
# Text comes from the shard reader and the builtin corpus (downloading and preparing shards write files
# that the data fingerprint and the hub repo identify).
_DATA = ("nanopipe.data.shards", "nanopipe.data.builtin")
_TOKENIZER = ("nanopipe.tokenizer", "nanopipe.vocab", *_DATA)
_MODEL = ("nanopipe.gpt", "nanopipe.kv_cache", "nanopipe.fused_kernels", "nanopipe.optim", "nanopipe.checkpoint",
          "nanopipe.tokenizer", "nanopipe.vocab")
_TRAINING = _MODEL + ("nanopipe.training", "nanopipe.dataloader", *_DATA, "nanopipe.loss_eval", "nanopipe.reshard")
_CHAT = _MODEL + ("nanopipe.training", "nanopipe.chat_format", "nanopipe.tasks", "nanopipe.chat_train",
                  "nanopipe.chat_batches", *_DATA, "nanopipe.configs.chat_common", "nanopipe.dataloader",
                  "nanopipe.reshard")
_CHAT_EVAL = _MODEL + ("nanopipe.chat_format", "nanopipe.tasks", "nanopipe.engine", "nanopipe.calculator",
                       "nanopipe.execution",
                       "nanopipe.sandbox", "nanopipe.chat_scoring", *_DATA)

# The nanopipe modules that stages import but that do not decide what a stage produces: editing one of them
# reuses every artifact. Each other module a stage imports, directly or through another, must be in its code
# (tests/test_artifacts.py checks it, so that splitting a module cannot drop code from the cache key).
OUTSIDE_THE_KEY = {
    "nanopipe": "the package; its version is part of every code version",
    "nanopipe.common": "run-time plumbing: process group, logging, progress lines, atomic writes",
    "nanopipe.exit_codes": "the exit statuses a stage ends with",
    "nanopipe.events": "the typed records a stage prints for the flow (progress, resume, memory, plan, error)",
    "nanopipe.configs": "the config models and the command-line parser: the values they resolve to are the "
                        "config digest",
    "nanopipe.data": "the data package's entry point",
    "nanopipe.data.hub": "the download client: the data fingerprint and the hub repo identify what it fetched",
    "nanopipe.data.write": "writing shard directories: the data fingerprint identifies what was written",
    "nanopipe.core_eval": "base_train's closing CORE score, a reported figure (base_eval is the evaluation stage)",
    "nanopipe.sampling": "base_train's sample completions, printed for a person to read",
    "nanopipe.engine": "the decoding engine, which base_train and chat_sft use only for reported figures",
    "nanopipe.calculator": "the engine's tool, in base_train's and chat_sft's reported figures only (base_eval, "
                           "chat_eval and chat_rl have it in their code)",
    "nanopipe.remote": "the download client: the URL in the config and the checked size and sha256 identify what "
                       "it fetched",
    "nanopipe.chat_scoring": "chat_sft's in-training evaluation and chat_rl's pass@k, reported figures "
                             "(chat_eval is the stage)",
}

_TOKENIZER_INPUT = {"tokenizer_dir": ("tok_train", "tokenizer")}


def _code(stage_module: str, *modules: str) -> tuple[str, ...]:
    name = stage_module.rsplit(".", 1)[1]
    return tuple(dict.fromkeys((stage_module, f"nanopipe.configs.{name}", *modules)))


STAGES: list[Stage] = [
    Stage("tok_train", "nanopipe.stages.tok_train", "tok_train", _code("nanopipe.stages.tok_train", *_TOKENIZER),
          output="tokenizer", distributed=False, tag=_tag_field("v{vocab_size}"),
          key_metrics=("vocab_size", "train_chars", "val_bytes_per_token")),
    Stage("tok_eval", "nanopipe.stages.tok_eval", "tok_eval", _code("nanopipe.stages.tok_eval", *_TOKENIZER),
          inputs={"tokenizer_dir": ("tok_train", "tokenizer")}, distributed=False, tag=lambda cfg: "eval",
          key_metrics=("val_bytes_per_token",)),
    Stage("base_train", "nanopipe.stages.base_train", "base_train", _code("nanopipe.stages.base_train", *_TRAINING),
          inputs={"tokenizer_dir": ("tok_train", "tokenizer")}, output="checkpoints",
          resume_flag=("resume_from_step", "latest"), dry_run_flag="plan_only",
          tag=lambda cfg: model_tag_for_depth(cfg.depth),
          key_metrics=("val_bpb", "core_metric", "train_loss", "num_params", "tokens_per_sec")),
    Stage("base_eval", "nanopipe.stages.base_eval", "base_eval",
          _code("nanopipe.stages.base_eval", *_MODEL, "nanopipe.core_eval", "nanopipe.loss_eval",
                "nanopipe.dataloader", *_DATA, "nanopipe.engine", "nanopipe.calculator"),
          inputs={"checkpoint_dir": ("base_train", "checkpoints"), "tokenizer_dir": ("tok_train", "tokenizer")},
          fixed={"source": "base"}, tag=lambda cfg: "eval", key_metrics=("core_metric", "val_bpb", "train_bpb")),
    Stage("mid_train", "nanopipe.stages.mid_train", "mid_train", _code("nanopipe.stages.mid_train", *_CHAT),
          inputs={"checkpoint_dir": ("base_train", "checkpoints"), **_TOKENIZER_INPUT}, output="checkpoints",
          fixed={"source": "base"}, resume_flag=("resume_from_step", "latest"), dry_run_flag="plan_only",
          tag=lambda cfg: "mid", key_metrics=("val_loss", "val_bpb", "train_loss")),
    Stage("chat_eval_mid", "nanopipe.stages.chat_eval", "chat_eval", _code("nanopipe.stages.chat_eval", *_CHAT_EVAL),
          inputs={"checkpoint_dir": ("mid_train", "checkpoints"), **_TOKENIZER_INPUT}, fixed={"source": "mid"},
          tag=lambda cfg: "mid", key_metrics=("chatcore", "chatcore_partial", "accuracy")),
    Stage("chat_sft", "nanopipe.stages.chat_sft", "chat_sft", _code("nanopipe.stages.chat_sft", *_CHAT),
          inputs={"checkpoint_dir": ("mid_train", "checkpoints"), **_TOKENIZER_INPUT}, output="checkpoints",
          fixed={"source": "mid"}, resume_flag=("resume_from_step", "latest"), dry_run_flag="plan_only",
          tag=lambda cfg: "sft", key_metrics=("val_loss", "train_loss")),
    Stage("chat_eval_sft", "nanopipe.stages.chat_eval", "chat_eval", _code("nanopipe.stages.chat_eval", *_CHAT_EVAL),
          inputs={"checkpoint_dir": ("chat_sft", "checkpoints"), **_TOKENIZER_INPUT}, fixed={"source": "sft"},
          tag=lambda cfg: "sft", key_metrics=("chatcore", "chatcore_partial", "accuracy")),
    Stage("chat_rl", "nanopipe.stages.chat_rl", "chat_rl",
          _code("nanopipe.stages.chat_rl", *_CHAT, "nanopipe.engine", "nanopipe.calculator", "nanopipe.execution",
                "nanopipe.sandbox", "nanopipe.rl"),
          inputs={"checkpoint_dir": ("chat_sft", "checkpoints"), **_TOKENIZER_INPUT}, output="checkpoints",
          fixed={"source": "sft"}, resume_flag=("resume_from_step", "latest"), dry_run_flag="plan_only",
          tag=lambda cfg: "rl", when="run_rl", key_metrics=("reward", "pass@1")),
    Stage("chat_eval_rl", "nanopipe.stages.chat_eval", "chat_eval", _code("nanopipe.stages.chat_eval", *_CHAT_EVAL),
          inputs={"checkpoint_dir": ("chat_rl", "checkpoints"), **_TOKENIZER_INPUT}, fixed={"source": "rl"},
          tag=lambda cfg: "rl", when="run_rl", key_metrics=("chatcore", "chatcore_partial", "accuracy")),
]

STAGE_NAMES = [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; the pipeline's stages are: {', '.join(STAGE_NAMES)}")
