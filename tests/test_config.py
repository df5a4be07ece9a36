"""The pydantic-driven CLI: both flag spellings, clear errors before any work, help, round-trip."""

import subprocess
import sys
from typing import Literal

import pytest
from pydantic import Field

from nanopipe.configs.base import CommonConfig, ConfigError, NanoConfig, build_config, config_digest
from nanopipe.configs.flags import format_help, parse_config as parse_cli, to_cli_args


class DemoConfig(CommonConfig):
    max_chars: int = Field(10_000_000_000, ge=1, description="characters to read")
    vocab_size: int = Field(32768, ge=265, le=1 << 20, description="vocabulary size")
    lr: float = Field(0.02, gt=0, description="learning rate")
    model_tag: str | None = Field(None, description="tag")
    flag: bool = Field(False, description="a switch")
    mode: Literal["a", "b"] = Field("a", description="mode")


def test_underscore_and_kebab_spellings_agree():
    a = parse_cli(DemoConfig, ["--max_chars=1000", "--vocab_size", "512", "--flag"])
    b = parse_cli(DemoConfig, ["--max-chars", "1000", "--vocab-size=512", "--flag=true"])
    assert a == b
    assert (a.max_chars, a.vocab_size, a.flag) == (1000, 512, True)


def test_numbers_accept_underscores_and_exponents():
    cfg = parse_cli(DemoConfig, ["--max_chars=2e9", "--vocab_size=65_536", "--lr=3e-4"])
    assert cfg.max_chars == 2_000_000_000 and cfg.vocab_size == 65536 and cfg.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("argv, needle", [
    (["--vocab_size=100"], "--vocab_size"),
    (["--vocab_size=abc"], "--vocab_size"),
    (["--nope=1"], "unknown flag --nope"),
    (["--mode=c"], "one of 'a', 'b'"),
    (["--lr=0"], "> 0"),
])
def test_bad_input_exits_2_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(DemoConfig, argv, prog="demo")
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_range_is_in_the_message():
    with pytest.raises(ConfigError, match=r"--vocab_size.*>= 265 and <= 1048576"):
        build_config(DemoConfig, {"vocab_size": 3})


def test_help_lists_every_flag_with_default():
    text = format_help(DemoConfig, "demo")
    for name in DemoConfig.model_fields:
        assert f"--{name}" in text
    assert "default: 10000000000" in text


def test_help_exits_zero_from_a_real_process():
    code = "from tests.test_config import DemoConfig; from nanopipe.configs.flags import parse_config; parse_config(DemoConfig)"
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max_chars" in out.stdout


def test_to_cli_args_round_trips():
    cfg = build_config(DemoConfig, {"max_chars": 5, "model_tag": "d4", "flag": True, "mode": "b"})
    assert parse_cli(DemoConfig, to_cli_args(cfg)) == cfg


def test_digest_ignores_run_name_but_not_semantics():
    a = build_config(DemoConfig, {"run": "x"})
    b = build_config(DemoConfig, {"run": "y"})
    c = build_config(DemoConfig, {"lr": 0.03})
    assert config_digest(a) == config_digest(b) != config_digest(c)



def test_non_semantic_fields_of_every_base_are_honoured():
    from nanopipe.configs.base import non_semantic_fields

    class Mixin(NanoConfig):
        NON_SEMANTIC = ("log_every",)
        log_every: int = 10

    class Stage(CommonConfig, Mixin):
        steps: int = 5

    assert non_semantic_fields(Stage) == {"run", "log_every"}
    a, b = Stage(log_every=1), Stage(log_every=2)
    assert config_digest(a) == config_digest(b) != config_digest(Stage(steps=6))


# -----------------------------------------------------------------------------
# The config package is torch-free, and the library never imports the orchestration

def test_configs_import_without_torch():
    import nanopipe.configs
    modules = [f"nanopipe.configs.{name}" for name in nanopipe.configs.CONFIG_CLASSES] + [
        "nanopipe.configs", "nanopipe.configs.base", "nanopipe.configs.data", "nanopipe.exit_codes"]
    code = "; ".join(f"import {m}" for m in modules) + "; import sys; assert 'torch' not in sys.modules, " \
        "sorted(m for m in sys.modules if m.startswith('nanopipe'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_stage_has_one_config_class():
    from nanopipe.configs import CONFIG_CLASSES, config_class
    from nanopipe.configs.base import NanoConfig
    assert {"tok_train", "tok_eval", "base_train", "base_eval", "chat_eval", "chat_cli"} <= set(CONFIG_CLASSES)
    for name, cls in CONFIG_CLASSES.items():
        assert issubclass(cls, NanoConfig) and config_class(name) is cls
    with pytest.raises(KeyError, match="unknown stage"):
        config_class("nope")


