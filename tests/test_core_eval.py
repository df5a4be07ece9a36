"""CORE: the bundle format, prompt rendering, scoring (an oracle scores 1, a know-nothing model scores chance),
and the base_eval stage on a real checkpoint."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from nanopipe.checkpoint import save_checkpoint
from nanopipe.core_eval import (SUBSAMPLE_SEED, EvalBundleError, centered, crop_to_context, evaluate_core,
                                find_eval_bundle, load_bundle, load_task_data, pick_fewshot, render_prompts,
                                tokenize_example)
from nanopipe.gpt import GPT, build_model_config
from nanopipe.stages import base_eval
from nanopipe.tokenizer import Tokenizer
from tests.fixtures.tiny_corpus import EVAL_BUNDLE, build_shards, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    """A small BPE trained on the bundle's own text (no shared data needed)."""
    texts = [p.read_text() for p in sorted((EVAL_BUNDLE / "eval_data").rglob("*.jsonl"))]
    return Tokenizer.train_from_iterator(texts * 3, vocab_size=400)


def test_fixture_bundle_loads_in_dclm_layout():
    tasks = load_bundle(EVAL_BUNDLE)
    assert [(t.label, t.task_type, t.num_fewshot, t.random_baseline) for t in tasks] == [
        ("tiny_choice", "multiple_choice", 1, 25.0),
        ("tiny_schema", "schema", 0, 50.0),
        ("tiny_facts", "language_modeling", 2, 0.0),
    ]
    assert tasks[2].continuation_delimiter == "\nAnswer: "
    assert all(len(load_task_data(EVAL_BUNDLE, t)) == 6 for t in tasks)


def test_prompts_render_few_shot_examples_then_the_item():
    shot = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    item = {"query": "Q2", "choices": ["c", "d"], "gold": 0}
    assert render_prompts("multiple_choice", item, " ", [shot]) == ["Q1 b\n\nQ2 c", "Q1 b\n\nQ2 d"]
    shot = {"context_options": ["x1", "x2"], "continuation": "y", "gold": 0}
    item = {"context_options": ["c1", "c2"], "continuation": "z", "gold": 1}
    assert render_prompts("schema", item, " ", [shot]) == ["x1 y\n\nc1 z", "x1 y\n\nc2 z"]
    shot = {"context": " What? ", "continuation": "this"}
    item = {"context": "Why? ", "continuation": "that"}
    assert render_prompts("language_modeling", item, "\nA: ", [shot]) == [
        "What?\nA: this\n\nWhy?\nA:", "What?\nA: this\n\nWhy?\nA: that"]
    with pytest.raises(ValueError, match="unsupported task type 'essay'"):
        render_prompts("essay", item, " ", [])


def test_scored_spans_cover_exactly_the_continuations(tok):
    rows, starts, ends = tokenize_example("multiple_choice", ["Q: sky is blue", "Q: sky is green"], tok)
    for row, s, e, word in zip(rows, starts, ends, (" blue", " green")):
        assert word.endswith(tok.decode(row[s:e]).strip()) and e == len(row)
    rows, starts, ends = tokenize_example("schema", ["It rained, so it is wet", "It shone, so it is wet"], tok)
    assert all(tok.decode(r[s:e]).endswith("it is wet") for r, s, e in zip(rows, starts, ends))
    rows, starts, ends = tokenize_example("language_modeling", ["Answer:", "Answer: honey"], tok)
    assert len(rows) == 1 and tok.decode(rows[0][starts[0]:ends[0]]) == " honey"


def test_crop_keeps_the_end_and_shifts_the_spans():
    rows, starts, ends = crop_to_context([list(range(10)), list(range(6))], [7, 4], [10, 6], max_len=5)
    assert rows == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]] and starts == [2, 3] and ends == [5, 5]
    with pytest.raises(AssertionError, match="exceeds max_len=3"):
        crop_to_context([list(range(10))], [7], [10], max_len=3)


