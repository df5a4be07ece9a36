"""The pipeline's parameter as people meet it: the Custom run form's schema, the config's JSON, the shared
sections, the resolved config, the checks the flow makes before launching anything, what the preflight plans
for, and the deployments' schedules. No server: the schema is the one `prefect deploy` sends."""

import json
import re
from pathlib import Path

import pytest
import yaml

from flows.config import FORM_FIELDS, SHARED_SECTIONS, PipelineConfig, resolved_config_markdown
from flows.plan import PlanError, dry_run_command, model_shape, plan_pipeline
from flows.presets import (PRESET_DESCRIPTIONS, PRESETS, PRESET_TIMES, model_params, preset_key_values,
                           preset_line)
from flows.stages import STAGE_NAMES, get_stage
from nanopipe.configs import BaseTrainConfig
from nanopipe.configs.chat_sft import ChatSFTConfig
from nanopipe.configs.flags import parse_flags

REPO = Path(__file__).resolve().parents[1]


def deployment_schema() -> dict:
    """The parameter schema of full_pipeline exactly as `prefect deploy` computes it."""
    from prefect.utilities.callables import parameter_schema
    from flows.pipeline import full_pipeline
    return parameter_schema(full_pipeline.fn).model_dump()


def walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# -----------------------------------------------------------------------------
# The form

def test_the_form_is_short_titled_by_stage_keys_with_no_defaults_and_no_type_toggles():
    schema = deployment_schema()
    assert schema["properties"]["config"]["default"] == {}   # the Parameters tab claims no stage values
    form = schema["definitions"]["PipelineConfig"]
    props = form["properties"]
    assert list(props)[:4] == ["preset", "run_rl", "stop_after", "recompute_from"]
    assert props["preset"]["enum"] == [*PRESETS, "none"]
    items = props["preset"]["description"].split("\n\n")[1:]   # V1's markdown joins lines with no blank between
    assert items == [f"- {preset_line(name)}" for name in PRESETS]
    # V1 renders descriptions as markdown (a <tag> vanishes), V2 as plain text (markup shows): neither in the form
    for node in walk(form):
        assert not re.search(r"<[A-Za-z/]|`|\*\S|\S\*", node.get("description", "")), node["description"]
    nodes = list(walk(form))
    assert not [n for n in nodes if "anyOf" in n or "oneOf" in n or isinstance(n.get("type"), list)]
    assert not [n for n in nodes if "default" in n]          # untouched fields stay out of what is submitted
    shared = {f for s in SHARED_SECTIONS for f in PipelineConfig.model_fields[s].annotation.model_fields}
    for section, fields in FORM_FIELDS.items():
        assert props[section]["title"] == section and list(props[section]["properties"]) == list(fields)
        assert props[section]["additionalProperties"] is True   # JSON input takes any field of the section
        if section not in SHARED_SECTIONS:
            assert not shared & set(fields), section             # device, seed, data: once, in data/common
    assert sum(len(f) for f in FORM_FIELDS.values()) + 4 <= 25


def test_what_the_form_and_the_json_tab_submit_passes_the_servers_check_and_validates():
    from prefect.utilities.schema_tools.validation import ValidationError, validate
    schema = deployment_schema()
    submitted = {"preset": "demo-cpu", "stop_after": "none", "base_train": {"num_iterations": 7, "matrix_lr": 0.03},
                 "tok_eval": {"val_chars": 5000}, "common": {"seed": 7},
                 "stage_resources": {"base_train": {"nproc_per_node": 1}}}
    validate({"config": submitted}, schema, raise_on_error=True)
    config = PipelineConfig.model_validate(submitted)
    expected = PipelineConfig(preset="demo-cpu")
    assert config.base_train.num_iterations == 7 and config.base_train.matrix_lr == 0.03
    assert config.base_train.depth == expected.base_train.depth and config.stop_after is None
    assert config.tok_eval.val_chars == 5000 and config.stage_resources["base_train"].nproc_per_node == 1
    for bad in ({"preset": "nope"}, {"stop_after": "base"}, {"base_train": {"depth": "deep"}}):
        with pytest.raises(ValidationError):
            validate({"config": bad}, schema, raise_on_error=True)


