"""
Every stage's config model, importable without torch: the flow process plans with these alone.

    nanopipe.configs.base        NanoConfig, CommonConfig, DownstreamConfig, ConfigError, Off, digests
    nanopipe.configs.data        DataFlags (where the pretraining text comes from)
    nanopipe.configs.<stage>     that stage's config (tok_train, tok_eval, base_train, base_eval, mid_train,
                                 chat_sft, chat_rl, chat_eval, chat_cli)
    nanopipe.configs.flags       the command line derived from the models

`CONFIG_MODULES` names the config modules, one per stage module of nanopipe/stages (chat_eval's one module
serves the pipeline's three chat evaluations, flows/stages.py). `config_class("base_train")` imports one
config module and returns its config class; `CONFIG_CLASSES` maps every config module that exists to its
class.
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

CONFIG_MODULES = ("tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_sft", "chat_rl",
                  "chat_eval", "chat_cli")


def config_class(name: str) -> type[NanoConfig]:
    """The config class of a config module: the one NanoConfig subclass defined in nanopipe.configs.<name>."""
    if name not in CONFIG_MODULES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(CONFIG_MODULES)}")
    module = importlib.import_module(f"nanopipe.configs.{name}")
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, NanoConfig) and v.__module__ == module.__name__]
    assert len(classes) == 1, f"nanopipe.configs.{name} defines {len(classes)} config classes: {classes}"
    return classes[0]


CONFIG_CLASSES: dict[str, type[NanoConfig]] = {
    name: config_class(name) for name in CONFIG_MODULES if importlib.util.find_spec(f"nanopipe.configs.{name}")}

__all__ = ["BaseEvalConfig", "BaseTrainConfig", "ChatCliConfig", "ChatEvalConfig", "CommonConfig", "ConfigError",
           "CONFIG_CLASSES", "CONFIG_MODULES", "DataFlags", "DownstreamConfig", "NanoConfig", "Off", "TokEvalConfig",
           "TokTrainConfig", "build_config", "config_class", "config_digest", "non_semantic_fields"]
