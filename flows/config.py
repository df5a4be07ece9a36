"""
`PipelineConfig`: the one parameter of `full_pipeline`, rendered by the Prefect UI as a form.

It holds one sub-config per stage (the stage's own pydantic model, so the form shows the same fields,
bounds and help as `python -m nanopipe.stages.<stage> --help`), the data source shared by every stage that
reads text, the resources torchrun gets, and what to recompute.

Partial parameters stay valid: every field has a default, and `preset` lays a named preset under whatever
is given, so `{"preset": "demo-cpu", "tok_train": {"vocab_size": 1024}}` changes one value of the preset.
In the Prefect UI's form the same holds: the fields you leave empty come from the preset (see `form`).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from flows.launcher import Resources
from flows.presets import PRESETS, deep_merge, preset_values
from flows.stages import STAGE_NAMES, Stage
from nanopipe.configs import (BaseEvalConfig, BaseTrainConfig, DataFlags, NanoConfig, TokEvalConfig, TokTrainConfig,
                              build_config)
from nanopipe.configs.chat_eval import ChatEvalConfig
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.configs.chat_sft import ChatSFTConfig
from nanopipe.configs.mid_train import MidTrainConfig

StageName = Literal[tuple(STAGE_NAMES)]  # type: ignore[valid-type]
PresetName = Literal[tuple(PRESETS)]    # type: ignore[valid-type]


# How many shards a stage reads stays per stage (the tokenizer needs a few, pretraining hundreds: as in
# nanochat's `-n 8` then `-n 370`), so growing the pretraining data never retrains the tokenizer.
PER_STAGE_DATA_FIELDS = ("num_shards",)

DataSource = create_model(
    "DataSource", __base__=NanoConfig, __doc__="Where the pretraining text comes from, for every stage that reads text.",
    **{name: (info.annotation, info) for name, info in DataFlags.model_fields.items()
       if name not in PER_STAGE_DATA_FIELDS})


def form(cls: type[BaseModel]):
    """`cls` as a Prefect UI form that submits only the fields someone fills in.

    The UI pre-fills every field that has a default in the JSON schema and then submits all of them, which
    would replace the preset's values with the stage defaults. Without defaults in the schema, untouched
    fields stay out of the submitted parameters and the preset supplies them; the default is shown in the
    field's description instead."""
    schema = cls.model_json_schema()
    for prop in schema.get("properties", {}).values():
        if "default" in prop:
            default = json.dumps(prop.pop("default"))
            prop["description"] = f"{prop.get('description', '')} (default {default}, or the preset's)".strip()
    return Annotated[cls, WithJsonSchema(schema)]


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs. Unset fields take the preset's value, then the stage default."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName | None = Field(None, description="start from this preset; the fields you give override it")
    data: form(DataSource) = Field(default_factory=DataSource, description="data source for every stage that reads text")
    tok_train: form(TokTrainConfig) = Field(default_factory=TokTrainConfig, description="tokenizer training")
    tok_eval: form(TokEvalConfig) = Field(default_factory=TokEvalConfig, description="tokenizer evaluation")
    base_train: form(BaseTrainConfig) = Field(default_factory=BaseTrainConfig, description="base pretraining")
    base_eval: form(BaseEvalConfig) = Field(default_factory=BaseEvalConfig, description="base model evaluation")
    mid_train: form(MidTrainConfig) = Field(default_factory=MidTrainConfig, description="mid-training")
    chat_sft: form(ChatSFTConfig) = Field(default_factory=ChatSFTConfig, description="supervised fine-tuning")
    chat_rl: form(ChatRLConfig) = Field(default_factory=ChatRLConfig, description="reinforcement learning on GSM8K "
                                        "(runs when run_rl is set)")
    chat_eval: form(ChatEvalConfig) = Field(default_factory=ChatEvalConfig, description="chat evaluation, run "
                                            "after mid-training, SFT and RL")
    run_rl: bool = Field(False, description="also run the (optional) reinforcement-learning stage")
    stop_after: StageName | None = Field(None, description="end the run after this stage (none: run them all)")
    recompute_from: StageName | None = Field(
        None, description="recompute this stage and everything after it even when cached artifacts verify")
    cost_per_gpu_hour: float = Field(3.0, ge=0, description="USD per GPU-hour, for the report card's cost estimate")
    resources: form(Resources) = Field(default_factory=Resources, description="torchrun layout, env, timeout, retries")
    stage_resources: dict[StageName, Resources] = Field(
        default_factory=dict, description="per-stage replacements of `resources`, by stage name")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset"):
            return deep_merge(preset_values(data["preset"]), data)
        return data

    def stage_config(self, stage: Stage, wired: dict | None = None) -> NanoConfig:
        """The stage's config with the shared data source, its fixed values and `wired` paths applied."""
        cfg = getattr(self, stage.config_field)
        values = cfg.model_dump()
        data = self.data.model_dump()
        values.update({k: v for k, v in data.items() if k in type(cfg).model_fields})
        values.update(stage.fixed)
        values.update(wired or {})
        return build_config(type(cfg), values)

    def resources_for(self, stage: Stage) -> Resources:
        return self.stage_resources.get(stage.name, self.resources)

    def enabled(self, stage: Stage) -> bool:
        return stage.when is None or bool(getattr(self, stage.when))
