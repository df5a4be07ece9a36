"""
`PipelineConfig`: the one parameter of `full_pipeline`, rendered by the Prefect UI as the Custom run form.

It holds one sub-config per stage (the stage's own pydantic model: the same fields, bounds and help as
`python -m nanopipe.stages.<stage> --help`), two sections every stage shares, the resources torchrun gets,
and what to run and recompute:

    preset          a named starting point (flows/presets.py); the values you give override it
    data            where the pretraining text comes from, for every stage that reads text
    common          device_type, dtype, seed and the wandb run name, for every stage
    <stage>         that stage's own settings (tok_train, base_train, ..., chat_eval)
    resources       torchrun's layout, env, timeout and retries (stage_resources: per stage)

Partial parameters stay valid: every field has a default and `preset` lays a named preset under whatever
is given, so `{"preset": "demo-cpu", "tok_train": {"vocab_size": 1024}}` changes one value of the preset.

Shared sections and a stage's own fields: a stage takes each of its fields that `data` or `common` also
holds from there, unless its own value differs from the stage default. So `{"common": {"seed": 7}}` seeds
every stage with 7, and `{"common": {"device_type": "cuda"}, "tok_train": {"device_type": "cpu"}}` trains the
tokenizer on the CPU and everything else on CUDA.

The form (`form_schema`): the preset picker with a line per preset, the handful of fields people change,
one section per stage titled by its key, the shared fields once. No field carries a default, so the form
submits only what someone fills in and the preset supplies the rest. Every other stage field is still
accepted as JSON (the `config` field's menu: "Use JSON input" in V1, "Use JSON Input" in V2), e.g.
`{"base_train": {"matrix_lr": 0.03}}`, and validated by the stage's model when the run starts. In JSON, a config is what differs from its preset (`model_dump(mode="json")`), which
is what the UI shows as a run's parameters and as the flow's default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializationInfo, create_model, field_validator,
                      model_serializer, model_validator)

from flows.launcher import Resources
from flows.presets import PRESET_DESCRIPTIONS, PRESETS, deep_merge, preset_key_values, preset_line, preset_values
from flows.stages import STAGE_NAMES, STAGES, Stage
from nanopipe.configs import (BaseEvalConfig, BaseTrainConfig, CommonConfig, DataFlags, NanoConfig, TokEvalConfig,
                              TokTrainConfig, build_config)
from nanopipe.configs.base import is_none_text, is_off_field, world_size_checked_later
from nanopipe.configs.chat_eval import ChatEvalConfig
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.configs.chat_sft import ChatSFTConfig
from nanopipe.configs.mid_train import MidTrainConfig

StageName = Literal[tuple(STAGE_NAMES)]  # type: ignore[valid-type]
PresetName = Literal[tuple(PRESETS)]    # type: ignore[valid-type]


def _none_choice(value: Any) -> Any:
    """The form's "none" choice (and the CLI's `--stop_after=none`) means None."""
    return None if is_none_text(value) else value


OptionalStage = Annotated[StageName | None, BeforeValidator(_none_choice)]
OptionalPreset = Annotated[PresetName | None, BeforeValidator(_none_choice)]

# How many shards a stage reads stays per stage (the tokenizer needs a few, pretraining hundreds: as in
# nanochat's `-n 8` then `-n 370`), so growing the pretraining data never retrains the tokenizer.
PER_STAGE_DATA_FIELDS = ("num_shards",)

DataSource = create_model(
    "DataSource", __base__=NanoConfig, __doc__="Where the pretraining text comes from, for every stage that reads text.",
    **{name: (info.annotation, info) for name, info in DataFlags.model_fields.items()
       if name not in PER_STAGE_DATA_FIELDS})

Common = create_model(
    "Common", __base__=NanoConfig, __doc__="Device, dtype, seed and wandb run name of every stage.",
    **{name: (info.annotation, info) for name, info in CommonConfig.model_fields.items()})

SHARED_SECTIONS = ("data", "common")


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs. Unset fields take the preset's value, then the stage default."""

    model_config = ConfigDict(extra="forbid")

    preset: OptionalPreset = Field(None, description="start from this preset; the fields you give override it")
    run_rl: bool = Field(False, description="also run the (optional) reinforcement-learning stage")
    stop_after: OptionalStage = Field(None, description="end the run after this stage (none: run them all)")
    recompute_from: OptionalStage = Field(
        None, description="recompute this stage and everything after it even when cached artifacts verify")
    data: DataSource = Field(default_factory=DataSource, description="data source for every stage that reads text")
    common: Common = Field(default_factory=Common, description="device, dtype, seed and run name for every stage")
    tok_train: TokTrainConfig = Field(default_factory=TokTrainConfig, description="tokenizer training")
    tok_eval: TokEvalConfig = Field(default_factory=TokEvalConfig, description="tokenizer evaluation")
    base_train: BaseTrainConfig = Field(default_factory=BaseTrainConfig, description="base pretraining")
    base_eval: BaseEvalConfig = Field(default_factory=BaseEvalConfig, description="base model evaluation")
    mid_train: MidTrainConfig = Field(default_factory=MidTrainConfig, description="mid-training")
    chat_sft: ChatSFTConfig = Field(default_factory=ChatSFTConfig, description="supervised fine-tuning")
    chat_rl: ChatRLConfig = Field(default_factory=ChatRLConfig, description="reinforcement learning on GSM8K "
                                  "(runs when run_rl is set)")
    chat_eval: ChatEvalConfig = Field(default_factory=ChatEvalConfig, description="chat evaluation, run after "
                                      "mid-training, SFT and RL")
    resources: Resources = Field(default_factory=Resources, description="torchrun layout, env, timeout, retries")
    stage_resources: dict[StageName, Resources] = Field(
        default_factory=dict, description="per-stage replacements of `resources`, by stage name")
    cost_per_gpu_hour: float = Field(3.0, ge=0, description="USD per GPU-hour, for the report card's cost estimate")
    artifact_store: str | None = Field(
        None, description="fsspec URL that keeps artifacts and checkpoints beyond this node (s3://bucket/prefix, "
        "file:///shared/path; credentials from the worker's AWS_* environment); none: $NANOPIPE_ARTIFACT_STORE, "
        "else this node's disk only")

    @field_validator("artifact_store")
    @classmethod
    def _known_store(cls, url: str | None) -> str | None:
        """An unknown protocol (a typo, or s3:// without s3fs installed) fails at once, not after training."""
        if url:
            import fsspec
            try:
                fsspec.get_filesystem_class(fsspec.utils.get_protocol(url))
            except (ValueError, ImportError) as err:
                raise ValueError(f"artifact_store {url!r}: {err}") from None
        return url or None

    def store_url(self) -> str | None:
        """Where artifacts are kept beyond this node: artifact_store, else $NANOPIPE_ARTIFACT_STORE, else None."""
        import os
        return self.artifact_store or os.environ.get("NANOPIPE_ARTIFACT_STORE") or None

    @model_validator(mode="wrap")
    @classmethod
    def _batches_for_the_real_world_size(cls, data, handler):
        """A stage's batch arithmetic is checked by the planner (flows/plan.py check_config) for the world size
        its resources give, with advice for that size; the stage models' own check for one process would
        advise values that fail again on two."""
        with world_size_checked_later():
            return handler(data)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and _none_choice(data.get("preset")):
            return deep_merge(preset_values(data["preset"]), data)
        return data

    @model_serializer(mode="wrap")
    def _json_is_what_differs(self, handler, info: SerializationInfo):
        """In JSON, the preset and what differs from it: validates back to an equal config, and is what the
        Prefect UI shows (a run's parameters, the flow's default). `context={"full": True}` dumps everything."""
        full = handler(self)
        if info.mode != "json" or (info.context or {}).get("full") or info.exclude_defaults or info.exclude_unset:
            return full
        baseline = type(self)(preset=self.preset).model_dump(mode="json", context={"full": True})
        return ({"preset": self.preset} if self.preset else {}) | _differences(full, baseline)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        return form_schema()

    def stage_config(self, stage: Stage, wired: dict | None = None) -> NanoConfig:
        """The stage's config with the shared sections, its fixed values and `wired` paths applied."""
        cfg = getattr(self, stage.config_field)
        values = cfg.model_dump()
        values.update(shared_values(self, type(cfg), values))
        values.update(stage.fixed)
        values.update(wired or {})
        return build_config(type(cfg), values)

    def resources_for(self, stage: Stage) -> Resources:
        return self.stage_resources.get(stage.name, self.resources)

    def enabled(self, stage: Stage) -> bool:
        return stage.when is None or bool(getattr(self, stage.when))

    def planned_stages(self) -> list[Stage]:
        """The stages this config runs, in order (enabled ones, up to stop_after)."""
        stages = []
        for stage in STAGES:
            if self.enabled(stage):
                stages.append(stage)
            if stage.name == self.stop_after:
                break
        return stages


