"""Flags shared by the chat training stages (mid_train, chat_sft): optimiser, checkpoints, and where the
chat datasets come from. Pure pydantic, no torch: the flow imports these to plan runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nanopipe.configs.base import CpuMatmulFlags, DownstreamConfig, NanoConfig, Off, ResumeStep
from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.vocab import MIN_VOCAB_SIZE

ChatSource = Literal["base", "mid"]

# The reference's chat data (nanopipe.remote fetches, caches and checks them): the identity conversations its
# speedrun script downloads, and the English word list of its spelling tasks
IDENTITY_CONVERSATIONS_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"


def _base_model(field: str):
    """base_train's default of a model-shape field: what a chat stage plans for without a source checkpoint."""
    return BaseTrainConfig.model_fields[field].default


class PlanningFlags(NanoConfig):
    """Flags of a chat training stage's planning: the model shape --plan_only assumes before the source
    checkpoint exists (the flow's preflight passes the base model's), and the memory check's override."""

    depth: int = Field(_base_model("depth"), ge=1, description="--plan_only, when the source checkpoint does not exist yet: the depth "
                                             "to assume (a real run takes the shape from the checkpoint)")
    aspect_ratio: int = Field(_base_model("aspect_ratio"), ge=1, description="--plan_only, without a source checkpoint: width / depth")
    head_dim: int = Field(_base_model("head_dim"), ge=2, description="--plan_only, without a source checkpoint: channels per head")
    model_seq_len: int = Field(_base_model("max_seq_len"), ge=2, description="--plan_only, without a source checkpoint: the model's "
                                                    "context length (base_train's --max_seq_len)")
    vocab_size: int | None = Field(None, ge=MIN_VOCAB_SIZE, description="--plan_only, without a source checkpoint or "
                                   "tokenizer: the vocabulary to assume (none: tok_train's default)")
    allow_over_memory: bool = Field(False, description="train even when the peak-memory estimate exceeds the "
                                                       "device's available memory (the estimate is rough)")

    NON_SEMANTIC = ("depth", "aspect_ratio", "head_dim", "model_seq_len", "vocab_size", "allow_over_memory")


class ChatDataFlags(DownstreamConfig):
    """Where the chat mixtures come from. Every real dataset loads from the Hugging Face hub through
    `datasets` unless a local copy is given (a file, or a directory in the hub's layout)."""

    mixture: Literal["seed", "builtin"] = Field(
        "seed", description="training mixture: 'seed' (nanochat's, real datasets from the hub or local paths) or "
                            "'builtin' (offline generated chats for demo/CI; plus GSM8K when --gsm8k_path is given)")
    identity_path: str | None = Field(
        None, description="JSONL of identity conversations, a file or an http(s) URL downloaded once into "
                           "NANOPIPE_HOME (none: nanopipe's builtin offline identity set)")
    smoltalk_path: str | None = Field(None, description="local SmolTalk data, file or directory (none: the hub)")
    mmlu_path: str | None = Field(None, description="local MMLU 'all' data with auxiliary_train and test splits "
                                                    "(none: the hub)")
    gsm8k_path: str | None = Field(None, description="local GSM8K data, file or directory (none: the hub)")
    arc_easy_path: str | None = Field(None, description="local ARC-Easy data, file or directory (none: the hub)")
    arc_challenge_path: str | None = Field(None, description="local ARC-Challenge data (none: the hub)")
    spelling_words: str = Field(
        "builtin", description="word list of the spelling tasks: 'builtin' (offline), 'download' (the public "
                               "370K-word English list, cached under NANOPIPE_HOME/words), an http(s) URL or a file")
    builtin_size: int = Field(1000, ge=1, description="examples per builtin task in --mixture=builtin "
                                                      "(identity counts twice)")
    builtin_hard_share: float = Field(  # the default: nanopipe.tasks.word_problems.HARD_SHARE
        0.5, ge=0, le=1, description="share of the harder word problems (three or four calculator steps, "
                                     "distracting sentences) in --mixture=builtin's Arithmetic")
    builtin_restate_counts: bool = Field(
        False, description="--mixture=builtin's workshop problems: the answer opens by restating the count of "
                           "machines (for small models, which otherwise guess it)")

    NON_SEMANTIC = ("run", "out_dir")


class ChatOptimFlags(NanoConfig):
    """The learning rates of every chat stage that trains (mid_train, chat_sft, chat_rl): nanochat's, which each
    stage's --init_lr_frac scales."""

    embedding_lr: float = Field(0.2, gt=0, description="AdamW learning rate of the token embedding")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW learning rate of the LM head")
    matrix_lr: float = Field(0.02, gt=0, description="Muon learning rate of the Transformer matrices")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (embedding and LM head)")


class ChatTrainFlags(ChatOptimFlags, CpuMatmulFlags, ChatDataFlags, PlanningFlags):
    """Optimiser, checkpoint and path flags of a chat training stage."""

    save_every: Off[int] = Field(None, ge=1, description="checkpoint every N steps (-1/none: only at the end)")
    resume_from_step: ResumeStep = Field(
        None, description="resume from this checkpoint step in --out_dir, or 'latest' (starts fresh if none)")
    tokenizer_dir: str | None = Field(
        None, description="tokenizer directory (default: the one the source checkpoint records)")
    out_dir: str | None = Field(None, description="where checkpoints and metrics.json go "
                                                  "(default: NANOPIPE_HOME/<stage dir>/<source model tag>)")
    plan_only: bool = Field(False, description="print parameters, steps, tokens and a memory estimate, then exit "
                                               "(the flow's preflight)")
    dry_run: bool = Field(False, description="train and evaluate, but write no checkpoint and no metrics.json "
                                             "(nanochat's --dry_run)")

    NON_SEMANTIC = ("save_every", "resume_from_step", "plan_only", "dry_run")
