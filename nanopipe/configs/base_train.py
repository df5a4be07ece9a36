"""Flags of base pretraining (`python -m nanopipe.stages.base_train`), and the batch-size arithmetic they must
satisfy (pure arithmetic: the flow checks it before launching anything)."""

from __future__ import annotations

from pydantic import Field, model_validator

from nanopipe.configs.base import (EVAL_TOKENS, REFERENCE_BATCH_TOKENS, CommonConfig, CompileFlag, ConfigError,
                                   CpuMatmulFlags, Off, PlainName, ResumeStep, check_for_one_process)
from nanopipe.configs.data import DataFlags
from nanopipe.vocab import MIN_VOCAB_SIZE


class BaseTrainConfig(CompileFlag, CpuMatmulFlags, CommonConfig, DataFlags):
    """Flags of base pretraining (defaults: nanochat's speedrun d20)."""

    # --- model --------------------------------------------------------------
    depth: int = Field(20, ge=1, le=1024, description="number of Transformer layers; sets the whole model size")
    aspect_ratio: int = Field(64, ge=1, description="model width = depth * aspect_ratio, rounded up to head_dim")
    head_dim: int = Field(128, ge=2, description="channels per attention head (even, for rotary embeddings)")
    max_seq_len: int = Field(2048, ge=2, description="context length in tokens")
    # --- training horizon: the first one set is used; setting two of them is an error --------------
    num_iterations: Off[int] = Field(None, ge=1, description="optimizer steps (-1/none: derive from the next two)")
    target_flops: Off[float] = Field(None, gt=0, description="train for this many FLOPs (-1/none: disabled)")
    target_param_data_ratio: Off[float] = Field(
        20, gt=0, description="train for ratio * parameters tokens (Chinchilla: 20; -1/none: disabled; used "
                              "only without the two above)")
    # --- optimisation -------------------------------------------------------
    device_batch_size: int = Field(32, ge=1, description="sequences per device per micro-step (lower it on OOM)")
    total_batch_size: int = Field(REFERENCE_BATCH_TOKENS, ge=1,
                                  description="tokens per optimizer step, all ranks and micro-steps")
    embedding_lr: float = Field(0.3, gt=0, description="AdamW learning rate of the token embedding")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW learning rate of the LM head")
    matrix_lr: float = Field(0.02, gt=0, description="Muon learning rate of the Transformer matrices")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (embedding and LM head)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="fraction of the steps with linear LR warm-up")
    warmdown_ratio: float = Field(0.4, ge=0, le=1, description="fraction of the steps with linear LR decay at the end")
    final_lr_frac: float = Field(0.0, ge=0, le=1, description="LR at the end of the decay, as a fraction of the peak")
    # --- evaluation and checkpoints (none of these change the trained weights) --------------------
    eval_every: Off[int] = Field(250, ge=1, description="val bits-per-byte every N steps and at the end (-1: only at the end)")
    eval_tokens: int = Field(EVAL_TOKENS, ge=1, description="validation tokens per val bpb evaluation")
    core_metric_every: Off[int] = Field(2000, ge=1, description="CORE metric every N steps and at the end (-1: never)")
    core_metric_max_per_task: Off[int] = Field(500, ge=1, description="examples per CORE task (-1: all)")
    sample_every: Off[int] = Field(2000, ge=1, description="print samples every N steps and at the end (-1: never)")
    save_every: Off[int] = Field(None, ge=1, description="checkpoint every N steps (-1/none: only at the end)")
    resume_from_step: ResumeStep = Field(
        None, description="resume from this checkpoint step, or 'latest' (starts fresh if there is none)")
    # --- paths --------------------------------------------------------------
    model_tag: PlainName = Field(None, description="checkpoint directory name (default: d<depth>)")
    tokenizer_dir: str | None = Field(None, description="tokenizer directory (default: NANOPIPE_HOME/tokenizer)")
    out_dir: str | None = Field(
        None, description="where checkpoints and metrics.json go (default: NANOPIPE_HOME/base_checkpoints/<model_tag>)")
    checkpoint_dir: str | None = Field(None, description="checkpoint directory, if not out_dir")
    eval_bundle_dir: str | None = Field(None, description="CORE eval bundle (default: NANOPIPE_HOME/eval_bundle)")
    plan_only: bool = Field(False, description="print the model shape, FLOPs, steps and memory estimate, then exit")
    vocab_size: int | None = Field(
        None, ge=MIN_VOCAB_SIZE, description="--plan_only, before the tokenizer exists: the vocabulary to plan "
                                             "for (none: tok_train's default; a real run reads the tokenizer's)")
    allow_over_memory: bool = Field(False, description="train even when the peak-memory estimate exceeds the "
                                                       "device's available memory (the estimate is rough)")

    NON_SEMANTIC = tuple(dict.fromkeys(
        CommonConfig.NON_SEMANTIC + getattr(DataFlags, "NON_SEMANTIC", ()) + (
            "eval_every", "eval_tokens", "core_metric_every", "core_metric_max_per_task", "sample_every",
            "save_every", "resume_from_step", "model_tag", "checkpoint_dir", "eval_bundle_dir", "plan_only",
            "allow_over_memory", "vocab_size")))

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_iterations is None and self.target_flops is None and self.target_param_data_ratio is None:
            raise ValueError("no training horizon: set --num_iterations, --target_flops or --target_param_data_ratio")
        self._one_horizon()
        if self.head_dim % 2:
            raise ValueError(f"--head_dim={self.head_dim} must be even (rotary embeddings rotate channel pairs)")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise ValueError(f"--warmup_ratio ({self.warmup_ratio}) + --warmdown_ratio ({self.warmdown_ratio}) > 1")
        if check_for_one_process():
            check_batch_sizes(self, world_size=1)
        return self

    def _one_horizon(self) -> None:
        """Two horizons would silently ignore one. target_param_data_ratio always has a value (its default, also
        what a config copied field by field carries): only a ratio other than the default counts as set."""
        given = [f"--num_iterations={self.num_iterations}"] if self.num_iterations is not None else []
        if self.target_flops is not None:
            given.append(f"--target_flops={self.target_flops:g}")
        default_ratio = type(self).model_fields["target_param_data_ratio"].default
        if (self.target_param_data_ratio is not None and self.target_param_data_ratio != default_ratio
                and "target_param_data_ratio" in self.model_fields_set):
            given.append(f"--target_param_data_ratio={self.target_param_data_ratio:g}")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are two training horizons and only one would be used: give "
                             f"one of them (set the others to -1)")