def test_library_never_imports_prefect_or_flows():
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "nanopipe"
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|flows)\b", re.M)
    offenders = [str(p.relative_to(root.parent)) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_no_stage_imports_another_stage():
    import re
    from pathlib import Path
    stages = Path(__file__).resolve().parents[1] / "nanopipe" / "stages"
    pattern = re.compile(r"^\s*(from\s+nanopipe\.stages(\.\w+)?\s+import|import\s+nanopipe\.stages\.)", re.M)
    assert [p.name for p in stages.glob("*.py") if pattern.search(p.read_text())] == []


# -----------------------------------------------------------------------------
# parse_flags on a nested model (what the pipeline command parses)

class _Resources(NanoConfig):
    nproc_per_node: int = Field(1, ge=1, description="processes")
    env: dict[str, str] = Field(default_factory=dict, description="environment")


class _Pipeline(NanoConfig):
    demo: DemoConfig = Field(default_factory=DemoConfig)
    resources: _Resources = Field(default_factory=_Resources)
    per_stage: dict[str, _Resources] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)


def test_parse_flags_nested_dotted_and_both_spellings():
    from nanopipe.configs.flags import parse_flags
    values = parse_flags(_Pipeline, ["--demo.max_chars=1e9", "--demo.vocab-size", "10_000", "--demo.flag",
                                     "--resources.env.A=1", "--resources.env", "B=2", "--per_stage.x.nproc_per_node=2",
                                     "--tags", "a", "b,c"], prog="demo")
    assert values == {"demo": {"max_chars": 10**9, "vocab_size": "10000", "flag": True},
                      "resources": {"env": {"A": "1", "B": "2"}}, "per_stage": {"x": {"nproc_per_node": "2"}},
                      "tags": ["a", "b", "c"]}
    cfg = build_config(_Pipeline, values)
    assert cfg.demo.vocab_size == 10000 and cfg.per_stage["x"].nproc_per_node == 2


def test_parse_flags_bare_prefix_and_extra_flags():
    from nanopipe.configs.flags import parse_flags
    values = parse_flags(_Pipeline, ["--vocab_size=512", "--home", "/tmp/x", "--json"], prog="demo",
                         bare_prefix="demo", extra_flags={"home": "home directory", "json": "print JSON"})
    assert values == {"demo": {"vocab_size": "512"}, "home": "/tmp/x", "json": "true"}


def test_nested_errors_name_the_dotted_flag():
    from nanopipe.configs.flags import parse_flags
    with pytest.raises(ConfigError, match=r"--demo\.vocab_size: .*>= 265"):
        build_config(_Pipeline, parse_flags(_Pipeline, ["--demo.vocab_size=3"], prog="demo"))
    with pytest.raises(ConfigError, match=r"--per_stage\.x\.nproc_per_node: .*>= 1"):
        build_config(_Pipeline, parse_flags(_Pipeline, ["--per_stage.x.nproc_per_node=0"], prog="demo"))
    with pytest.raises(ConfigError, match="unknown flag --demo.nope"):
        parse_flags(_Pipeline, ["--demo.nope=1"], prog="demo")


def test_off_means_minus_one_or_none():
    from nanopipe.configs.base import Off

    class Cfg(CommonConfig):
        every: Off[int] = Field(5, ge=1, description="how often")

    assert parse_cli(Cfg, ["--every=-1"]).every is None and parse_cli(Cfg, ["--every", "none"]).every is None
    assert parse_cli(Cfg, ["--every", "7"]).every == 7
    with pytest.raises(ConfigError, match=r"--every.*>= 1 \(or -1/none: off\)"):
        build_config(Cfg, {"every": 0})


@pytest.mark.parametrize("stage", ["base_train", "base_eval", "chat_eval", "mid_train", "chat_sft", "chat_rl"])
@pytest.mark.parametrize("tag", ["../escape", "a/b", "..", ""])
def test_model_tags_are_plain_names_never_paths(stage, tag):
    from nanopipe.configs import ConfigError, build_config, config_class
    with pytest.raises(ConfigError, match="--model_tag.*plain name"):
        build_config(config_class(stage), {"model_tag": tag})
    assert build_config(config_class(stage), {"model_tag": "d12-run_2"}).model_tag == "d12-run_2"