def shared_values(config: PipelineConfig, cls: type[NanoConfig], values: dict[str, Any]) -> dict[str, Any]:
    """The values of `data` and `common` that a stage of class `cls` takes: every shared field the stage has,
    except where the stage's own value (in `values`) differs from the stage default."""
    taken = {}
    for section in SHARED_SECTIONS:
        for name, value in getattr(config, section).model_dump().items():
            field = cls.model_fields.get(name)
            if field is not None and values[name] == field.get_default(call_default_factory=True):
                taken[name] = value
    return taken


def _differences(value: Any, baseline: Any) -> Any:
    """The parts of a JSON value that differ from `baseline`, recursing into objects present in both."""
    if not (isinstance(value, dict) and isinstance(baseline, dict)):
        return value
    return {k: _differences(v, baseline[k]) if k in baseline else v
            for k, v in value.items() if k not in baseline or v != baseline[k]}


# -----------------------------------------------------------------------------
# The Custom run form: the JSON schema Prefect renders for the `config` parameter

# The fields each section shows in the form (the handful people change; JSON input takes every field of the
# section's model), and those shown without their description (the name says it): the form stays short.
FORM_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("data_source", "data_dir"),
    "common": ("device_type", "seed"),
    "tok_train": ("vocab_size",),
    "base_train": ("depth", "num_iterations", "device_batch_size", "total_batch_size"),
    "mid_train": ("num_iterations", "device_batch_size"),
    "chat_sft": ("num_iterations", "device_batch_size"),
    "chat_rl": ("num_iterations", "device_batch_size"),
    "resources": ("nproc_per_node", "nnodes"),
}
FORM_BARE_FIELDS = ("data_dir", "seed", "depth", "nnodes")
# JSON input only: tok_eval, base_eval, chat_eval, stage_resources, cost_per_gpu_hour and the other stage fields


