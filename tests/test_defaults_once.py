"""Every default written once: presets state only what differs from the stages' defaults, prefect.yaml's tags
come from its parameters, and the helpers every config shares (none/null, -1, top-k's 0, deep merge, the
compile rule, model tags, NANOPIPE_HOME) behave the same wherever they are used."""

from pathlib import Path

import pytest
import yaml

from flows.config import PipelineConfig
from flows.presets import PRESETS
from nanopipe.configs.base import (ConfigError, build_config, compile_decision, deep_merge, depth_of_model_tag,
                                   is_none_text, model_tag_for_depth)
from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.configs.chat_cli import ChatCliConfig
from nanopipe.configs.chat_eval import ChatEvalConfig
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.configs.flags import parse_flags

REPO = Path(__file__).resolve().parents[1]

# preset values that equal a default by coincidence, not by repetition: derived from the preset's own sizes
DERIVED = {("chat_rl", "eval_every")}   # the RL horizon: evaluate the SFT model at step 0 and at the end


def leaves(node, path=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, path + (key,))
    else:
        yield path, node


def value_at(node, path):
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return KeyError
        node = node[key]
    return node


# -----------------------------------------------------------------------------
# Presets

def test_presets_state_only_what_differs_from_the_stage_defaults():
    defaults = PipelineConfig().model_dump(mode="json", context={"full": True})
    repeated = [(name, ".".join(path), value) for name, preset in PRESETS.items() for path, value in leaves(preset)
                if path[0] != "resources" and path not in DERIVED and value_at(defaults, path) == value]
    assert not repeated, f"preset values equal to the stage defaults (leave them out): {repeated}"


def test_presets_resolve_to_their_documented_shape():
    """A cheap snapshot: what each preset trains, with the values it inherits from the stage defaults."""
    def shape(name):
        c = PipelineConfig.model_validate({"preset": name})
        return (c.base_train.depth, c.tok_train.vocab_size, c.base_train.target_param_data_ratio,
                c.base_train.device_batch_size, c.base_eval.device_batch_size, c.mid_train.device_batch_size,
                c.chat_rl.device_batch_size, c.chat_eval.batch_size, c.resources.nproc_per_node)
    assert shape("speedrun-d20") == (20, 32768, 20, 32, 32, 32, 8, 8, 8)
    assert shape("d12") == (12, 32768, 20, 32, 32, 32, 8, 8, 8)
    assert shape("d26") == (26, 32768, 20, 16, 16, 16, 8, 8, 8)
    assert shape("mem-40gb") == (20, 32768, 20, 16, 16, 16, 8, 8, 8)
    assert shape("mem-24gb") == (16, 32768, 20, 8, 8, 8, 8, 8, 8)
    assert shape("single-gpu") == (12, 32768, 20, 4, 4, 4, 4, 4, 1)
    assert shape("demo-cpu") == (4, 2048, 20, 8, 8, 8, 32, 32, 2)
    demo = PipelineConfig.model_validate({"preset": "demo-cpu"})
    assert demo.data.data_source == "builtin"
    assert (demo.chat_rl.init_lr_frac, demo.chat_rl.replay, demo.chat_rl.synthetic_size) == (0.10, 16, 45 * 8)