# -----------------------------------------------------------------------------
# The config in JSON: the preset and what differs from it

@pytest.mark.parametrize("values", [
    {}, {"preset": "demo-cpu"}, {"preset": "d12", "base_train": {"depth": 20}},   # a stage default over a preset
    {"preset": "demo-cpu", "tok_train": {"vocab_size": 512}, "resources": {"env": {"NCCL_DEBUG": "INFO"}},
     "stage_resources": {"base_train": {"nproc_per_node": 1}}, "run_rl": True, "recompute_from": "base_train"},
    {"base_train": {"num_iterations": 5, "target_param_data_ratio": -1}, "common": {"device_type": "cpu"}},
])
def test_the_json_form_of_a_config_is_what_differs_from_its_preset_and_validates_back(values):
    config = PipelineConfig.model_validate(values)
    dumped = config.model_dump(mode="json")
    assert PipelineConfig.model_validate(dumped) == config
    assert PipelineConfig.model_validate(json.loads(config.model_dump_json())) == config
    full = config.model_dump(mode="json", context={"full": True})
    assert len(json.dumps(dumped)) < len(json.dumps(full)) and "tok_eval" in full


def test_json_of_untouched_configs_is_just_the_preset():
    assert PipelineConfig().model_dump(mode="json") == {}
    assert PipelineConfig(preset="demo-cpu").model_dump(mode="json") == {"preset": "demo-cpu"}
    changed = PipelineConfig(preset="d12").model_copy(update={"stop_after": "base_eval"})
    assert changed.model_dump(mode="json") == {"preset": "d12", "stop_after": "base_eval"}
    assert PipelineConfig(preset="demo-cpu").model_dump()["base_train"]["depth"] == 4   # python mode: everything


def test_none_is_a_choice_in_the_form_and_on_the_command_line():
    assert PipelineConfig(preset="none", stop_after="none", recompute_from="none") == PipelineConfig()
    values = parse_flags(PipelineConfig, ["--stop_after=none", "--preset", "demo-cpu"], prog="t")
    assert PipelineConfig.model_validate(values).stop_after is None


# -----------------------------------------------------------------------------
# Shared sections: data and common

def test_shared_sections_apply_to_every_stage_unless_the_stage_sets_its_own_value():
    config = PipelineConfig(preset="demo-cpu", common={"device_type": "cuda", "seed": 7},
                            data={"data_source": "hf"}, tok_train={"device_type": "cpu"})
    resolved = {s.name: config.stage_config(s) for s in config.planned_stages()}
    assert resolved["tok_train"].device_type == "cpu"             # its own non-default value wins
    assert {n: c.device_type for n, c in resolved.items() if n != "tok_train"} == \
        {n: "cuda" for n in resolved if n != "tok_train"}
    assert {c.seed for c in resolved.values()} == {7}
    assert resolved["tok_train"].data_source == resolved["base_train"].data_source == "hf"
    assert not hasattr(resolved["mid_train"], "data_source")       # chat stages read no pretraining text
    demo = PipelineConfig(preset="demo-cpu")
    assert {demo.stage_config(s).device_type for s in demo.planned_stages()} == {"cpu"}


# -----------------------------------------------------------------------------
# The resolved config, for the run's artifact

def test_resolved_config_names_the_preset_and_what_changed_where():
    config = PipelineConfig(preset="demo-cpu", base_train={"depth": 6}, stop_after="base_eval")
    text = resolved_config_markdown(config)
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "preset `demo-cpu`" in text and PRESET_DESCRIPTIONS["demo-cpu"] in text
    assert "Stages: tok_train, tok_eval, base_train, base_eval (" in text
    assert rows[("base_train", "depth")].endswith("| 6 | 20 | this run |")
    assert rows[("tok_train", "vocab_size")].endswith("| 2,048 | 32,768 | preset |")
    assert rows[("common", "device_type")].endswith("| cpu | (empty) | preset |")
    assert ("base_train", "device_type") not in rows and ("mid_train", "num_iterations") not in rows
    assert ("base_train", "matrix_lr") not in rows                  # a default that is not a key field
    assert ("resources", "nproc_per_node") in rows and "World size: 2 x 1 node(s) = 2" in text
    assert "no preset (stage defaults)" in resolved_config_markdown(PipelineConfig())


