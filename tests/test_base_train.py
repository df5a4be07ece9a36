"""base_train end to end on CPU: seed flags, errors before work, dry run, exact resume, final checkpoint before
final evaluation, NaN exit code, and torchrun with two processes matching one with twice the accumulation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanopipe.checkpoint import find_last_step, list_steps, load_checkpoint, meta_path, optim_path
from nanopipe.configs.base import COMPILE_MIN_STEPS, ConfigError, build_config, compile_decision
from nanopipe.configs.base_train import BaseTrainConfig
from nanopipe.stages import base_train
from nanopipe.exit_codes import ExitCode
from tests.fixtures.tiny_corpus import (EVAL_BUNDLE, build_shards, build_tokenizer, equal_length_documents,
                                        tiny_model_flags, write_shard)

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*\| loss: ([\d.]+) \(this step ([\d.]+)\)", re.M)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tokenizer and tinyshakespeare shards (the project's own `prepare`), shared by the runs below."""
    root = tmp_path_factory.mktemp("base_train")
    build_tokenizer(root / "tokenizer")
    build_shards(root / "data", row_group_docs=8)
    return root


def flags(inputs: Path, out_dir: Path, **overrides) -> list[str]:
    return tiny_model_flags(tokenizer_dir=inputs / "tokenizer", data_dir=inputs / "data", out_dir=out_dir,
                            device_type="cpu", **overrides)


def step_losses(text: str) -> dict[int, tuple[float, float]]:
    """{step: (smoothed loss, this step's loss)} from the log lines."""
    return {int(s): (float(smooth), float(raw)) for s, smooth, raw in STEP_LINE.findall(text)}


def subprocess_env(home: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", NANOPIPE_HOME=str(home), PYTHONPATH=str(REPO))


# -----------------------------------------------------------------------------
# Flags

def test_defaults_are_the_seeds():
    cfg = build_config(BaseTrainConfig, {})
    assert (cfg.depth, cfg.aspect_ratio, cfg.head_dim, cfg.max_seq_len) == (20, 64, 128, 2048)
    assert (cfg.num_iterations, cfg.target_flops, cfg.target_param_data_ratio) == (None, None, 20)
    assert (cfg.device_batch_size, cfg.total_batch_size) == (32, 524288)
    assert (cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay) == (0.3, 0.004, 0.02, 0.0)
    assert (cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac) == (0.0, 0.4, 0.0)
    assert (cfg.eval_every, cfg.eval_tokens, cfg.core_metric_every, cfg.sample_every) == (250, 20 * 524288, 2000, 2000)
    assert (cfg.save_every, cfg.resume_from_step, cfg.plan_only) == (None, None, False)
    assert {"eval_every", "save_every", "resume_from_step", "out_dir"} <= set(BaseTrainConfig.NON_SEMANTIC)
    assert "depth" not in BaseTrainConfig.NON_SEMANTIC


def test_minus_one_means_disabled_and_latest_is_accepted():
    from nanopipe.configs.flags import parse_config as parse_cli
    cfg = parse_cli(BaseTrainConfig, ["--num_iterations=-1", "--save_every=-1", "--target_param_data_ratio=-1",
                                      "--target_flops=1e18", "--resume_from_step=latest", "--eval_every=-1"])
    assert (cfg.num_iterations, cfg.save_every, cfg.target_param_data_ratio, cfg.eval_every) == (None,) * 4
    assert cfg.target_flops == 1e18 and cfg.resume_from_step == "latest"
    assert parse_cli(BaseTrainConfig, ["--resume_from_step=1200"]).resume_from_step == 1200
    assert parse_cli(BaseTrainConfig, ["--resume_from_step=-1"]).resume_from_step is None


@pytest.mark.parametrize("values, needle", [
    ({"total_batch_size": 100_000}, r"--total_batch_size=100000 is not a multiple of .* = 65536 .*try "
                                    r"--total_batch_size=65536 or 131072"),
    ({"total_batch_size": 6 * 2048, "device_batch_size": 4}, r"or --device_batch_size=1 or 2 or 3 or 6"),
    ({"num_iterations": None, "target_param_data_ratio": None}, "no training horizon"),
    ({"warmup_ratio": 0.7, "warmdown_ratio": 0.4}, r"--warmup_ratio \(0.7\) \+ --warmdown_ratio \(0.4\) > 1"),
    ({"eval_tokens": 100}, "--eval_tokens=100 is less than one evaluation batch"),
    ({"head_dim": 33}, "--head_dim=33 must be even"),
    ({"resume_from_step": "soon"}, "--resume_from_step"),
])
def test_bad_flags_are_refused_with_a_reason(values, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(BaseTrainConfig, values)


def test_batch_check_counts_the_ranks_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "3")):
        monkeypatch.setenv(key, value)
    cfg = build_config(BaseTrainConfig, {"device_batch_size": 4, "max_seq_len": 64, "total_batch_size": 512,
                                         "eval_tokens": 4096})
    with pytest.raises(ConfigError, match=r"world size \(3\) = 768 tokens per micro-step; try --total_batch_size=768"):
        base_train.run(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_flag_errors_exit_2_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanopipe.stages.base_train", "--total_batch_size=1000"],
                            capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "--total_batch_size=1000 is not a multiple" in result.stderr


def test_plan_only_prints_the_plan_and_trains_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanopipe.stages.base_train", "--plan_only",
                             f"--out_dir={tmp_path / 'out'}"],
                            capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # d20 defaults: width 20 * 64 = 1280 in 10 heads of 128; 524288 / (32 * 2048) = 8 micro-steps
    assert "20 layers, width 1280, 10 heads of 128" in out and "vocab 32,768" in out
    assert "planning for vocab_size=32768 (tok_train's default)" in out
    assert re.search(r"parameters total\s+: [\d,]+", out) and "FLOPs per token (fwd+bwd)" in out
    assert re.search(r"Iterations: [\d,]+ \(from --target_param_data_ratio=20\)", out)
    assert "gradient accumulation steps: 8" in out
    assert re.search(r"Estimated peak memory per device: [\d.]+ GiB", out)
    assert not (tmp_path / "out").exists() and not (tmp_path / "base_checkpoints").exists()