def test_prefect_yaml_tags_are_its_parameters():
    """Each deployment's preset (and stage) tag is the one its parameters run, and only that one; the lineage
    tag is the run's own (flows/gate.tag_lineage), never written here."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        params = deployment.get("parameters") or {}
        expected = set()
        if "config" in params:
            expected.add(f"preset:{params['config'].get('preset') or 'custom'}")
        if "stage" in params:
            expected.add(f"stage:{params['stage']}")
        kinded = {t for t in deployment["tags"] if ":" in t and t.partition(":")[0] in ("preset", "stage", "lineage")}
        assert kinded == expected, deployment["name"]


# -----------------------------------------------------------------------------
# One helper each

@pytest.mark.parametrize("text", ["", "none", " None ", "NULL"])
def test_none_spellings_mean_none_everywhere(text):
    assert is_none_text(text)
    assert BaseTrainConfig(save_every=text).save_every is None                 # an Off field
    assert BaseTrainConfig(resume_from_step=text).resume_from_step is None     # --resume_from_step
    assert parse_flags(ChatEvalConfig, [f"--max_problems={text}"], prog="chat_eval") == {"max_problems": None}
    assert PipelineConfig.model_validate({"stop_after": text}).stop_after is None          # the form's "none"


def test_none_text_is_only_those_spellings():
    assert not any(is_none_text(v) for v in ("0", "nothing", None, 0, "latest"))


@pytest.mark.parametrize("config", [ChatRLConfig, ChatEvalConfig, ChatCliConfig])
def test_top_k_of_every_sampling_stage_reads_0_and_minus_1_as_all(config):
    for value in (0, -1, "0", "-1", "none", None):
        assert config(top_k=value).top_k is None, value
    assert config(top_k=7).top_k == 7
    with pytest.raises(ConfigError):
        build_config(config, {"top_k": -2})


def test_deep_merge_recurses_and_leaves_its_inputs_alone():
    base = {"a": {"x": 1, "y": [1]}, "b": 2}
    merged = deep_merge(base, {"a": {"y": [2]}, "c": 3})
    assert merged == {"a": {"x": 1, "y": [2]}, "b": 2, "c": 3}
    merged["a"]["x"] = 9
    assert base == {"a": {"x": 1, "y": [1]}, "b": 2}
    # the command line lays a dict entry's fields over the entry given whole
    values = parse_flags(PipelineConfig, ['--stage_resources.base_train={"nnodes": 2, "env": {"A": "1"}}',
                                          '--stage_resources.base_train.env={"B": "2"}'], prog="nanopipe")
    assert values == {"stage_resources": {"base_train": {"nnodes": 2, "env": {"A": "1", "B": "2"}}}}


def test_compile_auto_is_one_rule_for_base_and_mid_training():
    """The rule itself: tests/test_base_train.py. Mid-training's horizon may be one pass over the data, known
    only once it has run: long enough to repay compilation."""
    assert compile_decision(None, "cuda", None)[0] is True
    assert compile_decision(None, "cpu", None)[0] is False
    from nanopipe.configs.mid_train import MidTrainConfig
    assert repr(MidTrainConfig.model_fields["compile"]) == repr(BaseTrainConfig.model_fields["compile"])


def test_model_tags_of_a_depth_round_trip():
    assert model_tag_for_depth(12) == "d12" and depth_of_model_tag("d12") == 12
    assert depth_of_model_tag("d12x") is None and depth_of_model_tag("big") is None
    from flows.stages import get_stage
    config = PipelineConfig.model_validate({"preset": "demo-cpu"})
    assert get_stage("base_train").tag(config.base_train) == model_tag_for_depth(config.base_train.depth)


def test_the_chat_stages_plan_for_base_trains_default_model():
    from nanopipe.configs.chat_sft import ChatSFTConfig
    base = BaseTrainConfig()
    for config in (ChatSFTConfig(), ChatRLConfig()):
        assert (config.depth, config.aspect_ratio, config.head_dim, config.model_seq_len) == (
            base.depth, base.aspect_ratio, base.head_dim, base.max_seq_len)
        assert (config.embedding_lr, config.unembedding_lr, config.matrix_lr) == (0.2, 0.004, 0.02)


def test_one_default_home(monkeypatch, tmp_path):
    from flows.cli_help import home_and_source
    from nanopipe.common import base_dir_path
    monkeypatch.delenv("NANOPIPE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert base_dir_path() == tmp_path / "nanopipe" == home_and_source(None)[0]
    assert not (tmp_path / "nanopipe").exists()      # asking where it is does not create it
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path / "h"))
    assert base_dir_path() == tmp_path / "h" == home_and_source(None)[0]