class Oracle(torch.nn.Module):
    """Predicts the next token of whichever gold prompt the row is a prefix of; uniform elsewhere."""

    def __init__(self, gold_rows: list[list[int]], vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.next = {tuple(row[:i + 1]): row[i + 1] for row in gold_rows for i in range(len(row) - 1)}

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return logits


class Contrarian(Oracle):
    """Makes the true next token of every gold prompt very unlikely: always wrong, below chance."""

    def forward(self, idx):
        return -super().forward(idx)


def gold_rows(tok) -> list[list[int]]:
    rows = []
    for task in load_bundle(EVAL_BUNDLE):
        data = load_task_data(EVAL_BUNDLE, task)
        random.Random(SUBSAMPLE_SEED).shuffle(data)  # the order evaluate_core uses
        for idx, item in enumerate(data):
            prompts = render_prompts(task.task_type, item, task.continuation_delimiter,
                                     pick_fewshot(data, idx, task.num_fewshot))
            gold = prompts[1] if task.task_type == "language_modeling" else prompts[item["gold"]]
            rows.append(tok.encode(gold, prepend=tok.get_bos_token_id()))
    return rows


def test_an_oracle_scores_one_on_every_task(tok):
    out = evaluate_core(Oracle(gold_rows(tok), tok.get_vocab_size()), tok, "cpu", EVAL_BUNDLE)
    assert out["results"] == {"tiny_choice": 1.0, "tiny_schema": 1.0, "tiny_facts": 1.0}
    assert out["core_metric"] == pytest.approx(1.0)


def test_a_contrarian_scores_zero_and_centres_below_chance(tok):
    out = evaluate_core(Contrarian(gold_rows(tok), tok.get_vocab_size()), tok, "cpu", EVAL_BUNDLE)
    assert out["results"] == {"tiny_choice": 0.0, "tiny_schema": 0.0, "tiny_facts": 0.0}
    # centred accuracy: (acc - baseline) / (1 - baseline), baselines 25%, 50%, 0%
    assert out["centered_results"] == pytest.approx({"tiny_choice": -1 / 3, "tiny_schema": -1.0, "tiny_facts": 0.0})
    assert out["core_metric"] == pytest.approx(-4 / 9)


def test_max_per_task_takes_a_fixed_subset(tok, capsys):
    model = Oracle(gold_rows(tok), tok.get_vocab_size())
    first = evaluate_core(model, tok, "cpu", EVAL_BUNDLE, max_per_task=3)
    assert first == evaluate_core(model, tok, "cpu", EVAL_BUNDLE, max_per_task=3)
    assert capsys.readouterr().out.count(", 3 examples)") == 6
    assert all(round(acc * 3, 4) in (0, 1, 2, 3) for acc in first["results"].values())


def test_a_real_model_gets_a_core_score(tok):
    torch.manual_seed(0)
    model = GPT.create(build_model_config(2, 32, 32, 32, tok.get_vocab_size()), device="cpu").eval()
    out = evaluate_core(model, tok, "cpu", EVAL_BUNDLE)  # sequence_len 32: long prompts are cropped
    assert set(out["results"]) == {"tiny_choice", "tiny_schema", "tiny_facts"}
    assert all(0.0 <= acc <= 1.0 for acc in out["results"].values())
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)


def test_bundle_problems_name_the_file(tmp_path):
    assert find_eval_bundle(tmp_path / "absent") is None
    bundle = tmp_path / "bundle"
    shutil.copytree(EVAL_BUNDLE, bundle)
    assert find_eval_bundle(bundle) == bundle
    (bundle / "eval_data" / "world_knowledge" / "tiny_facts.jsonl").unlink()
    with pytest.raises(EvalBundleError, match="tiny_facts.jsonl does not exist"):
        evaluate_core(Oracle([], 300), Tokenizer.train_from_iterator(["ab"], 300), "cpu", bundle)
    csv = bundle / "eval_meta_data.csv"
    csv.write_text("\n".join(line for line in csv.read_text().splitlines() if not line.startswith("tiny_schema")))
    with pytest.raises(EvalBundleError, match="eval_meta_data.csv has no row for task 'tiny_schema'"):
        load_bundle(bundle)
    (bundle / "core.yaml").write_text("icl_tasks:\n- label: x\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n"
                                      "  icl_task_type: essay\n")
    with pytest.raises(EvalBundleError, match="icl_task_type 'essay'"):
        load_bundle(bundle)


