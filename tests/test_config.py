"""The pydantic-driven CLI: both flag spellings, clear errors before any work, help, round-trip."""

import subprocess
import sys
from typing import Literal

import pytest
from pydantic import Field

from nanopipe.config import (CommonConfig, ConfigError, build_config, config_digest, format_help, parse_cli,
                             to_cli_args)


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
    code = "from tests.test_config import DemoConfig; from nanopipe.config import parse_cli; parse_cli(DemoConfig)"
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
    from nanopipe.config import NanoConfig, non_semantic_fields

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
    modules = [f"nanopipe.configs.{name}" for name in nanopipe.configs.STAGE_CONFIGS] + [
        "nanopipe.configs", "nanopipe.configs.base", "nanopipe.configs.data", "nanopipe.exit_codes"]
    code = "; ".join(f"import {m}" for m in modules) + "; import sys; assert 'torch' not in sys.modules, " \
        "sorted(m for m in sys.modules if m.startswith('nanopipe'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_stage_has_one_config_class():
    from nanopipe.configs import STAGE_CONFIGS, config_class
    from nanopipe.configs.base import NanoConfig
    assert {"tok_train", "tok_eval", "base_train", "base_eval", "chat_eval", "chat_cli"} <= set(STAGE_CONFIGS)
    for name, cls in STAGE_CONFIGS.items():
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
