"""
Every stage's config model, importable without torch: the flow process plans with these alone.

    nanopipe.configs.base        NanoConfig, CommonConfig, DownstreamConfig, ConfigError, Off, digests
    nanopipe.configs.data        DataFlags (where the pretraining text comes from)
    nanopipe.configs.<stage>     that stage's config (tok_train, tok_eval, base_train, base_eval, mid_train,
                                 chat_sft, chat_rl, chat_eval, chat_cli)
    nanopipe.configs.flags       the command line derived from the models

`config_class("base_train")` imports one stage's module and returns its config class; `STAGE_CONFIGS` maps
every stage whose config module exists to its class.
"""

from __future__ import annotations

import importlib
import importlib.util

from nanopipe.configs.base import (CommonConfig, ConfigError, DownstreamConfig, NanoConfig, Off, build_config,
                                   config_digest, non_semantic_fields)
from nanopipe.configs.base_eval import BaseEvalConfig
from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.configs.chat_cli import ChatCliConfig
from nanopipe.configs.chat_eval import ChatEvalConfig
from nanopipe.configs.data import DataFlags
from nanopipe.configs.tok_eval import TokEvalConfig
from nanopipe.configs.tok_train import TokTrainConfig

STAGE_NAMES = ("tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_sft", "chat_rl", "chat_eval",
               "chat_cli")


def config_class(stage: str) -> type[NanoConfig]:
    """The config class of a stage: the one NanoConfig subclass defined in nanopipe.configs.<stage>."""
    if stage not in STAGE_NAMES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_NAMES)}")
    module = importlib.import_module(f"nanopipe.configs.{stage}")
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, NanoConfig) and v.__module__ == module.__name__]
    assert len(classes) == 1, f"nanopipe.configs.{stage} defines {len(classes)} config classes: {classes}"
    return classes[0]


# stages whose config module is there (the later chat stages join as their modules are written)
STAGE_CONFIGS: dict[str, type[NanoConfig]] = {
    name: config_class(name) for name in STAGE_NAMES if importlib.util.find_spec(f"nanopipe.configs.{name}")}

__all__ = ["BaseEvalConfig", "BaseTrainConfig", "ChatCliConfig", "ChatEvalConfig", "CommonConfig", "ConfigError",
           "DataFlags", "DownstreamConfig", "NanoConfig", "Off", "STAGE_CONFIGS", "STAGE_NAMES", "TokEvalConfig",
           "TokTrainConfig", "build_config", "config_class", "config_digest", "non_semantic_fields"]