# -----------------------------------------------------------------------------
# The base_eval stage

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An initialised tiny GPT saved as a base checkpoint, with its tokenizer and shards."""
    root = tmp_path_factory.mktemp("base_eval")
    tok_dir = root / "tokenizer"
    tok = build_tokenizer(tok_dir)
    build_shards(root / "data")
    torch.manual_seed(0)
    model = GPT.create(build_model_config(2, 32, 32, 64, tok.get_vocab_size()), device="cpu")
    save_checkpoint(root / "ckpt", 12, model.state_dict(), None,
                    {"model_config": model.config.__dict__, "tokenizer_dir": str(tok_dir)})
    return root


def test_base_eval_stage_reports_core_bpb_and_samples(checkpoint, tmp_path, one_thread):
    out = tmp_path / "eval"
    base_eval.main([f"--checkpoint_dir={checkpoint / 'ckpt'}", f"--eval_bundle_dir={EVAL_BUNDLE}",
                    f"--data_source=local", f"--data_dir={checkpoint / 'data'}", "--device_batch_size=2",
                    "--split_tokens=256", f"--out_dir={out}", "--device_type=cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 12 and set(metrics["core_results"]) == {"tiny_choice", "tiny_schema", "tiny_facts"}
    assert 0 < metrics["val_bpb"] < 20 and 0 < metrics["train_bpb"] < 20
    assert len(metrics["samples"]) == len(base_eval.SAMPLE_PROMPTS) and len(metrics["unconditioned_samples"]) == 4
    assert metrics["samples"][0].startswith(base_eval.SAMPLE_PROMPTS[0])
    assert (out / "core.csv").read_text().splitlines()[-1].startswith("CORE")


def test_base_eval_skips_core_without_a_bundle(checkpoint, tmp_path, capsys, one_thread):
    out = tmp_path / "eval"
    base_eval.main([f"--checkpoint_dir={checkpoint / 'ckpt'}", f"--eval_bundle_dir={tmp_path / 'none'}",
                    "--eval=core", f"--out_dir={out}", "--device_type=cpu"])
    assert "WARNING: no CORE eval bundle" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["core_metric"] is None


def test_base_eval_flag_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        base_eval.main(["--eval=core,vibes"])
    assert exc.value.code == 2 and "--eval" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Bits per byte

def test_bits_per_byte_skips_special_and_ignored_targets():
    from nanopipe.loss_eval import evaluate_bpb

    class FixedLoss(torch.nn.Module):
        """Loss of a target = its token id in nats (so every position's contribution is known)."""

        def forward(self, idx, targets, loss_reduction="mean"):
            assert loss_reduction == "none"
            return torch.where(targets >= 0, targets.float(), torch.nan).reshape(-1)

    token_bytes = torch.tensor([1, 2, 3, 0], dtype=torch.int32)   # token 3 is special: 0 bytes
    targets = torch.tensor([[1, 2, 3, -1], [0, 3, 2, 1]])
    batches = [(torch.zeros_like(targets), targets)] * 2
    bpb = evaluate_bpb(FixedLoss(), iter(batches), steps=2, token_bytes=token_bytes)
    # counted per batch: targets 1, 2 (row 0) and 0, 2, 1 (row 1): nats 1+2+0+2+1 = 6, bytes 2+3+1+3+2 = 11
    assert bpb == pytest.approx((2 * 6) / (2 * 11) / torch.log(torch.tensor(2.0)).item())