def _choice(name: str, choices: list[str], description: str) -> dict[str, Any]:
    """An optional choice as a plain select, with "none" as the way back to no value."""
    return {"title": name, "type": "string", "enum": [*choices, "none"], "description": description}


def _form_field(cls: type[BaseModel], name: str, prop: dict[str, Any]) -> dict[str, Any]:
    """One field of a section: no default (the preset's value stays), optional shown as its plain type
    (an empty input is no value; the server takes JSON null too), titled by its key."""
    prop = {k: v for k, v in prop.items() if k not in ("default", "title")}
    members = [m for m in prop.pop("anyOf", []) if m.get("type") != "null"]
    if len(members) == 1:
        prop = {**members[0], **prop}
    if is_off_field(cls.model_fields[name]):   # -1 means off: the lower bound belongs to the other values
        for bound in ("minimum", "exclusiveMinimum"):
            prop.pop(bound, None)
    if name in FORM_BARE_FIELDS:
        prop.pop("description", None)
    return {"title": name, **prop}


def _section(name: str, cls: type[BaseModel], description: str) -> dict[str, Any]:
    props = cls.model_json_schema()["properties"]
    fields = {f: _form_field(cls, f, props[f]) for f in FORM_FIELDS[name]}
    others = "" if name in SHARED_SECTIONS else "; every other field: in JSON"
    return {"title": name, "type": "object", "description": description + others, "properties": fields,
            "additionalProperties": True}


