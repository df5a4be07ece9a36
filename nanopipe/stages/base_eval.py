"""
Evaluate a base model checkpoint: CORE metric, train/val bits per byte, and samples.

Run alone (the last checkpoint of the largest base model under NANOPIPE_HOME, or an explicit one):

    python -m nanopipe.stages.base_eval
    python -m nanopipe.stages.base_eval --checkpoint_dir=DIR --model_step=2000 --eval=core,bpb \
        --max_per_task=100 --split_tokens=524288 --device_batch_size=8

Under torchrun (CORE examples and bpb batches are split across the ranks):

    torchrun --standalone --nproc_per_node=8 -m nanopipe.stages.base_eval --device_batch_size=16

CORE needs DCLM's eval bundle at --eval_bundle_dir (default NANOPIPE_HOME/eval_bundle: core.yaml,
eval_meta_data.csv, eval_data/); without it CORE is skipped with a warning, nothing is downloaded.
Results: metrics.json and core.csv in --out_dir (default NANOPIPE_HOME/base_eval/<tag>_<step>).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nanopipe.checkpoint import load_model, resolve_checkpoint_dir
from nanopipe.common import (atomic_write_text, compute_cleanup, compute_init, get_base_dir, print0,
                             report_progress, write_metrics)
from nanopipe.configs.flags import stage_main
from nanopipe.configs.base_eval import BaseEvalConfig
from nanopipe.core_eval import bundle_missing_message, evaluate_core, find_eval_bundle
from nanopipe.data import ensure_shards
from nanopipe.loss_eval import evaluate_split_bpb
from nanopipe.sampling import SAMPLE_PROMPTS, generate_samples
from nanopipe.tokenizer import get_token_bytes

PROG = "python -m nanopipe.stages.base_eval"


# -----------------------------------------------------------------------------
# Results

def core_csv(results: dict) -> str:
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, accuracy in results["results"].items():
        lines.append(f"{label:<35}, {accuracy:<10.6f}, {results['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {results['core_metric']:<10.6f}")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------

def run(cfg: BaseEvalConfig) -> dict:
    # the inputs a user names, checked before any work: a bad one is one line and exit 2 (nanopipe.exit_codes)
    shards = ensure_shards(cfg) if "bpb" in cfg.eval.split(",") else None
    if cfg.tokenizer_dir:
        get_token_bytes(cfg.tokenizer_dir)  # a missing or corrupt tokenizer directory, named
    rt = compute_init(cfg.device_type, cfg.dtype, cfg.seed)
    try:
        return evaluate(cfg, rt, shards)
    finally:
        compute_cleanup()


def evaluate(cfg: BaseEvalConfig, rt, shards=None) -> dict:
    modes = cfg.eval.split(",")
    ckpt_dir = resolve_checkpoint_dir(cfg.source, cfg.model_tag, cfg.checkpoint_dir)
    model, tokenizer, meta = load_model(cfg.source, rt.device, phase="eval", step=cfg.model_step,
                                        checkpoint_dir=ckpt_dir, tokenizer_dir=cfg.tokenizer_dir)
    step = meta["step"]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else get_base_dir() / "base_eval" / f"{ckpt_dir.name}_{step:06d}"
    autocast_ctx = (torch.amp.autocast(device_type=rt.device_type, dtype=torch.bfloat16)
                    if rt.dtype == torch.bfloat16 else contextlib.nullcontext())
    metrics: dict = {"checkpoint_dir": str(ckpt_dir), "step": step, "evaluations": modes}
    print0(f"Evaluating {ckpt_dir} step {step}: {', '.join(modes)}")

    if "sample" in modes:
        samples, unconditioned = [], []
        if rt.master:
            with autocast_ctx:
                samples = generate_samples(model, tokenizer, SAMPLE_PROMPTS)
                unconditioned = generate_samples(model, tokenizer, [""], max_tokens=64, temperature=1.0,
                                                 num_samples=4, seed=cfg.seed)
            for text in samples + unconditioned:
                print0(f"  sample: {text!r}")
        metrics.update(samples=samples, unconditioned_samples=unconditioned)

    if "bpb" in modes:
        shards = shards or ensure_shards(cfg)
        token_bytes = get_token_bytes(cfg.tokenizer_dir or meta.get("tokenizer_dir"), device=rt.device)
        seq_len = meta["model_config"]["sequence_len"]
        for split, files in (("train", shards.train), ("val", [shards.val])):
            bpb = evaluate_split_bpb(model, tokenizer, files, cfg.device_batch_size, seq_len, cfg.split_tokens, rt,
                                     token_bytes, autocast_ctx)
            metrics[f"{split}_bpb"] = bpb
            print0(f"{split} bpb: {bpb:.6f}")
        report_progress(step=step, total=step, val_bpb=metrics["val_bpb"])

    if "core" in modes:
        bundle_dir = find_eval_bundle(cfg.eval_bundle_dir)
        if bundle_dir is None:
            print0(bundle_missing_message(cfg.eval_bundle_dir))
            metrics["core_metric"] = None
        else:
            core = evaluate_core(model, tokenizer, rt.device, bundle_dir, cfg.max_per_task, autocast_ctx)
            metrics.update(core_metric=core["core_metric"], core_results=core["results"],
                           core_centered_results=core["centered_results"])
            print0(f"CORE metric: {core['core_metric']:.4f}")
            if rt.master:
                atomic_write_text(out_dir / "core.csv", core_csv(core))

    write_metrics(out_dir, metrics)
    print0(f"Wrote {out_dir / 'metrics.json'}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    return stage_main(BaseEvalConfig, run, argv, prog=PROG)


if __name__ == "__main__":
    main()
