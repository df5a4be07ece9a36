"""
Where the time of one base-training step goes on CPU, at bench_base_train.py's tiny config (d4, width 256,
seq 128, 8 rows x 2 micro-steps = 2048 tokens, vocab 2048), as a table of ms per step and percent.

    python bench/profile_step.py                                   # as base_train runs on CPU (eager)
    python bench/profile_step.py --cpu_matmul_precision=ieee       # torch's default float32 matmuls
    python bench/profile_step.py --steps=20 --threads=2

The step is the training loop's (nanopipe.stages.base_train.Trainer.train_step): batches from the real
BestFitLoader over real shards (tinyshakespeare from the `../shared` folder beside the repo, else the builtin
corpus, tokenised by a BPE trained on it), forward + backward per micro-step, Muon + AdamW, zero_grad, the
loss's .item(). A single process has no all-reduce.

Sections are timed in CPU time of the training thread (time.thread_time), not wall time, so that other work
on a shared machine does not land in them: forward parts around the model's attention and MLP modules and the
LM head + loss, backward parts inside the backward of the hand-fused autograd functions of nanopipe.gpt,
Newton-Schulz inside Muon. "embedding + norms" and "other backward nodes" are what their pass spends outside
the named parts; "Python and other" is the step's CPU time less every named section (interpreter overhead,
autograd bookkeeping, allocation). The loader's producer thread runs beside the step; its CPU time per step
is printed apart, as is the step's wall time (which a busy machine inflates).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import nanopipe.gpt as gpt  # noqa: E402
import nanopipe.optim as optim  # noqa: E402
from bench_base_train import CORPORA, SHAKESPEARE, prepare_inputs  # noqa: E402
from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.configs.base import REFERENCE_BATCH_TOKENS  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.data import select_shards  # noqa: E402
from nanopipe.dataloader import BestFitLoader  # noqa: E402
from nanopipe.gpt import GPT, build_model_config  # noqa: E402
from nanopipe.optim import muon_momentum  # noqa: E402
from nanopipe.training import cpu_matmul_precision, keep_freed_memory_for_reuse  # noqa: E402

# the hand-fused autograd functions whose backward is timed, by section
BACKWARD_SECTIONS = {
    "SharedInputLinearsFunction": "backward: attention", "RotaryFunction": "backward: attention",
    "SmallCausalAttentionFunction": "backward: attention", "MLPFunction": "backward: MLP",
    "LinearSoftcapCrossEntropyFunction": "backward: LM head + loss", "RMSNormFunction": "backward: norms",
}
ROWS = ["loader (waiting for the next batch)", "forward: embedding + norms", "forward: attention", "forward: MLP",
        "forward: LM head + loss", "backward: attention", "backward: MLP", "backward: LM head + loss",
        "backward: norms", "backward: other nodes (residual adds, embedding)", "optimizer: Muon momentum + update",
        "optimizer: Muon Newton-Schulz", "optimizer: AdamW", "zero_grad", "loss .item()"]


# The stage settings this bench takes, as base_train and tok_train define them, and the bench's scale
STAGE_FLAGS = [(BaseTrainConfig, ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size",
                                  "total_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr",
                                  "cpu_matmul_precision")),
               (TokTrainConfig, ("vocab_size",))]
BENCH_SCALE = dict(depth=4, head_dim=64, max_seq_len=128, device_batch_size=8, total_batch_size=2048, vocab_size=2048)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and the stage settings, in one namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup_steps)")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (thread CPU time counts the "
                                                            "training thread only: keep 1)")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training text (default: tinyshakespeare where ../shared has it, else builtin)")
    p.add_argument("--workdir", type=str, default=None, help="prepared inputs are kept here (default: a temp dir)")
    args, stage = parse_bench_flags(p, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    if args.corpus is None:
        args.corpus = "tinyshakespeare" if SHAKESPEARE.is_file() else "builtin"
    return argparse.Namespace(**vars(args), **stage.model_dump())


class Sections:
    """Milliseconds of training-thread CPU time by section, summed over the timed steps."""

    def __init__(self):
        self.ms: collections.Counter = collections.Counter()
        self.on = False

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.thread_time()
        try:
            yield
        finally:
            if self.on:
                self.ms[name] += 1000 * (time.thread_time() - t0)

    def wrap(self, fn, name: str):
        def timed_fn(*args, **kwargs):
            with self.timed(name):
                return fn(*args, **kwargs)
        return timed_fn


def instrument(model: GPT, sections: Sections) -> None:
    """Time the model's parts: module forwards, the fused functions' backwards, Newton-Schulz."""
    for block in model.transformer.h:
        block.attn.forward = sections.wrap(block.attn.forward, "forward: attention")
        block.mlp.forward = sections.wrap(block.mlp.forward, "forward: MLP")
    # module globals that GPT.forward and Muon call at run time
    gpt.softcapped_cross_entropy = sections.wrap(gpt.softcapped_cross_entropy, "forward: LM head + loss")
    optim.orthogonalize = sections.wrap(optim.orthogonalize, "optimizer: Muon Newton-Schulz")
    for cls_name, section in BACKWARD_SECTIONS.items():
        cls = getattr(gpt, cls_name)
        cls.backward = staticmethod(sections.wrap(cls.backward, section))


def train_step(model, optimizers, loader, batch, grad_accum: int, step: int, sections: Sections):
    """Trainer.train_step's work, in sections; returns the next batch."""
    loss_sum = torch.zeros(())
    for _ in range(grad_accum):
        inputs, targets = batch
        with sections.timed("forward (all)"):
            loss = model(inputs, targets)
        loss_sum += loss.detach()
        with sections.timed("backward (all)"):
            (loss / grad_accum).backward()
        with sections.timed("loader (waiting for the next batch)"):
            batch = next(loader)
    adamw, muon = optimizers
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step)
    with sections.timed("optimizer: AdamW"):
        adamw.step()
    with sections.timed("optimizer: Muon (all)"):
        muon.step()
    with sections.timed("zero_grad"):
        model.zero_grad(set_to_none=True)
    with sections.timed("loss .item()"):
        (loss_sum / grad_accum).item()
    return batch