def form_schema() -> dict[str, Any]:
    """The JSON schema of the `config` parameter as the Prefect UI renders it (see the module docstring)."""
    fields = PipelineConfig.model_fields
    # one list item per preset: V1 renders markdown and joins lines not separated by a blank one, V2 shows plain
    # text (one paragraph): so blank-line-separated items, with no <, ` or * markup
    presets = "\n\n".join(f"- {preset_line(name)}" for name in PRESETS)
    properties: dict[str, Any] = {
        "preset": _choice("preset", list(PRESETS), f"start from this preset; the fields you fill in override it "
                                                   f"(none: the stage defaults).\n\n{presets}"),
        "run_rl": {"title": "run_rl", "type": "boolean", "description": fields["run_rl"].description},
        "stop_after": _choice("stop_after", STAGE_NAMES, fields["stop_after"].description),
        "recompute_from": _choice("recompute_from", STAGE_NAMES, fields["recompute_from"].description),
    }
    for name in FORM_FIELDS:
        description = fields[name].description
        if name in SHARED_SECTIONS:
            description += " (a stage's own non-default value wins)"
        properties[name] = _section(name, fields[name].annotation, description)
    hidden = [f for f in fields if f not in properties]
    description = (f"{PipelineConfig.__doc__} Empty fields stay out of the run's parameters. In JSON (the "
                   f"config field's menu: Use JSON input): {', '.join(hidden)} and every field of a stage "
                   f"(python -m nanopipe.stages.STAGE --help).")
    return {"title": "PipelineConfig", "type": "object", "description": description, "properties": properties,
            "additionalProperties": True}


# -----------------------------------------------------------------------------
# The config after the preset, for people: what this run will do

def resolved_config_markdown(config: PipelineConfig) -> str:
    """Markdown of the config after the preset: what the preset is for and its key values (as the form's picker
    shows them), the stages that run, and per section the key fields (the form's) and every value that differs
    from the stage default, with where it came from."""
    baseline = PipelineConfig(preset=config.preset)
    title = f"preset `{config.preset}`" if config.preset else "no preset (stage defaults)"
    lines = [f"### Resolved config: {title}", ""]
    if config.preset:
        lines += [f"{PRESET_DESCRIPTIONS[config.preset]}.", "",
                  f"The preset's key values (before this run's overrides): {preset_key_values(config.preset)}.", ""]
    stages = ", ".join(s.name for s in config.planned_stages())
    lines += [f"Stages: {stages} (run_rl={str(config.run_rl).lower()}, stop_after={config.stop_after or 'none'}, "
              f"recompute_from={config.recompute_from or 'none'})",
              f"World size: {config.resources.nproc_per_node} x {config.resources.nnodes} node(s) = "
              f"{config.resources.nproc_per_node * config.resources.nnodes} processes", "",
              "| section | field | value | stage default | from |", "|---|---|---|---|---|"]
    running = {s.config_field for s in config.planned_stages()}
    sections = [*SHARED_SECTIONS, *(f for f in PipelineConfig.model_fields if f in running), "resources"]
    for section in sections:
        model, base = getattr(config, section), getattr(baseline, section)
        for name, field in type(model).model_fields.items():
            value, default = getattr(model, name), field.get_default(call_default_factory=True)
            if name not in FORM_FIELDS.get(section, ()) and value == default:
                continue
            if section not in SHARED_SECTIONS and name in _shared_names() and value == default:
                continue   # shown once, under data/common
            origin = "this run" if value != getattr(base, name) else ("preset" if value != default else "default")
            lines.append(f"| {section} | {name} | {_cell(value)} | {_cell(default)} | {origin} |")
    for name, resources in config.stage_resources.items():
        lines.append(f"| stage_resources | {name} | {_cell(resources.model_dump(exclude_defaults=True))} | "
                     f"resources | this run |")
    return "\n".join(lines)


def _shared_names() -> set[str]:
    return {name for section in SHARED_SECTIONS for name in PipelineConfig.model_fields[section].annotation.model_fields}


def _cell(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "(empty)"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(empty)"
    text = str(value)
    return "(empty)" if text == "" else text.replace("|", "\\|")
