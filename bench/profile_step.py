"""
Where the time of one base-training step goes on CPU, at bench_base_train.py's tiny config (d4, width 256,
seq 128, 8 rows x 2 micro-steps = 2048 tokens, vocab 2048), as a table of ms per step and percent.

    python bench/profile_step.py                           # eager (the CPU default)
    python bench/profile_step.py --steps=20 --threads=2    # more steps, two intra-op threads
    python bench/profile_step.py --compile                 # the torch.compile'd model (sections blur: one graph)

The step is the training loop's (nanopipe.stages.base_train.Trainer.train_step): batches from the real
BestFitLoader over real shards (tinyshakespeare from the `../shared` folder beside the repo, else the builtin
corpus, tokenised by a BPE trained on it), forward + backward per micro-step, Muon + AdamW, zero_grad, the
loss's .item(). Sections come from torch.profiler: forward parts are labelled around the model's modules,
backward parts are the autograd nodes of those modules' functions, Muon's Newton-Schulz is labelled inside
the optimizer. "Python and other" is the step's wall time (measured without the profiler) less all the
named sections: interpreter overhead, autograd bookkeeping, allocation. A single process has no all-reduce.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import nanopipe.optim as optim  # noqa: E402
from nanopipe.data import select_shards  # noqa: E402
from nanopipe.dataloader import BestFitLoader  # noqa: E402
from nanopipe.gpt import GPT, build_model_config  # noqa: E402
from nanopipe.optim import muon_momentum  # noqa: E402
from nanopipe.training import CPU_MATMUL_PRECISIONS, cpu_matmul_precision, keep_freed_memory_for_reuse  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from bench_base_train import CORPORA, SHAKESPEARE, prepare_inputs  # noqa: E402

# backward autograd nodes -> section (the custom Functions of nanopipe.gpt, and the plain ops' nodes)
BACKWARD_SECTIONS = {
    "SharedInputLinearsFunctionBackward": "backward: attention", "RotaryFunctionBackward": "backward: attention",
    "SmallCausalAttentionFunctionBackward": "backward: attention", "ScaledDotProductFlashAttentionForCpuBackward":
    "backward: attention", "MLPFunctionBackward": "backward: MLP",
    "LinearSoftcapCrossEntropyFunctionBackward": "backward: LM head + loss", "RMSNormFunctionBackward":
    "backward: norms", "EmbeddingBackward0": "backward: embedding",
}
ORDER = ["loader (waiting for the next batch)", "forward: embedding + norms", "forward: attention", "forward: MLP",
         "forward: LM head + loss", "backward: attention", "backward: MLP", "backward: LM head + loss",
         "backward: norms", "backward: embedding", "backward: other nodes (residual adds, views)",
         "optimizer: Muon momentum + update", "optimizer: Muon Newton-Schulz", "optimizer: AdamW", "zero_grad",
         "loss .item()"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--device_batch_size", type=int, default=8)
    p.add_argument("--total_batch_size", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after --warmup_steps)")
    p.add_argument("--warmup_steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd model")
    p.add_argument("--cpu_matmul_precision", choices=CPU_MATMUL_PRECISIONS, default="auto",
                   help="float32 matmuls on CPU, as base_train's flag")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training text (default: tinyshakespeare where ../shared has it, else builtin)")
    p.add_argument("--workdir", type=str, default=None, help="prepared inputs are kept here (default: a temp dir)")
    args = p.parse_args()
    if args.corpus is None:
        args.corpus = "tinyshakespeare" if SHAKESPEARE.is_file() else "builtin"
    return args


def labelled(fn, label: str):
    """fn wrapped in a profiler range named label."""
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def label_model(model: GPT) -> None:
    """Profiler ranges around the forward of the attention and MLP modules (the LM head + loss is labelled in
    the step: it is inside GPT.forward)."""
    for block in model.transformer.h:
        block.attn.forward = labelled(block.attn.forward, "forward: attention")
        block.mlp.forward = labelled(block.mlp.forward, "forward: MLP")


class Step:
    """The training loop's step, with profiler ranges."""

    def __init__(self, model, optimizers, loader, grad_accum: int, compiled):
        self.model, self.optimizers, self.loader, self.grad_accum = model, optimizers, loader, grad_accum
        self.run_model = compiled or model
        self.batch = next(loader)
        self.step = 0

    def __call__(self) -> float:
        loss_sum = torch.zeros(())
        for _ in range(self.grad_accum):
            inputs, targets = self.batch
            with record_function("forward (all)"):
                loss = self.run_model(inputs, targets)
            loss_sum += loss.detach()
            with record_function("backward (all)"):
                (loss / self.grad_accum).backward()
            with record_function("loader (waiting for the next batch)"):
                self.batch = next(self.loader)
        adamw, muon = self.optimizers
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(self.step)
        with record_function("optimizer: AdamW"):
            adamw.step()
        with record_function("optimizer: Muon (all)"):
            muon.step()
        with record_function("zero_grad"):
            self.model.zero_grad(set_to_none=True)
        with record_function("loss .item()"):
            value = (loss_sum / self.grad_accum).item()
        self.step += 1
        return value