def table(ms: collections.Counter, steps: int, step_ms: float) -> dict[str, float]:
    """ms per step by row (named parts, the remainders of each pass, and Python and other)."""
    per = {k: v / steps for k, v in ms.items()}
    out = {row: per.get(row, 0.0) for row in ROWS}
    out["optimizer: Muon momentum + update"] = per["optimizer: Muon (all)"] - out["optimizer: Muon Newton-Schulz"]
    forward_parts = ("forward: attention", "forward: MLP", "forward: LM head + loss")
    out["forward: embedding + norms"] = per["forward (all)"] - sum(out[k] for k in forward_parts)
    backward_parts = sorted(set(BACKWARD_SECTIONS.values()))
    out["backward: other nodes (residual adds, embedding)"] = per["backward (all)"] - sum(out[k] for k in backward_parts)
    out["Python and other (step CPU less the above)"] = step_ms - sum(out.values())
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    with cpu_matmul_precision(args.cpu_matmul_precision) as matmul:
        profile(args, matmul)


def profile(args, matmul: str) -> None:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="profile_step_"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir, _, tok = prepare_inputs(work, args.vocab_size, args.corpus)
    torch.manual_seed(42)
    config = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, tok.get_vocab_size())
    model = GPT.create(config, "cpu")
    lr_scale = (args.total_batch_size / REFERENCE_BATCH_TOKENS) ** 0.5  # as base_train
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_scale,
                                        embedding_lr=args.embedding_lr * lr_scale, matrix_lr=args.matrix_lr * lr_scale)
    loader = BestFitLoader(tok, select_shards(data_dir).train, args.device_batch_size, args.max_seq_len)
    loader_clock = time.pthread_getcpuclockid(loader._thread.ident)
    grad_accum = args.total_batch_size // (args.device_batch_size * args.max_seq_len)
    sections = Sections()
    instrument(model, sections)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}; "
          f"d{args.depth} width {config.n_embd}, seq {args.max_seq_len}, {args.device_batch_size} rows x {grad_accum} "
          f"micro-steps, vocab {config.vocab_size}, eager; float32 matmuls {matmul}")

    batch = next(loader)
    cpu, wall = [], []
    for step in range(args.warmup_steps + args.steps):
        sections.on = step >= args.warmup_steps
        if step == args.warmup_steps:
            loader_cpu0 = time.clock_gettime(loader_clock)
        t0, c0 = time.perf_counter(), time.thread_time()
        batch = train_step(model, optimizers, loader, batch, grad_accum, step, sections)
        if sections.on:
            cpu.append(1000 * (time.thread_time() - c0))
            wall.append(1000 * (time.perf_counter() - t0))
    loader_ms = 1000 * (time.clock_gettime(loader_clock) - loader_cpu0) / args.steps
    loader.close()
    step_ms = sum(cpu) / len(cpu)
    print(f"\nstep: {step_ms:.1f} ms of CPU (mean of {args.steps}; {args.total_batch_size / step_ms * 1000:,.0f} tokens "
          f"per CPU-second), wall median {statistics.median(wall):.1f} ms at load {os.getloadavg()[0]:.2f}\n")
    print(f"{'section (training thread CPU time)':<52}{'ms/step':>9}{'%':>7}")
    for name, ms in table(sections.ms, args.steps, step_ms).items():
        print(f"{name:<52}{ms:>9.2f}{100 * ms / step_ms:>7.1f}")
    print(f"{'all-reduce of the gradients (none in one process)':<52}{0.0:>9.2f}{0.0:>7.1f}")
    print(f"{'step':<52}{step_ms:>9.2f}{100.0:>7.1f}")
    print(f"{'loader thread, beside the step (not in the step)':<52}{loader_ms:>9.2f}{100 * loader_ms / step_ms:>7.1f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