def test_plan_only_numbers(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path))
    info = base_train.run(build_config(BaseTrainConfig, {"plan_only": True, "depth": 12, "num_iterations": 100,
                                                         "device_batch_size": 16}))
    assert info["num_iterations"] == 100 and info["total_tokens"] == 100 * 524288
    assert info["grad_accum_steps"] == 16 and info["model_config"]["n_embd"] == 768
    mem = info["estimated_peak_memory_bytes"]
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total") and mem["activations"] > mem["weights"]


def test_compile_is_decided_by_device_and_run_length():
    decide = compile_decision
    assert decide(None, "cpu", 10**6)[0] is False  # eager with the hand-fused kernels is the faster CPU step
    assert decide(None, "cuda", COMPILE_MIN_STEPS - 1)[0] is False  # too short to repay compilation
    on, why = decide(None, "cuda", COMPILE_MIN_STEPS)
    assert on and why.startswith("auto")
    assert decide(True, "cpu", 1) == (True, "--compile=true") and decide(False, "cuda", 10**6)[0] is False


def test_cpu_matmul_precision_is_set_for_the_run_and_restored():
    from nanopipe.training import cpu_matmul_precision
    before = torch.backends.mkldnn.matmul.fp32_precision
    with cpu_matmul_precision("bf16") as used:
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16" and used.startswith("bf16")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with cpu_matmul_precision("auto") as used:
        assert used.startswith("bf16" if native_bf16 else "ieee"), used
    with pytest.raises(ValueError, match="cpu_matmul_precision"):
        build_config(BaseTrainConfig, {"cpu_matmul_precision": "fp8"})


# -----------------------------------------------------------------------------
# Training runs

def test_resume_gives_the_same_loss_trace_as_one_straight_run(inputs, tmp_path, capsys, one_thread):
    """8 steps straight (checkpoint at 4) vs. 4 steps + resume from that checkpoint in a fresh directory."""
    common = dict(num_iterations=8, save_every=4, eval_every=4, core_metric_every=4, sample_every=8,
                  eval_bundle_dir=EVAL_BUNDLE, matrix_lr=0.3, embedding_lr=3, unembedding_lr=0.06)
    straight_dir = tmp_path / "straight"
    base_train.main(flags(inputs, straight_dir, **common))
    straight_log = capsys.readouterr().out
    straight = step_losses(straight_log)
    assert sorted(straight) == list(range(8)) and list_steps(straight_dir) == [4, 8]

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for path in straight_dir.glob("*_000004*"):
        shutil.copy(path, resumed_dir)
    base_train.main(flags(inputs, resumed_dir, resume_from_step="latest", **common))
    resumed_log = capsys.readouterr().out
    assert "Resuming from step 4" in resumed_log
    assert "torch.compile: off (auto: on cpu" in straight_log and "float32 matmuls on CPU: " in straight_log
    resumed = step_losses(resumed_log)
    assert sorted(resumed) == [4, 5, 6, 7]
    for step, (smooth, raw) in resumed.items():
        assert raw == pytest.approx(straight[step][1], rel=1e-5), step
        assert smooth == pytest.approx(straight[step][0], rel=1e-5), step  # the EMA state came back too
    assert straight[7][1] < straight[0][1]  # and it learns

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight_dir, resumed_dir))
    assert b["val_bpb"] == pytest.approx(a["val_bpb"], rel=1e-5) and a["core_metric"] is not None
    # step 0's evaluation (random weights) is the "before" of the report card, kept across the resume
    assert a["initial_val_bpb"] > a["val_bpb"] and b["initial_val_bpb"] == a["initial_val_bpb"]
    assert b["core_metric"] == pytest.approx(a["core_metric"])
    assert len(a["samples"]) == 7 and a["total_tokens"] == 8 * 512
    final_a, _, meta_a = load_checkpoint(straight_dir, 8, "cpu")
    final_b, _, _ = load_checkpoint(resumed_dir, 8, "cpu")
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=1e-5, atol=1e-7)
    # the final meta was completed with the final evaluations after the weights were saved
    assert meta_a["val_bpb"] == a["val_bpb"] and meta_a["loader_state"]["world_size"] == 1


