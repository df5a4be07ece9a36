"""
Benchmark evaluation speed: our base_eval, CORE, chat_eval and engine functions against nanochat's same
functions, in one process, on the same inputs (same token batches, task items, problems and prompts).

    python bench/bench_eval.py                                          # our side alone
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_eval.py           # side by side
    NANOCHAT_DIR=/path/to/nanochat python bench/bench_eval.py --repeats=5 --threads=4 --device=cuda

Measured, with the reference function in brackets:
  bits per byte       tokens/s of nanopipe.loss_eval.evaluate_bpb        (nanochat.loss_eval.evaluate_bpb)
  CORE, per type      examples/s of nanopipe.core_eval.evaluate_task     (nanochat.core_eval.evaluate_task)
  chat_eval           problems/s of chat_scoring.evaluate_categorical    (scripts/chat_eval.py run_categorical_eval)
                      and evaluate_generative                            (run_generative_eval)
  engine decode       tokens/s of nanopipe.engine.Engine.generate        (nanochat.engine.Engine.generate)

Inputs: a BPE tokenizer trained on the corpus of bench_base_train.py (tinyshakespeare from the `../shared`
folder beside the repo where present, else the builtin corpus), handed to nanochat as its own tokenizer
class around the same tiktoken encoding (from a pickle, the way nanochat loads one). The CORE items are built
here from that corpus' validation text in DCLM's item formats; the multiple-choice problems are our offline
quiz; the generative problems are the first GSM8K test problems (`../shared/data/gsm8k/test.jsonl`). Both
tasks are handed to both sides as one small object with nanochat's Task interface (len, [i], eval_type,
evaluate). Each side builds its own model of the same shape (nanochat with full attention in every layer)
with its own init_weights; the LM head rows of the special tokens are zeroed so that greedy decoding never
ends a sample early: both sides decode their full token budget, and the tokens decoded are printed.

Each figure is the median over --repeats runs in alternating order (ours, nanochat, nanochat, ours, ...)
after one warm-up run of each. The ratio is ours / nanochat: above 1 means ours is faster. Nothing is
asserted about speed. The two models differ inside (nanochat's has value embeddings, smear and backout),
so the figures compare each project's evaluation as a whole, model forward included. The CPU ratio (per
CPU-second of the process) moves less than wall time when other work shares the machine, but not nothing:
torch's waiting threads spin. Both sides compute in float32 (NANOCHAT_DTYPE=float32 unless set otherwise).
The nanochat modules used here need no wandb; a module they need and this environment lacks stops the run
with its name.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import pickle
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
sys.path.insert(0, str(REPO))

from bench.bench_base_train import SHAKESPEARE, prepare_inputs  # noqa: E402
from bench.stage_flags import parse_bench_flags  # noqa: E402
from nanopipe.chat_format import render_for_completion  # noqa: E402
from nanopipe.chat_scoring import evaluate_categorical, evaluate_generative  # noqa: E402
from nanopipe.configs.base_eval import BaseEvalConfig  # noqa: E402
from nanopipe.configs.base_train import BaseTrainConfig  # noqa: E402
from nanopipe.configs.chat_eval import ChatEvalConfig  # noqa: E402
from nanopipe.configs.tok_train import TokTrainConfig  # noqa: E402
from nanopipe.core_eval import TASK_TYPES, TaskSpec, evaluate_task  # noqa: E402
from nanopipe.data import iter_documents, select_shards  # noqa: E402
from nanopipe.engine import Engine  # noqa: E402
from nanopipe.gpt import GPT, build_model_config  # noqa: E402
from nanopipe.loss_eval import evaluate_bpb  # noqa: E402
from nanopipe.tasks import GSM8K, build_task  # noqa: E402


# The stage settings this bench takes, as the stages define them, and the bench's scale (d4, width 256)
STAGE_FLAGS = [(BaseTrainConfig, ("depth", "aspect_ratio", "head_dim", "max_seq_len")),
               (TokTrainConfig, ("vocab_size",)), (BaseEvalConfig, ("device_batch_size",)),
               (ChatEvalConfig, ("batch_size", "max_new_tokens"))]
BENCH_SCALE = dict(depth=4, head_dim=64, max_seq_len=512, vocab_size=2048, device_batch_size=8, max_new_tokens=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options and the stage settings, in one namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bpb_steps", type=int, default=4, help="batches per bits-per-byte run")
    p.add_argument("--core_examples", type=int, default=32, help="items per CORE task type")
    p.add_argument("--core_fewshot", type=int, default=3, help="few-shot examples per CORE prompt")
    p.add_argument("--mc_problems", type=int, default=64, help="multiple-choice problems (categorical)")
    p.add_argument("--gsm8k_problems", type=int, default=8, help="GSM8K problems (generative)")
    p.add_argument("--prompt_len", type=int, default=64, help="engine prompt tokens")
    p.add_argument("--max_tokens", type=int, default=256, help="engine tokens decoded per sample")
    p.add_argument("--samples", default="1,8", help="engine num_samples values, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating")
    p.add_argument("--workdir", default=None, help="tokenizer and corpus cache (default: a temp dir)")
    args, stage = parse_bench_flags(p, STAGE_FLAGS, scale=BENCH_SCALE, argv=argv)
    return argparse.Namespace(**vars(args), **stage.model_dump())


# -----------------------------------------------------------------------------
# Shared inputs

class FixedTask:
    """A list of conversations with nanochat's Task interface, scored by one of our tasks' evaluate."""

    def __init__(self, source, count: int):
        self.eval_type = source.eval_type
        self.conversations = [source[i] for i in range(min(count, len(source)))]
        self.evaluate = source.evaluate

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        return self.conversations[index]


def corpus_words(data_dir: Path) -> list[str]:
    words = []
    for doc in iter_documents([select_shards(data_dir).val]):
        words.extend(doc.split())
    return words


def core_items(words: list[str], task_type: str, count: int, seed: int = 0) -> list[dict]:
    """`count` items of one CORE task type cut from running text: a 20-word context, continuations of 6 words."""
    rng = random.Random(seed)

    def span(n: int) -> str:  # n words from elsewhere in the text
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])

    items = []
    for _ in range(count):
        start = rng.randrange(len(words) - 40)
        context, following = " ".join(words[start:start + 20]), " ".join(words[start + 20:start + 26])
        gold = rng.randrange(4)
        if task_type == "multiple_choice":
            choices = [span(6) for _ in range(3)]
            choices.insert(gold, following)
            items.append({"query": context, "choices": choices, "gold": gold})
        elif task_type == "schema":
            options = [span(20) for _ in range(3)]
            options.insert(gold, context)
            items.append({"context_options": options, "continuation": following, "gold": gold})
        else:
            items.append({"context": context, "continuation": following})
    return items


def bpb_batches(words: list[str], tok, args, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    B, T = args.device_batch_size, args.max_seq_len
    ids = tok.encode(" ".join(words), prepend=tok.get_bos_token_id())
    needed = args.bpb_steps * B * T + 1
    ids = (ids * (needed // len(ids) + 1))[:needed]  # repeated where the validation text is short
    flat = torch.tensor(ids, dtype=torch.long)
    return [(flat[s * B * T:(s + 1) * B * T].view(B, T).to(device),
             flat[s * B * T + 1:(s + 1) * B * T + 1].view(B, T).to(device)) for s in range(args.bpb_steps)]


def silence_special_tokens(model, special_ids: list[int]) -> None:
    """Zero the LM head rows of the special tokens: their logit is 0 while the largest other logit is
    positive, so greedy decoding never emits <|assistant_end|>, <|bos|> or a tool token."""
    with torch.no_grad():
        for token_id in special_ids:
            model.lm_head.weight[token_id] = 0.0


def count_decoded(columns, num_samples: int, stops: set[int]) -> int:
    """Tokens decoded by Engine.generate's columns, up to and including each sample's stop token."""
    done, count = [False] * num_samples, 0
    for column, _ in columns:
        for i, token in enumerate(column):
            if not done[i]:
                count += 1
                done[i] = token in stops
    return count


# -----------------------------------------------------------------------------
# The two sides: each gives {measurement: a function doing one run and returning the units it processed}

def counted(fn, units: int, quiet: bool = False):
    """A run of fn that reports a fixed number of units; quiet: its printed progress is discarded."""
    def run() -> int:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            fn()
        return units
    return run


def side_runs(args, inputs, bpb, core, categorical, generative, decode) -> dict:
    runs = {"bpb": counted(bpb, args.bpb_steps * args.device_batch_size * args.max_seq_len)}
    for task_type in TASK_TYPES:
        data = inputs["core"][task_type]
        runs[f"core {task_type}"] = counted(lambda t=task_type, d=data: core(t, d), len(data))
    runs["categorical"] = counted(categorical, len(inputs["mc"]), quiet=True)
    runs["generative"] = counted(generative, len(inputs["gsm8k"]), quiet=True)
    for n in inputs["samples"]:
        runs[f"decode x{n}"] = lambda n=n: decode(n)
    return runs


def our_side(args, tok, device, inputs) -> dict:
    config = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, tok.get_vocab_size())
    torch.manual_seed(0)
    model = GPT.create(config, device).eval()
    silence_special_tokens(model, [tok.encode_special(name) for name in tok.get_special_tokens()])
    engine = Engine(model, tok)
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    spec = lambda task_type: TaskSpec(label=task_type, task_type=task_type, dataset_uri="",  # noqa: E731
                                      num_fewshot=args.core_fewshot, continuation_delimiter=" ", random_baseline=0.0)
    mc, gsm = inputs["mc"], inputs["gsm8k"]
    return side_runs(
        args, inputs,
        bpb=lambda: evaluate_bpb(model, inputs["bpb"], args.bpb_steps, inputs["token_bytes"]),
        core=lambda task_type, data: evaluate_task(model, tok, data, spec(task_type), device, config.sequence_len),
        categorical=lambda: evaluate_categorical(mc, model, tok, len(mc), batch_size=args.batch_size),
        generative=lambda: evaluate_generative(gsm, engine, tok, len(gsm), num_samples=1,
                                               max_new_tokens=args.max_new_tokens, temperature=0.0, top_k=None, seed=0),
        decode=lambda n: count_decoded(engine.generate(inputs["prompt"], num_samples=n, max_tokens=args.max_tokens,
                                                       temperature=0.0), n, stops))


def load_nanochat(nanochat_dir: Path) -> dict:
    """nanochat's modules from its checkout. scripts/chat_eval.py runs its CLI only under __main__, so it is
    loaded from its file under a name of its own (our repo has a scripts/ folder too); it imports nanochat's
    `tasks` package, a name we do not use at the top level."""
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")  # nanochat picks bf16 by itself on recent GPUs
    sys.path.append(str(nanochat_dir))
    try:
        import nanochat.core_eval
        import nanochat.engine
        import nanochat.gpt
        import nanochat.loss_eval
        import nanochat.tokenizer
        spec = importlib.util.spec_from_file_location("nanochat_chat_eval", nanochat_dir / "scripts" / "chat_eval.py")
        chat_eval = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(chat_eval)
    except ModuleNotFoundError as err:
        raise SystemExit(f"nanochat at {nanochat_dir} needs the module {err.name!r}, which is not installed here "
                         f"(install it, or unset NANOCHAT_DIR for our side alone)")
    for name in ("nanochat", "tasks"):
        where = Path(sys.modules[name].__path__[0]).resolve()
        assert where.parent == nanochat_dir, f"the package {name!r} came from {where}, not from {nanochat_dir}"
    return {"core_eval": nanochat.core_eval, "engine": nanochat.engine, "gpt": nanochat.gpt,
            "loss_eval": nanochat.loss_eval, "tokenizer": nanochat.tokenizer, "chat_eval": chat_eval}


def reference_side(args, nc: dict, tok_dir: Path, device, inputs) -> dict:
    tok = nc["tokenizer"].RustBPETokenizer.from_directory(str(tok_dir))
    ours = build_model_config(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, tok.get_vocab_size())
    config = nc["gpt"].GPTConfig(sequence_len=ours.sequence_len, vocab_size=ours.vocab_size, n_layer=ours.n_layer,
                                 n_head=ours.n_head, n_kv_head=ours.n_kv_head, n_embd=ours.n_embd, window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # it reports the vocab padding
        model = nc["gpt"].GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    silence_special_tokens(model, [tok.encode_special(name) for name in tok.get_special_tokens()])
    engine = nc["engine"].Engine(model, tok)
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    meta = lambda task_type: {"task_type": task_type, "num_fewshot": args.core_fewshot,  # noqa: E731
                              "continuation_delimiter": " "}
    chat_eval, mc, gsm = nc["chat_eval"], inputs["mc"], inputs["gsm8k"]
    return side_runs(
        args, inputs,
        bpb=lambda: nc["loss_eval"].evaluate_bpb(model, inputs["bpb"], args.bpb_steps, inputs["token_bytes"]),
        core=lambda task_type, data: nc["core_eval"].evaluate_task(model, tok, data, device, meta(task_type)),
        categorical=lambda: chat_eval.run_categorical_eval(mc, tok, model, args.batch_size),
        generative=lambda: chat_eval.run_generative_eval(gsm, tok, model, engine, num_samples=1,
                                                         max_new_tokens=args.max_new_tokens, temperature=0.0,
                                                         top_k=None),
        decode=lambda n: count_decoded(engine.generate(inputs["prompt"], num_samples=n, max_tokens=args.max_tokens,
                                                       temperature=0.0), n, stops))


# -----------------------------------------------------------------------------

def timed(fn, device) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, units) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    units = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, units


def measure(sides: dict[str, dict], name: str, repeats: int, device) -> dict[str, dict]:
    """One warm-up run per side, then `repeats` timed runs each in alternating order."""
    for side in sides.values():
        side[name]()
    rates: dict[str, list[float]] = {label: [] for label in sides}
    cpu_rates: dict[str, list[float]] = {label: [] for label in sides}
    units: dict[str, int] = {}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for label in order:
            seconds, cpu_seconds, units[label] = timed(sides[label][name], device)
            rates[label].append(units[label] / seconds)
            cpu_rates[label].append(units[label] / cpu_seconds)
    return {label: {"rate": statistics.median(rates[label]), "cpu_rate": statistics.median(cpu_rates[label]),
                    "units": units[label], "runs": rates[label]} for label in sides}


def print_table(results: dict[str, dict[str, dict]], with_ref: bool) -> None:
    print(f"\n{'measurement':<26}{'unit':<12}{'ours':>11}"
          + (f"{'nanochat':>11}{'ratio':>8}{'CPU ratio':>11}" if with_ref else "")
          + "   work per run" + (" (ours / nanochat)" if with_ref else ""))
    for name, by_side in results.items():
        ours = by_side["nanopipe"]
        unit = "tokens/s" if name == "bpb" or name.startswith("decode") else (
            "examples/s" if name.startswith("core") else "problems/s")
        line = f"{name:<26}{unit:<12}{ours['rate']:>11,.1f}"
        work = f"{ours['units']:,}"
        if with_ref:
            ref = by_side["nanochat"]
            ratio, cpu_ratio = ours["rate"] / ref["rate"], ours["cpu_rate"] / ref["cpu_rate"]
            line += f"{ref['rate']:>11,.1f}{ratio:>8.3f}{cpu_ratio:>11.3f}"
            work += f" / {ref['units']:,}" + ("" if ref["units"] == ours["units"] else "  [differs]")
        print(f"{line}   {work}")
    ratios = ("; ratio = ours / nanochat, above 1 = ours faster; CPU ratio: the same per CPU-second of the "
              "process, less moved by other work on the machine" if with_ref else "")
    print(f"\n(median over the repeats{ratios}; decode work = tokens decoded, stop tokens included)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    print("command: python " + " ".join(sys.argv))
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    corpus = "tinyshakespeare" if SHAKESPEARE.is_file() else "builtin"
    data_dir, tok_dir, tok = prepare_inputs(work, args.vocab_size, corpus)
    words = corpus_words(data_dir)
    if not GSM8K_TEST.is_file():
        raise SystemExit(f"the generative problems come from {GSM8K_TEST}, which is missing")
    inputs = {"bpb": bpb_batches(words, tok, args, device),
              "token_bytes": torch.load(tok_dir / "token_bytes.pt", weights_only=True).to(device),
              "core": {t: core_items(words, t, args.core_examples, seed=i) for i, t in enumerate(TASK_TYPES)},
              "mc": FixedTask(build_task("MultipleChoice", size=args.mc_problems), args.mc_problems),
              "gsm8k": FixedTask(GSM8K(data_path=GSM8K_TEST, shuffle_seed=None), args.gsm8k_problems),
              "prompt": [tok.get_bos_token_id()] + [(7 * i) % 256 for i in range(args.prompt_len - 1)],
              "samples": [int(s) for s in args.samples.split(",")]}
    lengths = [len(render_for_completion(tok, c)) for c in inputs["gsm8k"].conversations]
    print(f"model: depth {args.depth}, aspect {args.aspect_ratio}, head_dim {args.head_dim}, seq {args.max_seq_len}, "
          f"vocab {tok.get_vocab_size()} ({corpus}); "
          f"bpb {args.bpb_steps} x {args.device_batch_size} x {args.max_seq_len} tokens; "
          f"CORE {args.core_examples} items per type, {args.core_fewshot}-shot; {len(inputs['mc'])} multiple-choice "
          f"problems (batch {args.batch_size}); {len(inputs['gsm8k'])} GSM8K problems (prompts {min(lengths)}-"
          f"{max(lengths)} tokens, {args.max_new_tokens} new); "
          f"decode prompt {args.prompt_len}, {args.max_tokens} tokens; "
          f"{args.repeats} repeat(s)")
    sides = {"nanopipe": our_side(args, tok, device, inputs)}
    nanochat_dir = os.environ.get("NANOCHAT_DIR")
    if nanochat_dir:
        nc = load_nanochat(Path(nanochat_dir).resolve())
        nanochat_tok_dir = work / "nanochat_tokenizer"  # its format: the tiktoken encoding, pickled
        nanochat_tok_dir.mkdir(exist_ok=True)
        (nanochat_tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
        sides["nanochat"] = reference_side(args, nc, nanochat_tok_dir, device, inputs)
        print(f"nanochat from {nanochat_dir} (NANOCHAT_DTYPE={os.environ['NANOCHAT_DTYPE']}, window_pattern L)")
    else:
        print("NANOCHAT_DIR is not set: our side only")
    results = {}
    for name in sides["nanopipe"]:
        results[name] = measure(sides, name, args.repeats, device)
        each = "; ".join(f"{label} " + ", ".join(f"{rate:,.1f}" for rate in res["runs"])
                         for label, res in results[name].items())
        print(f"  {name}: {each} (load {os.getloadavg()[0]:.2f})", flush=True)
    print_table(results, "nanochat" in sides)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
