"""Checkpoints: atomic files, complete steps only, models rebuilt exactly, errors that name the directory."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nanopipe.checkpoint import (CheckpointError, build_model, find_largest_model, find_last_step, list_steps,
                                 load_checkpoint, load_model, meta_path, model_path, optim_path, save_checkpoint)
from nanopipe.gpt import GPT, build_model_config
from tests.fixtures.tiny_corpus import VOCAB_SIZE, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(path)
    return path


def tiny_model(vocab_size=VOCAB_SIZE, seed=0):
    torch.manual_seed(seed)
    return GPT.create(build_model_config(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64,
                                         vocab_size=vocab_size), device="cpu")


def save_trained(ckpt_dir, step, tokenizer_dir, model=None, world_size=1):
    """A model after one optimizer step (so optimizer state exists), saved like base_train does."""
    model = model or tiny_model()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, VOCAB_SIZE, (2, 16))
    model(idx, idx).backward()
    for opt in optimizers:
        opt.step()
    meta = {"model_config": model.config.__dict__, "tokenizer_dir": str(tokenizer_dir), "loop_state": {"x": 1}}
    for rank in range(world_size):
        save_checkpoint(ckpt_dir, step, model.state_dict(), [o.state_dict() for o in optimizers], meta, rank=rank)
    return model, optimizers


def test_round_trip_rebuilds_the_same_model(tmp_path, tokenizer_dir):
    model, optimizers = save_trained(tmp_path, 7, tokenizer_dir)
    model_state, optim_state, meta = load_checkpoint(tmp_path, 7, "cpu", load_optimizer=True)
    assert meta["step"] == 7 and meta["loop_state"] == {"x": 1}
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    assert len(optim_state) == 2 and optim_state[0]["state"]  # AdamW moments travelled
    rebuilt, tok, meta2 = build_model(tmp_path, 7, "cpu", phase="eval")
    assert not rebuilt.training and tok.get_vocab_size() == VOCAB_SIZE and meta2 == meta
    idx = torch.randint(0, VOCAB_SIZE, (2, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(idx), model(idx))


def test_compiled_prefix_and_bf16_are_cleaned_on_cpu(tmp_path, tokenizer_dir):
    model = tiny_model()
    state = {f"_orig_mod.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    meta = {"model_config": model.config.__dict__, "tokenizer_dir": str(tokenizer_dir)}
    save_checkpoint(tmp_path, 1, state, None, meta)
    rebuilt, _, _ = build_model(tmp_path, 1, "cpu", phase="train")
    assert rebuilt.training and rebuilt.lm_head.weight.dtype == torch.float32


def test_files_are_written_atomically(tmp_path, tokenizer_dir, monkeypatch):
    save_trained(tmp_path, 1, tokenizer_dir)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, None, {"model_config": {}})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # the old files untouched, no temporary file left behind


def test_only_complete_steps_count(tmp_path, tokenizer_dir):
    save_trained(tmp_path, 100, tokenizer_dir, world_size=2)
    save_trained(tmp_path, 200, tokenizer_dir, world_size=1)   # rank 1 never wrote its optimizer state
    torch.save({}, model_path(tmp_path, 300))                  # crashed before its meta was written
    assert list_steps(tmp_path) == [100, 200]
    assert find_last_step(tmp_path) == 200
    assert find_last_step(tmp_path, world_size=2) == 100


def test_missing_things_are_named(tmp_path, tokenizer_dir):
    with pytest.raises(CheckpointError, match=f"no complete checkpoint in {tmp_path}"):
        find_last_step(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", 1, "cpu")
    save_trained(tmp_path, 5, tokenizer_dir)
    with pytest.raises(CheckpointError, match=rf"no checkpoint for step 6 in {tmp_path} .*\[5\]"):
        load_checkpoint(tmp_path, 6, "cpu")
    with pytest.raises(CheckpointError, match="optim_000005_rank3.pt"):
        load_checkpoint(tmp_path, 5, "cpu", load_optimizer=True, rank=3)
    meta_path(tmp_path, 5).write_text("{not json")
    with pytest.raises(CheckpointError, match="meta_000005.json is not valid JSON"):
        load_checkpoint(tmp_path, 5, "cpu")


def test_tokenizer_must_match_the_model(tmp_path, tokenizer_dir):
    model = tiny_model(vocab_size=600)
    save_checkpoint(tmp_path, 1, model.state_dict(), None,
                    {"model_config": model.config.__dict__, "tokenizer_dir": str(tokenizer_dir)})
    with pytest.raises(CheckpointError, match="vocab_size=600: wrong tokenizer"):
        build_model(tmp_path, 1, "cpu", phase="eval")


def test_load_model_finds_the_largest_tag_and_last_step(tmp_path, monkeypatch, tokenizer_dir):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path))
    root = tmp_path / "base_checkpoints"
    save_trained(root / "d2", 10, tokenizer_dir)
    deep, _ = save_trained(root / "d12", 20, tokenizer_dir, model=tiny_model(seed=1))
    save_trained(root / "d12", 30, tokenizer_dir, model=deep)
    (root / "notes").mkdir()
    assert find_largest_model(root) == "d12"
    model, _, meta = load_model("base", "cpu", phase="eval")
    assert meta["step"] == 30
    _, _, meta = load_model("base", "cpu", phase="eval", model_tag="d2")
    assert meta["step"] == 10
    _, _, meta = load_model("sft", "cpu", phase="eval", checkpoint_dir=root / "d12", step=20)
    assert meta["step"] == 20
    with pytest.raises(CheckpointError, match="no model checkpoints under .*mid_checkpoints"):
        load_model("mid", "cpu", phase="eval")
    with pytest.raises(ValueError, match="unknown checkpoint source 'nope'"):
        load_model("nope", "cpu", phase="eval")


def test_largest_model_falls_back_to_the_newest_directory(tmp_path):
    for i, tag in enumerate(["alpha", "beta"]):
        (tmp_path / tag).mkdir()
        os.utime(tmp_path / tag, (1000 + i, 1000 + i))
    assert find_largest_model(tmp_path) == "beta"


def test_meta_is_plain_json_with_the_step(tmp_path, tokenizer_dir):
    save_trained(tmp_path, 3, tokenizer_dir)
    meta = json.loads(meta_path(tmp_path, 3).read_text())
    assert meta["step"] == 3 and meta["model_config"]["n_layer"] == 2
    assert optim_path(tmp_path, 3, 0).is_file()
