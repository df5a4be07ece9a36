"""Bench scripts take stage settings through the stages' own flags: one definition (type, bound, default, help)
in nanopipe.configs, the bench's scale laid under the command line, argparse only for the bench's options."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.configs.tok_train import TokTrainConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stage_flags import parse_bench_flags, stage_model  # noqa: E402


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_x")
    parser.add_argument("--repeats", type=int, default=1)
    return parser


def test_a_chosen_field_is_the_stages_own_field():
    model = stage_model([(BaseTrainConfig, ("depth", "max_seq_len")), (TokTrainConfig, ("vocab_size",))])
    assert set(model.model_fields) == {"depth", "max_seq_len", "vocab_size"}
    for name, cls in (("depth", BaseTrainConfig), ("vocab_size", TokTrainConfig)):
        assert model.model_fields[name].default == cls.model_fields[name].default
        assert model.model_fields[name].description == cls.model_fields[name].description
    assert stage_model([(BaseTrainConfig, None)]) is BaseTrainConfig  # taken whole: its validators too


def test_scale_is_laid_under_the_command_line_and_the_bench_keeps_its_own_options():
    sources = [(BaseTrainConfig, ("depth", "max_seq_len", "core_metric_every"))]
    args, stage = parse_bench_flags(bench_parser(), sources, scale={"depth": 4, "max_seq_len": 256},
                                    argv=["--repeats=3", "--max-seq-len", "128", "--core_metric_every=-1"])
    assert args.repeats == 3
    assert (stage.depth, stage.max_seq_len) == (4, 128)
    assert stage.core_metric_every is None  # the stage's own "-1 means off"
    _, stage = parse_bench_flags(bench_parser(), sources, argv=[])
    assert stage.depth == BaseTrainConfig.model_fields["depth"].default


@pytest.mark.parametrize("argv", [["--depth=0"], ["--steps=3"], ["--depth=four"]])
def test_a_bad_stage_flag_exits_2_naming_it(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_bench_flags(bench_parser(), [(BaseTrainConfig, ("depth",))], argv=argv)
    assert exit_info.value.code == 2
    assert argv[0].split("=")[0] in capsys.readouterr().err


def test_help_lists_the_bench_options_and_the_stage_flags_with_their_stage_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_bench_flags(bench_parser(), [(BaseTrainConfig, ("depth",))], scale={"depth": 4}, argv=["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--repeats" in out and "--depth" in out and "default: 20" in out and "'depth': 4" in out


def test_the_readme_command_of_bench_base_train_parses_to_the_readme_scale(capsys):
    bench = load_bench("bench_base_train")
    args, stage = bench.parse_args(["--repeats=4", "--corpus=builtin"])
    assert (args.repeats, args.corpus, args.threads) == (4, "builtin", 2)
    assert (stage.depth, stage.max_seq_len, stage.num_iterations) == (4, 256, 60)
    flags = bench.shared_flags(stage)
    assert flags["core_metric_every"] == -1 and "vocab_size" not in flags
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--repeats=4", "--corpus=builtin", "--parse_only"])
    assert exit_info.value.code == 0 and "'num_iterations': 60" in capsys.readouterr().out


def test_bench_engine_takes_the_model_shape_from_the_stages_and_keeps_its_sweeps():
    bench = load_bench("bench_engine")
    args = bench.parse_args(["--depth=2", "--aspect_ratio=32", "--threads=1", "--max_tokens=128"])
    assert (args.depth, args.aspect_ratio, args.max_seq_len, args.threads, args.max_tokens) == (2, 32, 512, 1, 128)
    assert args.synthetic_size == 256 and args.tokenizer_dir is None
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--seq_len=64"])  # the stage's flag is --max_seq_len
    assert exit_info.value.code == 2


def test_bench_eval_and_bench_model_name_stage_settings_by_the_stages_flags():
    args = load_bench("bench_eval").parse_args([])  # the README's command: d4, width 256, 2 threads, 3 repeats
    assert (args.depth, args.depth * args.aspect_ratio, args.threads, args.repeats) == (4, 256, 2, 3)
    assert (args.device_batch_size, args.batch_size, args.max_new_tokens) == (8, 8, 64)
    args = load_bench("bench_model").parse_args(["--depth=4", "--max_seq_len=128", "--device_batch_size=8",
                                                 "--steps=30"])
    assert (args.max_seq_len, args.device_batch_size, args.steps, args.vocab_size) == (128, 8, 30, 2048)


def test_bench_chat_quality_hands_each_stage_flags_its_own_parser_accepts():
    from nanopipe.configs.flags import parse_config

    bench = load_bench("bench_chat_quality")
    from bench.stage_flags import stage_cli_args
    args, stages = bench.parse_args(["--nproc=1", "--base_train.num_iterations=60", "--mid_train.builtin_size=1000"])
    assert args.nproc == 1
    assert (stages.base_train.num_iterations, stages.base_train.depth) == (60, 4)
    assert (stages.mid_train.builtin_size, stages.mid_train.init_lr_frac) == (1000, 0.265)
    for name in ("tok_train", "base_train", "mid_train", "chat_sft"):
        config = getattr(stages, name)
        assert parse_config(type(config), stage_cli_args(config), prog=name) == config


def test_profile_step_takes_the_model_rates_and_matmul_precision_from_base_train():
    args = load_bench("profile_step").parse_args(["--cpu_matmul_precision=ieee", "--steps=20"])
    assert (args.cpu_matmul_precision, args.steps, args.max_seq_len, args.total_batch_size) == ("ieee", 20, 128, 2048)
    assert args.matrix_lr == BaseTrainConfig.model_fields["matrix_lr"].default


def test_bench_gpu_starts_from_the_stage_defaults_and_times_a_fixed_step_count():
    bench = load_bench("bench_gpu")
    args = bench.parse_args(["--depths=12", "--num_iterations=30"])
    assert (args.device_batch_size, args.max_seq_len, args.vocab_size) == (
        BaseTrainConfig.model_fields["device_batch_size"].default, BaseTrainConfig.model_fields["max_seq_len"].default,
        TokTrainConfig.model_fields["vocab_size"].default)
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--num_iterations=-1"])
    assert exit_info.value.code == 2


def test_bench_chat_rl_gives_each_stage_its_own_flags_and_a_control_with_tiny_rates():
    from nanopipe.configs.flags import parse_config

    from bench.stage_flags import stage_cli_args
    bench = load_bench("bench_chat_rl")
    args, stages = bench.parse_args(["--home", "H", "--chat_rl.num_epochs", "8", "--base_train.depth=3"])
    assert (args.home, stages.chat_rl.num_epochs, stages.base_train.depth) == ("H", 8, 3)
    for name in ("tok_train", "base_train", "chat_sft", "chat_rl"):
        config = getattr(stages, name)
        assert parse_config(type(config), stage_cli_args(config), prog=name) == config
    control = parse_config(type(stages.chat_rl), stage_cli_args(bench.control_of(stages.chat_rl)), prog="chat_rl")
    assert control.init_lr_frac == pytest.approx(stages.chat_rl.init_lr_frac * 1e-5)
    assert control.model_dump(exclude={"init_lr_frac"}) == stages.chat_rl.model_dump(exclude={"init_lr_frac"})


def test_bench_cli_takes_the_pipeline_commands_own_preset_and_stop_after():
    bench = load_bench("bench_cli")
    args = bench.parse_args(["--repeats=5", "--workdir=DIR", "--skip_startup"])
    assert (args.preset, args.stop_after, args.repeats, args.skip_startup) == ("demo-cpu", None, 5, True)
    args = bench.parse_args(["--stop-after=base_eval", "--repeats=5"])
    assert args.stop_after == "base_eval"
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--stop_after=no_such_stage"])
    assert exit_info.value.code == 2


def test_bench_loader_takes_tok_trains_vocab_size_and_base_trains_d20_shape():
    bench = load_bench("bench_loader")
    assert bench.parse_args(["--vocab_size=4096"]).vocab_size == 4096
    assert bench.SHAPES["d20-like"] == (32, 2048)


def test_bench_tokenizer_cuts_documents_at_tok_trains_doc_cap():
    args = load_bench("bench_tokenizer").parse_args(["--vocab_size=8192", "--repeats=5"])
    assert (args.vocab_size, args.max_chars, args.repeats) == (8192, 2_000_000, 5)
    assert args.doc_cap == TokTrainConfig.model_fields["doc_cap"].default