def check_batch_sizes(cfg: BaseTrainConfig, world_size: int) -> int:
    """Gradient accumulation steps; a ConfigError suggesting valid values if the sizes do not divide."""
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro:
        lower = cfg.total_batch_size // tokens_per_micro * tokens_per_micro
        totals = [v for v in (lower, lower + tokens_per_micro) if v > 0]
        rows = cfg.total_batch_size // (cfg.max_seq_len * world_size) if cfg.total_batch_size % (
            cfg.max_seq_len * world_size) == 0 else 0
        batches = [b for b in range(1, min(rows, 4 * cfg.device_batch_size) + 1) if rows % b == 0][-4:] if rows else []
        hint = f"--total_batch_size={' or '.join(map(str, totals))}"
        if batches:
            hint += f", or --device_batch_size={' or '.join(map(str, batches))}"
        raise ConfigError(
            f"--total_batch_size={cfg.total_batch_size} is not a multiple of --device_batch_size "
            f"({cfg.device_batch_size}) x --max_seq_len ({cfg.max_seq_len}) x world size ({world_size}) = "
            f"{tokens_per_micro} tokens per micro-step; try {hint}")
    eval_micro = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.eval_tokens < eval_micro:
        raise ConfigError(f"--eval_tokens={cfg.eval_tokens} is less than one evaluation batch "
                          f"(device_batch_size x max_seq_len x world size = {eval_micro}); raise it")
    return cfg.total_batch_size // tokens_per_micro