# -----------------------------------------------------------------------------
# Rules a stage would reject only once launched: plan_pipeline raises them first, in-process

@pytest.mark.parametrize("values, needles", [
    ({"resources": {"nproc_per_node": 3}},
     ["stage base_train on 3 process(es)", "--total_batch_size=4096", "--device_batch_size (8)", "= 6144"]),
    ({"stage_resources": {"mid_train": {"nproc_per_node": 3}}},
     ["stage mid_train on 3 process(es)", "--total_batch_size=4096", "world size (3)"]),
    ({"chat_sft": {"device_batch_size": 4}, "stage_resources": {"chat_sft": {"nproc_per_node": 3}}},
     ["stage chat_sft on 3 process(es)", "--target_examples_per_step=32", "--device_batch_size (4)"]),
    ({"run_rl": True, "chat_rl": {"examples_per_step": 9}},
     ["stage chat_rl on 2 process(es)", "--examples_per_step=9 does not split over 2 ranks"]),
    ({"base_eval": {"split_tokens": 1000}},
     ["stage base_eval on 2 process(es)", "--split_tokens=1000", "model's context (256)", "= 4096"]),
])
def test_plan_rejects_cross_field_rules_before_any_work(tmp_path, values, needles):
    from flows.artifacts import code_hashes
    config = PipelineConfig.model_validate({"preset": "demo-cpu", **values})
    before = code_hashes.cache_info()
    with pytest.raises(PlanError) as err:
        plan_pipeline(config, home=tmp_path)
    message = str(err.value)
    assert all(n in message for n in needles), message
    assert "\n" not in message
    assert code_hashes.cache_info()[:2] == before[:2]    # raised before any code was hashed, let alone launched
    assert list(tmp_path.iterdir()) == []


def test_the_same_rules_pass_where_the_world_size_fits(tmp_path):
    config = PipelineConfig(preset="demo-cpu", resources={"nproc_per_node": 1}, run_rl=True)
    assert [p.stage for p in plan_pipeline(config, home=tmp_path)] == STAGE_NAMES
    for name in PRESETS:
        plan_pipeline(PipelineConfig(preset=name, run_rl=True), home=tmp_path)


# -----------------------------------------------------------------------------
# Preflight: the dry runs plan for this run's vocabulary and model, not the defaults

def test_dry_runs_are_given_the_planned_vocabulary_and_model_shape(tmp_path):
    config = PipelineConfig(preset="demo-cpu", tok_train={"vocab_size": 512})
    plans = plan_pipeline(config, home=tmp_path)
    shape = model_shape(plans)
    assert shape == {"depth": 4, "aspect_ratio": 32, "head_dim": 32, "model_seq_len": 256, "vocab_size": 512}
    by_stage = {p.stage: p for p in plans}
    for stage, cls in (("base_train", BaseTrainConfig), ("chat_sft", ChatSFTConfig)):
        cmd, _ = dry_run_command(by_stage[stage], shape)
        flags = cmd[cmd.index(get_stage(stage).module) + 1:]
        assert "--vocab_size=512" in flags and "--plan_only=true" in flags
        parsed = cls.model_validate(parse_flags(cls, flags, prog=stage))   # the stage takes these flags
        assert parsed.vocab_size == 512 and (parsed.depth, parsed.aspect_ratio, parsed.head_dim) == (4, 32, 32)
    sft_flags = dry_run_command(by_stage["chat_sft"], shape)[0]
    assert "--model_seq_len=256" in sft_flags and not any(f.startswith("--model_seq_len") for f in
                                                          dry_run_command(by_stage["base_train"], shape)[0])
    # the hint changes nothing a stage computes: same artifact address with or without it
    assert "vocab_size" not in by_stage["base_train"].semantic_config


def test_preflight_reports_the_runs_vocabulary_and_context(tmp_path):
    from flows.plan import dry_run
    config = PipelineConfig(preset="demo-cpu", tok_train={"vocab_size": 512}, resources={"nproc_per_node": 1},
                            stop_after="chat_sft")
    plans = plan_pipeline(config, home=tmp_path)
    shape = model_shape(plans)
    for plan in (p for p in plans if p.stage in ("base_train", "chat_sft")):
        planned = dry_run(plan, shape, timeout_seconds=300)   # the stage's plan record
        assert (planned.model["sequence_len"], planned.model["vocab_size"]) == (256, 512), planned


