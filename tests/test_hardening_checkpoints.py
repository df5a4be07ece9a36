"""Hardening of the training stages: a damaged newest checkpoint is skipped (and said so), a checkpoint of another
world size is refused instead of silently restarting, one run at a time per output directory, two training
horizons are an error, and a run whose memory estimate exceeds the device's memory is refused before it trains."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from flows.presets import PRESETS
from nanopipe import training
from nanopipe.checkpoint import (CheckpointError, WorldSizeMismatchError, list_steps, load_resume_checkpoint,
                                 meta_path, model_path, optim_path, save_checkpoint)
from nanopipe.configs.base import ConfigError, build_config
from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.exit_codes import ExitCode
from nanopipe.stages import base_train, chat_sft
from nanopipe.training import LOCK_NAME, OverMemoryError, OutDirBusyError, check_memory_fits, exclusive_out_dir
from tests.chat_fixtures import build_chat_tokenizer, tiny_chat_flags, write_base_checkpoint
from tests.fixtures.tiny_corpus import build_shards, build_tokenizer, tiny_model_flags

pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# Resume: the newest checkpoint that verifies and loads

def write_steps(ckpt_dir: Path, steps=(10, 20), world_size: int = 1) -> None:
    for step in steps:
        meta = {"loader_state": {"world_size": world_size, "ranks": [None] * world_size}, "loop_state": {}}
        for rank in reversed(range(world_size)):  # rank 0 last: it writes the meta
            save_checkpoint(ckpt_dir, step, {"w": torch.full((64,), float(step))}, {"rank": rank, "step": step},
                            meta, rank=rank)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated model": (lambda d: truncate(model_path(d, 20)), "model_000020.pt"),
    "garbled meta": (lambda d: meta_path(d, 20).write_text("{not json"), "meta_000020.json is unreadable"),
    "missing optimizer shard": (lambda d: optim_path(d, 20, 0).unlink(), "optim_000020_rank0.pt is missing"),
    "empty optimizer shard": (lambda d: optim_path(d, 20, 0).write_bytes(b""), "optim_000020_rank0.pt is empty"),
    "garbled optimizer shard": (lambda d: optim_path(d, 20, 0).write_bytes(b"not a torch file"),
                                "optim_000020_rank0.pt"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_latest_skips_a_damaged_newest_checkpoint_in_one_line(tmp_path, capsys, damage):
    write_steps(tmp_path)
    apply, why = DAMAGES[damage]
    apply(tmp_path)
    point = load_resume_checkpoint(tmp_path, "latest", 1, "cpu")
    assert point.step == 10 and point.model_state["w"][0] == 10 and point.optim_state == {"rank": 0, "step": 10}
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "step 20" in lines[0] and why in lines[0] and "resuming from step 10" in lines[0]
    # an explicit step is not replaced by another: it fails naming the step and the problem
    with pytest.raises(CheckpointError, match=r"step 20 .*" + re.escape(why)):
        load_resume_checkpoint(tmp_path, 20, 1, "cpu")


def test_latest_skips_a_step_another_rank_cannot_read_and_starts_fresh_when_none_loads(tmp_path, capsys):
    write_steps(tmp_path)
    rank_says = iter([False, True])  # the other rank's optimizer file of step 20 is damaged
    point = load_resume_checkpoint(tmp_path, "latest", 1, "cpu", all_ranks_ok=lambda ok: ok and next(rank_says))
    assert point.step == 10 and "another rank's optimizer file is unreadable" in capsys.readouterr().out
    for step in (10, 20):
        truncate(model_path(tmp_path, step))
    assert load_resume_checkpoint(tmp_path, "latest", 1, "cpu") is None
    assert re.search(r"no usable checkpoint .*step 20 .*step 10 .*starting from scratch", capsys.readouterr().out)
    assert load_resume_checkpoint(tmp_path / "empty", "latest", 1, "cpu") is None
    assert load_resume_checkpoint(tmp_path, None, 1, "cpu") is None


@pytest.mark.parametrize("written_by, resumed_with", [(1, 2), (2, 1)])
def test_another_world_size_is_refused_with_exit_2_in_both_directions(tmp_path, written_by, resumed_with):
    write_steps(tmp_path, world_size=written_by)
    for resume in ("latest", 20):
        with pytest.raises(WorldSizeMismatchError) as err:
            load_resume_checkpoint(tmp_path, resume, resumed_with, "cpu")
        message = str(err.value)
        assert err.value.exit_code == ExitCode.BAD_INPUT == 2 and "\n" not in message
        assert f"written by {written_by} process(es) but this run has {resumed_with}" in message
        assert f"--nproc_per_node={written_by}" in message and "--out_dir" in message


# -----------------------------------------------------------------------------
# One run per output directory; memory

def test_a_second_holder_of_an_out_dir_fails_at_once_naming_the_first(tmp_path):
    with exclusive_out_dir(tmp_path / "run", "base_train"):
        holder = json.loads((tmp_path / "run" / (LOCK_NAME + ".holder")).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(OutDirBusyError, match=rf"in use by another run \(base_train pid {os.getpid()} on "
                                                  rf"{re.escape(holder['host'])}") as err:
            with exclusive_out_dir(tmp_path / "run", "mid"):
                pass
        assert err.value.exit_code == 2
    with exclusive_out_dir(tmp_path / "run", "mid"):  # released at the end of the first run
        pass
    assert not (tmp_path / "run" / (LOCK_NAME + ".holder")).exists()


def test_memory_estimate_over_the_available_memory_is_refused_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(training, "available_memory_bytes", lambda device: 2**30)
    check_memory_fits(2**29, torch.device("cpu"), "--device_batch_size", False)
    with pytest.raises(OverMemoryError, match=r"estimated peak memory 3.00 GiB per process exceeds the 1.00 GiB "
                                              r"available on cpu: lower --device_batch_size, or pass "
                                              r"--allow_over_memory") as err:
        check_memory_fits(3 * 2**30, torch.device("cpu"), "--device_batch_size", False)
    assert err.value.exit_code == 2
    check_memory_fits(3 * 2**30, torch.device("cpu"), "--device_batch_size", True)
    assert "going ahead (--allow_over_memory)" in capsys.readouterr().out


def test_available_cpu_memory_is_shared_by_the_local_processes(monkeypatch):
    one = training.available_memory_bytes(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    four = training.available_memory_bytes(torch.device("cpu"))
    assert one > 2**26 and abs(four - one // 4) < one // 8  # the machine's free memory moves a little meanwhile


# -----------------------------------------------------------------------------
# Two horizons

@pytest.mark.parametrize("values, names", [
    ({"num_iterations": 5, "target_flops": 1e18}, ("--num_iterations=5", "--target_flops=1e+18")),
    ({"num_iterations": 5, "target_param_data_ratio": 10}, ("--num_iterations=5", "--target_param_data_ratio=10")),
    ({"target_flops": 1e18, "target_param_data_ratio": 8}, ("--target_flops=1e+18", "--target_param_data_ratio=8")),
])
def test_two_training_horizons_are_an_error_naming_both(values, names):
    with pytest.raises(ConfigError) as err:
        build_config(BaseTrainConfig, values)
    assert all(name in str(err.value) for name in names) and err.value.exit_code == 2


def test_one_horizon_over_the_default_ratio_and_every_preset_validate():
    for values in ({"num_iterations": 5}, {"target_flops": 1e18}, {"target_param_data_ratio": 10},
                   {"num_iterations": 5, "target_param_data_ratio": -1}, {"num_iterations": 5, "target_flops": -1}):
        cfg = build_config(BaseTrainConfig, values)
        assert build_config(BaseTrainConfig, cfg.model_dump()) == cfg  # a config copied field by field too
    for name, preset in PRESETS.items():
        cfg = build_config(BaseTrainConfig, preset["base_train"])
        # `nanopipe run --preset d12 --base_train.num_iterations=100`: the preset's default ratio yields
        overridden = build_config(BaseTrainConfig, {**cfg.model_dump(), "num_iterations": 100})
        assert overridden.num_iterations == 100, name


# -----------------------------------------------------------------------------
# The stages

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    build_tokenizer(root / "tokenizer")
    build_shards(root / "data", row_group_docs=8)
    chat_tok = build_chat_tokenizer(root / "chat_tokenizer")
    write_base_checkpoint(root / "base" / "d2", root / "chat_tokenizer", chat_tok.get_vocab_size())
    return root


def base_flags(inputs: Path, out_dir: Path, **overrides) -> list[str]:
    return tiny_model_flags(tokenizer_dir=inputs / "tokenizer", data_dir=inputs / "data", out_dir=out_dir,
                            device_type="cpu", **overrides)


def sft_flags(inputs: Path, out_dir: Path, **overrides) -> list[str]:
    tiny = dict(source="base", builtin_size=16, device_batch_size=4, target_examples_per_step=8, eval_every=-1,
                eval_steps=1, eval_metrics_every=-1, num_iterations=5)   # 4 optimizer steps
    return tiny_chat_flags(inputs / "base" / "d2", out_dir, **{**tiny, **overrides})


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_base_train_resumes_past_a_damaged_checkpoint_and_refuses_busy_dirs_and_other_world_sizes(
        inputs, tmp_path, capsys):
    out = tmp_path / "run"
    base_train.main(base_flags(inputs, out, num_iterations=4, save_every=2))
    assert list_steps(out) == [2, 4]
    capsys.readouterr()

    truncate(model_path(out, 4))  # killed while the disk was full, say
    base_train.main(base_flags(inputs, out, num_iterations=4, save_every=2, resume_from_step="latest"))
    log = capsys.readouterr().out
    assert re.search(r"skipped damaged checkpoint\(s\) in .*: step 4 \(model_000004.pt.*\); resuming from step 2", log)
    assert "Resuming from step 2" in log and torch.load(model_path(out, 4), weights_only=True)

    with exclusive_out_dir(out, "base_train"):  # a run still going in this directory
        assert exit_code(base_train.main, base_flags(inputs, out, num_iterations=4)) == 2
    assert re.search(rf"OutDirBusyError: {re.escape(str(out))} is in use by another run \(base_train pid "
                     rf"{os.getpid()} ", capsys.readouterr().err)

    # as if written by two processes, but the optimizer files hold one process's state: re-sharding refuses it
    shutil.copy(optim_path(out, 4, 0), optim_path(out, 4, 1))
    meta = json.loads(meta_path(out, 4).read_text())
    meta["loader_state"] = {"world_size": 2, "ranks": meta["loader_state"]["ranks"] * 2}
    meta_path(out, 4).write_text(json.dumps(meta))
    assert exit_code(base_train.main, base_flags(inputs, out, num_iterations=4, resume_from_step="latest")) == 2
    err = capsys.readouterr().err
    assert "ReshardError" in err and "gathered from 2 rank(s)" in err and len(err.strip().splitlines()) == 1


def test_base_train_refuses_a_run_over_the_memory_before_training(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "available_memory_bytes", lambda device: 2**20)
    out = tmp_path / "run"
    assert exit_code(base_train.main, base_flags(inputs, out, num_iterations=1)) == 2
    err = capsys.readouterr().err
    assert "OverMemoryError: estimated peak memory" in err and "--device_batch_size" in err
    assert list_steps(out) == []
    base_train.main(base_flags(inputs, out, num_iterations=1, allow_over_memory="true"))
    assert "going ahead (--allow_over_memory)" in capsys.readouterr().out and list_steps(out) == [1]


def test_chat_sft_resumes_past_a_damaged_optimizer_and_refuses_busy_dirs_and_memory(
        inputs, tmp_path, home, monkeypatch, capsys):
    out = tmp_path / "sft"
    chat_sft.main(sft_flags(inputs, out, save_every=2))
    assert list_steps(out) == [2, 4]
    capsys.readouterr()

    optim_path(out, 4, 0).write_bytes(b"garbage")
    chat_sft.main(sft_flags(inputs, out, save_every=2, resume_from_step="latest"))
    log = capsys.readouterr().out
    assert re.search(r"skipped damaged checkpoint\(s\) in .*: step 4 \(optim_000004_rank0.pt.*\); resuming from "
                     r"step 2", log) and "Resuming from step 2" in log

    with exclusive_out_dir(out, "sft"):
        assert exit_code(chat_sft.main, sft_flags(inputs, out)) == 2
    assert "OutDirBusyError" in capsys.readouterr().err

    monkeypatch.setattr(training, "available_memory_bytes", lambda device: 2**20)
    assert exit_code(chat_sft.main, sft_flags(inputs, tmp_path / "other")) == 2
    assert "OverMemoryError: estimated peak memory" in capsys.readouterr().err
