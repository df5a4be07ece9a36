"""The run's resolved-config artifact states the preset's key values, as the form's preset picker does."""

from flows.config import PipelineConfig, resolved_config_markdown
from flows.presets import preset_facts, preset_key_values


def test_resolved_config_states_the_presets_key_values():
    text = resolved_config_markdown(PipelineConfig(preset="cpu-small", base_train={"depth": 6}))
    line = next(line for line in text.splitlines() if line.startswith("The preset's key values"))
    facts = preset_facts("cpu-small")
    assert preset_key_values("cpu-small") in line          # the picker's own words, not a second derivation
    assert f"depth {facts['depth']} " in line and f"{facts['steps']:,} steps" in line
    assert facts["depth"] != 6                             # the preset's values, before this run's overrides
    assert "key values" not in resolved_config_markdown(PipelineConfig())   # no preset: nothing to state