# -----------------------------------------------------------------------------
# Presets and deployments

def test_every_preset_has_a_one_line_description_written_once():
    import flows.presets
    assert set(PRESET_DESCRIPTIONS) == set(PRESETS)
    for name, text in PRESET_DESCRIPTIONS.items():
        assert text and "\n" not in text and len(text) <= 100, name
        assert f"\n    {name} " not in flows.presets.__doc__, f"{name}: described in PRESET_DESCRIPTIONS only"


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_line_states_the_key_values_of_its_resolved_config(name):
    """Depth, parameters, steps, batch and processes as the stages will compute them, so a line cannot go stale."""
    import torch
    from nanopipe.gpt import GPT, build_model_config
    from nanopipe.stages.base_train import horizon
    config = PipelineConfig(preset=name)
    base, res = config.stage_config(get_stage("base_train")), config.resources
    with torch.device("meta"):
        model = GPT(build_model_config(base.depth, base.aspect_ratio, base.head_dim, base.max_seq_len,
                                       config.tok_train.vocab_size))
    steps, _ = horizon(base, model.estimate_flops(), model.num_params())
    line = preset_key_values(name)
    assert model_params(base.depth, base.aspect_ratio, base.head_dim, config.tok_train.vocab_size) == \
        model.num_params()
    assert line.startswith(f"depth {base.depth} (") and round(model.num_params() / 1e6) == \
        round(float(line.split("(")[1].split("M parameters")[0]))
    assert f" {steps:,} steps" in line and f" of {base.total_batch_size:,} tokens, " in line
    assert f"{res.nproc_per_node} x {res.nnodes} processes; " in line
    if name in PRESET_TIMES:
        assert PRESET_TIMES[name][1] in line and ("no GPU cost" in line) == (config.common.device_type == "cpu")
    else:
        assert "time and cost not measured" in line
    assert preset_line(name) == f"{name}: {PRESET_DESCRIPTIONS[name]}. {line[0].upper()}{line[1:]}"


def test_nanopipe_presets_prints_each_presets_purpose_and_key_values(capsys):
    from flows.cli import cmd_presets
    assert cmd_presets([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 * len(PRESETS)
    for name, first, second in zip(PRESETS, out[::2], out[1::2]):
        assert first.split() == [name, *PRESET_DESCRIPTIONS[name].split()]
        assert second.strip() == preset_key_values(name)


def test_prefect_yaml_never_activates_a_schedule_on_the_shared_pool():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    shared_pool = spec["definitions"]["work_pools"]["node"]["name"]
    scheduled = [d for d in spec["deployments"] if d.get("schedules")]
    assert scheduled, "the nightly deployment has a schedule"
    for deployment in scheduled:
        for schedule in deployment["schedules"]:
            assert schedule.get("active") is False or deployment["work_pool"]["name"] != shared_pool, \
                f"{deployment['name']}: an active schedule on the shared pool {shared_pool}"
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["work_pool"]["name"] != shared_pool and nightly["schedules"][0]["active"] is False
    for deployment in (d for d in spec["deployments"] if "parameters" in d):   # node-agent takes a plan instead
        preset = deployment["parameters"]["config"]["preset"]
        assert {"nanopipe", f"preset:{preset}"} <= set(deployment["tags"]), deployment["name"]
        if "stage" in deployment["parameters"]:
            assert f"stage:{deployment['parameters']['stage']}" in deployment["tags"]


def test_every_deployment_and_parameter_file_plans(tmp_path):
    """Not only valid fields: each plans for the world size it names (16 ranks halve the per-rank batches)."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    configs = {d["name"]: d["parameters"]["config"] for d in spec["deployments"] if "parameters" in d}
    configs |= {p.name: json.loads(p.read_text())["config"] for p in (REPO / "deployments" / "params").glob("*.json")}
    assert "d12-two-nodes.json" in configs
    for name, values in configs.items():
        assert plan_pipeline(PipelineConfig.model_validate(values), home=tmp_path), name