def test_final_checkpoint_is_written_before_the_final_evaluation(inputs, tmp_path, monkeypatch, capsys, one_thread):
    def crash(*args, **kwargs):
        raise RuntimeError("evaluation blew up")

    monkeypatch.setattr(base_train, "evaluate_split_bpb", crash)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation blew up"):  # eval_every=-1: only the final evaluation
        base_train.main(flags(inputs, out, num_iterations=3, resume_from_step="latest"))
    assert "--resume_from_step=latest: no complete checkpoint" in capsys.readouterr().out  # so it started fresh
    assert find_last_step(out, world_size=1) == 3 and optim_path(out, 3, 0).is_file()
    assert not (out / "metrics.json").exists()


def test_non_finite_loss_fails_fast_with_exit_code_3(inputs, tmp_path, monkeypatch, capsys, one_thread):
    real = base_train.lr_multiplier
    monkeypatch.setattr(base_train, "lr_multiplier", lambda step, *a: float("nan") if step >= 2 else real(step, *a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        base_train.main(flags(inputs, out, num_iterations=6, save_every=2, core_metric_every=2,
                              eval_bundle_dir=tmp_path / "no_bundle"))
    assert exc.value.code == ExitCode.DIVERGED == 3
    captured = capsys.readouterr()
    assert "WARNING: no CORE eval bundle" in captured.out
    assert re.search(r"NonFiniteLossError: training loss is nan at step 3", captured.err)
    assert list_steps(out) == [2]  # the checkpoint before the divergence is intact


def test_torchrun_two_processes_match_one_process_with_twice_the_accumulation(inputs, tmp_path):
    """Documents of equal length, longer than a row, in row groups of one micro-batch each: then one process
    reading row groups 0,1,2,... and two ranks reading the even and the odd ones see the same micro-batches
    in every step, and the gradients, losses and evaluations must agree."""
    from nanopipe.tokenizer import get_tokenizer
    tok = get_tokenizer(inputs / "tokenizer")
    docs = equal_length_documents(tok, num_docs=4 * 24 + 4 * 4, num_tokens=80)
    data = tmp_path / "data"
    write_shard(data / "shard_00000.parquet", docs[:96], row_group_docs=4)
    write_shard(data / "val.parquet", docs[96:], row_group_docs=4)
    # learning rates high enough that the loss moves ~0.1 per step: ranks that failed to average their
    # gradients would drift apart from the single process by far more than the tolerance
    common = dict(num_iterations=5, eval_every=5, eval_tokens=512, core_metric_every=5, eval_bundle_dir=EVAL_BUNDLE,
                  matrix_lr=0.3, embedding_lr=3, unembedding_lr=0.06)
    args = lambda out: tiny_model_flags(tokenizer_dir=inputs / "tokenizer", data_dir=data, out_dir=out,
                                        device_type="cpu", **common)
    env = subprocess_env(tmp_path)
    one = subprocess.run([sys.executable, "-m", "nanopipe.stages.base_train", *args(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "gradient accumulation steps: 2" in one.stdout
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "nanopipe.stages.base_train", *args(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "World size 2, gradient accumulation steps: 1" in two.stdout

    losses_one, losses_two = step_losses(one.stdout), step_losses(two.stdout)
    assert sorted(losses_one) == sorted(losses_two) == list(range(5))
    for step in range(5):
        assert losses_two[step][1] == pytest.approx(losses_one[step][1], rel=1e-5), step
    assert losses_one[4][1] < losses_one[0][1] - 0.1
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["world_size"] == 2 and m2["val_bpb"] == pytest.approx(m1["val_bpb"], rel=1e-5)
    assert m2["core_metric"] == pytest.approx(m1["core_metric"], abs=1e-6)
    # sharded optimizer state: one file per rank; loader state of both ranks in the meta
    assert optim_path(tmp_path / "two", 5, 1).is_file()
    meta = json.loads(meta_path(tmp_path / "two", 5).read_text())
    assert [s["rank"] for s in meta["loader_state"]["ranks"]] == [0, 1]