def sections(prof, step_ms: float, steps: int) -> dict[str, float]:
    """ms per step of each section, from the profiler's totals."""
    total = collections.Counter()
    for event in prof.key_averages():
        total[event.key] += event.cpu_time_total / 1000 / steps
    out = {name: total.get(name, 0.0) for name in ORDER}
    out["optimizer: Muon Newton-Schulz"] = total.get("optimizer: Muon Newton-Schulz", 0.0)
    out["optimizer: Muon momentum + update"] = total["optimizer: Muon (all)"] - out["optimizer: Muon Newton-Schulz"]
    forward_all = total["forward (all)"]
    out["forward: LM head + loss"] = total.get("forward: LM head + loss", 0.0)
    out["forward: embedding + norms"] = forward_all - sum(out[k] for k in ORDER if k.startswith("forward: ") and
                                                          k != "forward: embedding + norms")
    backward_named = 0.0
    for key, value in total.items():
        node = key.removeprefix("autograd::engine::evaluate_function: ")
        if key != node and node in BACKWARD_SECTIONS:
            out[BACKWARD_SECTIONS[node]] += value
            backward_named += value
    out["backward: other nodes (residual adds, views)"] = total["backward (all)"] - backward_named
    out["Python and other (step wall time less the above)"] = step_ms - sum(out.values())
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    matmul = cpu_matmul_precision(args.cpu_matmul_precision).__enter__()  # for the whole process
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="profile_step_"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir, _, tok = prepare_inputs(work, args.vocab_size, args.corpus)
    torch.manual_seed(42)
    config = build_model_config(args.depth, 64, 64, args.max_seq_len, tok.get_vocab_size())
    model = GPT.create(config, "cpu")
    optimizers = model.setup_optimizers(unembedding_lr=0.004 / 16, embedding_lr=0.3 / 16, matrix_lr=0.02 / 16)
    loader = BestFitLoader(tok, select_shards(data_dir).train, args.device_batch_size, args.max_seq_len)
    grad_accum = args.total_batch_size // (args.device_batch_size * args.max_seq_len)
    compiled = torch.compile(model, dynamic=False) if args.compile else None
    label_model(model)
    # Newton-Schulz and the LM head + loss get their own ranges
    optim.orthogonalize = labelled(optim.orthogonalize, "optimizer: Muon Newton-Schulz")
    import nanopipe.gpt as gpt
    gpt.softcapped_cross_entropy = labelled(gpt.softcapped_cross_entropy, "forward: LM head + loss")
    step = Step(model, optimizers, loader, grad_accum, compiled)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average "
          f"{os.getloadavg()[0]:.2f}; d{args.depth} width {config.n_embd}, seq {args.max_seq_len}, "
          f"{args.device_batch_size} rows x {grad_accum} micro-steps, vocab {config.vocab_size}"
          f"{', compiled' if compiled else ', eager'}, float32 matmuls {matmul}")
    for _ in range(args.warmup_steps):
        step()
    times = []
    for _ in range(args.steps):  # wall time without the profiler
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_ms = 1000 * statistics.median(times)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    loader.close()
    table = sections(prof, step_ms, args.steps)
    print(f"\nstep: {step_ms:.2f} ms median over {args.steps} steps ({args.total_batch_size / step_ms * 1000:,.0f} "
          f"tok/s) without the profiler; sections from {args.steps} profiled steps\n")
    print(f"{'section':<52}{'ms/step':>9}{'%':>7}")
    for name, ms in table.items():
        print(f"{name:<52}{ms:>9.2f}{100 * ms / step_ms:>7.1f}")
    print(f"{'(all-reduce of the gradients: none in one process)':<52}{0.0:>9.2f}{0.0:>7.1f}")
    print(f"{'step':<52}{step_ms:>9.2f}{100.0:>7.1f}")
    print("\n(the profiler's own overhead lands in the sections it times, so the named sections are slight "
          "over-estimates and 'Python and other' an under-estimate)")
    if not args.workdir:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
