"""
Named starting points for `PipelineConfig`: partial nested dicts laid over the config's defaults (which are
the seed's defaults, i.e. the d20 speedrun's stage settings). `nanopipe run --preset NAME --a.b=c` and a
deployment's `{"config": {"preset": NAME, ...}}` both start here; given values win. A preset states only what
differs from those defaults. `PRESET_DESCRIPTIONS` says in one line what each is for; `preset_line` adds the
key values computed from the resolved config (depth, parameters, base_train steps, batch, processes) and the
expected time and cost where a figure is known (`PRESET_TIMES`): the run form's preset picker and `nanopipe
presets` show them.

The GPU presets read FineWeb-Edu shards through huggingface-hub (`data.data_source=hf`): the tokenizer
the first 8 shards, pretraining as many as its token budget needs. Their chat stages use nanochat's data: the
identity conversations its speedrun downloads and the 370K-word English list of the spelling tasks (both
fetched once into NANOPIPE_HOME and checked, nanopipe.remote); the CPU presets stay offline (the default
builtin data). Settings every stage shares (device, dtype, seed) go in `common`, the text source in `data`
(see flows/config.py for the precedence).
"""

from __future__ import annotations

import copy
from typing import Any

from nanopipe.configs.base import deep_merge  # noqa: F401 (flows.config lays presets over the given values)
from nanopipe.configs.chat_common import IDENTITY_CONVERSATIONS_URL
from nanopipe.configs.chat_eval import ChatEvalConfig
from nanopipe.configs.chat_rl import ChatRLConfig
from nanopipe.vocab import padded_vocab_size

# nanochat's chat data: its speedrun's identity conversations, the public 370K-word list for the spelling tasks
_REFERENCE_CHAT_DATA = {"identity_path": IDENTITY_CONVERSATIONS_URL, "spelling_words": "download"}


def _default(config: type, field: str) -> Any:
    return config.model_fields[field].default


def _gpu_run(depth: int | None, base_shards: int, device_batch_size: int | None = None,
             gpus_per_node: int = 8) -> dict[str, Any]:
    """A FineWeb-Edu run on GPUs in nanochat's shape (the stages' defaults): the tokenizer on ~2B chars of 8
    shards, the model trained for 20 tokens per parameter, evaluated on CORE and bits per byte. None: the
    default (depth 20, 32 sequences per device)."""
    run: dict[str, Any] = {
        "resources": {"env": {"OMP_NUM_THREADS": "1"}, "retry_delay_seconds": 60},
        "data": {"data_source": "hf"},
        "tok_train": {"max_chars": 2_000_000_000, "num_shards": 8},
        "base_train": {"num_shards": base_shards},
        "mid_train": dict(_REFERENCE_CHAT_DATA),
        "chat_sft": dict(_REFERENCE_CHAT_DATA),
        "chat_eval": {"spelling_words_path": "download"},
    }
    if gpus_per_node > 1:  # one process per node is the default
        run["resources"]["nproc_per_node"] = gpus_per_node
    if depth is not None:
        run["base_train"]["depth"] = depth
    if device_batch_size is not None:
        # mid-training packs rows like pretraining (same device batch, so the same memory); SFT keeps the seed's
        # 4 conversations per micro-step everywhere (at most base's memory); RL and chat_eval sample in batches
        # of their default size or of the device batch, the smaller
        for stage in ("base_train", "base_eval", "mid_train"):
            run.setdefault(stage, {})["device_batch_size"] = device_batch_size
        if device_batch_size < _default(ChatRLConfig, "device_batch_size"):
            run["chat_rl"] = {"device_batch_size": device_batch_size}
        if device_batch_size < _default(ChatEvalConfig, "batch_size"):
            run["chat_eval"]["batch_size"] = device_batch_size
    return run


def _cpu_run(scale: int) -> dict[str, Any]:
    """The whole chain on a 2-core CPU on the builtin offline data, `scale` x the demo's chat training.

    Sized by measurement (bench/bench_stage_gains.py): the base model only needs to exist (the builtin chats
    are far from Python's documentation), so the minutes go to the chat stages, where the held-out tasks are
    learnt. Mid-training teaches the chat and calculator format on packed rows at 0.88 x the seed's matrix
    learning rate (init_lr_frac 0.88: mid-training, like nanochat's, does not scale the rates with the batch); SFT at
    0.2 instead of the seed's 0.02. Mid-training runs 400 steps: copying the question's numbers into the
    calculator call is learnt suddenly, and at 250 steps the default seed (42) had not got there (held-out
    Arithmetic 3.9 % after mid-training; 94.5 % at 375 steps, 98.4 % at 400, 97.3 % at 500; seeds 1-3 were at
    74-87 % by step 250). The calculator is nanopipe's (`extended_calculator`): it writes 48/2 as '24', as the
    builtin problems do.
    RL: fresh builtin arithmetic questions every step (8 x 8 samples, each seen once, drawn apart from mid's and
    SFT's), 45 steps at 0.10 in the demo (2x the seed's 0.05), 120 at 0.20 in cpu-small; it evaluates itself on
    1,024 held-out problems, one sample each (pass@1 at the training temperature, 1.0). The room RL has is in
    sharpening: the demo's SFT model (seed 1) answers 70 % of 128 held-out problems right sampled at temperature
    1.0, 85 % at 0.7 and 89 % at 0.4, its sampled failures being tail tokens (a number copied from the wrong
    sentence). nanochat's group-mean baseline prunes them slowly: +4.0 points over seeds 1-3 (z 0.7-2.3), and
    neither twice the rate, twice the questions, 4 x 16 samples, twice the steps nor a faster output head did
    better. The reward itself as the advantage (baseline "zero": every right answer reinforced, also where all 8
    were right) gained +9.6 (5.5 to 14.5, z 2.0-6.0), but greedy SpellingBee lost 11 points on average (z down to
    -6.4): RL on arithmetic alone overwrote the letter copying. Replaying 8 of SFT's builtin conversations a step
    keeps it: seeds 1-3, `python bench/bench_stage_gains.py --preset=demo-cpu --seeds=1,2,3`: pass@1 on 1,024
    questions +9.2 (8.0 to 11.4, z 4.3-6.3, 3/3 seeds; the default seed 42: +6.6, z 3.3), SpellingBee +2.1 (-3.1 to
    7.8), MultipleChoice -1.7 (within noise). RL on SpellingBee questions learns to answer "#### 1", the builtin
    words' most common count (65.6 % of held-out questions), so they are not RL's.
    The demo's RL then went from 60 steps at 0.05 to 45 at 0.10, replaying 16 conversations a step instead of 8,
    ~1 min less: the bench command above, pass@1 +10.3 / +8.9 / +12.6 (z 5.4 / 5.3 / 7.0; seed 42 +7.9, z 3.9),
    SpellingBee -3.9 / +9.4 / -1.2 (seed 42 +3.9), MultipleChoice -4.7 to +2.7. At 0.10 or 0.15 with 8 replayed
    conversations, seed 42's greedy SpellingBee fell from 32.8 % (SFT) to 20.7 %.
    cpu-small's arithmetic curriculum (mid_train's builtin_hard_share 0): mid-training on the shorter word problems
    only teaches the format (calculator call and `#### N` on 99 % of held-out problems) and solves ~54 % of them;
    SFT's mixed steps then teach the harder half. When mid-training saw the harder ones too, it already solved
    87-100 % and SFT added nothing; the demo keeps them in mid-training, as its 100 SFT steps do not learn them
    (seeds 1-3 with the curriculum: SFT 59-71 %, and RL's gain fell to +3.5 to +10.9, z 1.1-3.6).
    cpu-small's multiple choice: 1,800 steps of it alone opened SFT (2,100 now, below; nanopipe/tasks/mixtures.py: the
    letter binds to its choice after a plateau of ~300 steps; seed 2, in a run of 2,400 such steps, on 512 held-out
    questions: 40 % at 600 steps, 53 % at 1,200, 64 % at 1,800; 300 steps had left it at 38-46 %). They are cheap (one
    supervised letter in ~80 tokens, ~0.24 s a step). The letter-only phase makes the model forget the other tasks
    (Arithmetic and SpellingBee at 0 %); 450 mixed steps bring them back if their learning rate starts high again: with
    one decay over the whole run they stayed at 0 % and 2 %. Where the decay restarts sets the balance (seed 2, held-out
    MultipleChoice / Arithmetic / SpellingBee after SFT): at the full rate 59 / 89 / 52 % (multiple choice fell from
    61 % to 51 % in the first 100 mixed steps), at 0.75 of it 59 / 86 / 36 %, at 0.5 62 / 65 / 27 %. The preset restarts
    at 0.75. RL then starts from a model that solves fewer of the harder problems, and gains more: seeds 1-3, pass@1 on
    1,024 questions 56.1 -> 73.6 % (+17.6, z 8.5), 74.7 -> 80.1 % (+5.4, z 2.9), 75.9 -> 82.9 % (+7.0, z 3.9); after SFT
    MultipleChoice 69.9 / 59.4 / 73.0 %, Arithmetic 72.3 / 85.5 / 85.2 %, SpellingBee 38.3 / 35.9 / 39.1 % (256 held-out
    problems each).
    With the earlier recipe (300 opening steps, 600 mixed ones, one decay), the SFT models solved 89-92 % greedy,
    86 % sampled, and RL gained +11.2 on seed 1 but +0.8 and +0.9 on seeds 2 and 3: that gain was one kind of
    problem, the workshop (word_problems._problem_team_output), whose number of machines is stated in the first
    sentence and used in the last step, which the SFT models guessed (right 13-26 % of the time, sampled) and only
    seed 1's RL learnt to read. With this recipe it still capped RL at the seed's rate (+17.6 / +5.4 / +7.0 above):
    sampled, the SFT models of seeds 1-3 solved 7 / 20 / 19 % of these problems, the RL models 11 / 22 / 15 % (the
    other kinds 86-100 %). So cpu-small's workshop answers open by restating the count (`builtin_restate_counts`,
    SFT's and RL's data; seed 2's SFT then solved 69 % of them) and its RL runs at 0.15, 3x the seed's rate (seed 2
    with the line at 0.05: +8.3; at 0.15 without it: +10.4 on seed 2, +7.3 on seed 3, multiple choice losing 5-7
    points). Seeds 1-3, `python bench/bench_stage_gains.py --preset=cpu-small --seeds=1,2,3` (measured when every
    preset's builtin answers had the line; cpu-small's rows are the same): after SFT MultipleChoice 69.1 / 59.4 /
    71.9 %, Arithmetic 73.4 / 92.6 / 87.9 %, SpellingBee 41.4 / 37.1 / 42.6 % (256 held-out problems each); RL's
    pass@1 on 1,024 questions 56.7 -> 79.1 % (+22.4, z 11.2), 80.2 -> 91.3 % (+11.1, z 7.3), 75.4 -> 89.9 % (+14.6,
    z 8.9), multiple choice falling 4-5 points (z -1.0 to -1.2); whole pipeline 28.4 / 26.1 / 30.2 min (load
    1.8-2.1). Seed 3 again on main: the same figures, in 34.0 min on a host ~30 % slower (base_train 33.6 s
    instead of 27-28 s, mid-training 8.7 min instead of 6.6). The demo keeps the plain answers: its mid-training
    sees the harder problems, and with the line its RL gained +6.4 / +6.6 / +6.7 (z 3.0 / 4.1 / 3.9) instead of
    +8.3 / +8.0 / +11.4.
    cpu-small's RL then went, like the demo's, to a higher rate with 16 replayed conversations: 120 steps at 0.20
    instead of 180 at 0.15 with 8. From the same SFT models, seeds 1-3: pass@1 on 1,024 questions 56.7 -> 81.1 %
    (+24.3, z 12.3), 80.2 -> 91.2 % (+11.0, z 7.2), 75.4 -> 90.6 % (+15.2, z 9.4); after RL MultipleChoice 66.0 /
    57.0 / 68.0 % (64.1 / 55.1 / 67.2 % before the change), SpellingBee 42.6 / 42.2 / 43.8 %. Seed 2's whole
    pipeline from a fresh home: 24.9 min (RL 6.0 min instead of 8.2; base_train 26 s).
    Seed 2's multiple choice after SFT, 59.4 % (152 of 256), was then the one target missed; SFT opens with 2,100
    multiple-choice steps instead of 1,800 (~70 s more). Seeds 1-3, the bench command above from fresh homes: after
    SFT MultipleChoice 76.6 / 61.3 / 69.1 %, Arithmetic 74.6 / 89.5 / 89.1 %, SpellingBee 43.4 / 36.7 / 41.4 %; RL's
    pass@1 on 1,024 questions 52.9 -> 77.6 % (+24.7, z 12.2), 69.5 -> 88.0 % (+18.5, z 10.5), 72.2 -> 87.8 % (+15.6,
    z 9.0), MultipleChoice -3.9 / +0.8 / -0.4 points; whole pipeline 25.3 / 25.8 / 25.5 min (base_train 27-28 s,
    mid-training 6.2 min, SFT 11.8, RL 5.9)."""
    mid_steps, sft_steps, rl_steps = 400 * scale, 100 * scale, 45 if scale == 1 else 120
    # cpu-small learns multiple choice first (nanopipe/tasks/mixtures.py: 2,100 steps of the answer letter alone,
    # each conversation weighing once in the loss; ~0.25 s a step on 2 cores), then 1.5x the mixed steps, their
    # learning rate decaying again from 0.75 of the starting rate (--lr_restart), to bring the other tasks back; the
    # demo's minutes do not reach past multiple choice's plateau
    mc_first_steps = 2100 if scale > 1 else 0
    if mc_first_steps:
        sft_steps = sft_steps * 3 // 2
    sft_extra = {"loss_per": "conversation", "mc_first": 32 * mc_first_steps, "lr_restart": 0.75} \
        if mc_first_steps else {}
    # cpu-small's workshop problems (SFT's and RL's; its mid-training has none) answer by restating their count of
    # machines first; the demo keeps the plain answers (below). RL: the demo's 45 steps at 2x the seed's rate,
    # cpu-small's 120 at 4x, both replaying 16 SFT conversations a step
    if scale > 1:
        sft_extra["builtin_restate_counts"] = True
    rl_extra = {"builtin_restate_counts": True, "init_lr_frac": 0.20} if scale > 1 else {"init_lr_frac": 0.10}
    # cpu-small's arithmetic curriculum: mid-training on the shorter word problems only (the format), SFT on the
    # usual half of harder ones; the demo's 100 SFT steps are too few for that (below)
    mid_extra = {"builtin_hard_share": 0.0} if scale > 1 else {}
    sft_iterations = mc_first_steps + sft_steps
    return {
        "common": {"device_type": "cpu"},
        # two single-threaded processes (torchrun + gloo) beat one two-threaded one on a 2-core CPU
        "resources": {"nproc_per_node": 2, "retries": 1, "retry_delay_seconds": 1, "env": {"OMP_NUM_THREADS": "1"}},
        "tok_train": {"max_chars": 3_000_000, "vocab_size": 2048},
        "tok_eval": {"val_chars": 200_000, "references": []},
        "base_train": {"depth": 4, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 256,
                       "device_batch_size": 8, "total_batch_size": 4096, "num_iterations": 60, "eval_every": 20,
                       "eval_tokens": 16384, "core_metric_every": None, "sample_every": None, "save_every": 20},
        "base_eval": {"eval": "bpb,sample", "device_batch_size": 8, "split_tokens": 16384},
        # builtin_size: one pass over the mixture in the given steps (mixtures.py weighs its tasks)
        "mid_train": {"mixture": "builtin", "builtin_size": 4 * mid_steps + 100, "max_seq_len": 256,
                      "device_batch_size": 8, "total_batch_size": 4096, "num_iterations": mid_steps,
                      "init_lr_frac": 0.88, "eval_every": mid_steps // 2, "eval_tokens": 16384,
                      "save_every": 50, **mid_extra},
        "chat_sft": {"mixture": "builtin", "builtin_size": 32 * sft_steps // 6 + 20, "device_batch_size": 8,
                     "num_iterations": sft_iterations, "init_lr_frac": 0.2,
                     "eval_every": sft_iterations // 2, "eval_steps": 8, "eval_metrics_every": None,
                     "eval_metrics_max_problems": 256, "save_every": 50, **sft_extra},
        # RL evaluates itself at step 0 (the SFT model) and at its end on the same 1,024 held-out questions: pass@1
        # of one sampled answer, the report card's RL row; 128 questions decode together (a CPU runs them ~15 % faster
        # than 32, the same scores)
        "chat_rl": {"task": "builtin-arithmetic", "synthetic_size": 8 * rl_steps, "baseline": "zero", "replay": 16,
                    "examples_per_step": 8, "num_samples": 8, "device_batch_size": 32, "max_new_tokens": 200,
                    "eval_every": rl_steps, "eval_examples": 1024, "eval_samples": 1, "eval_batch_size": 128,
                    "extended_calculator": True, "save_every": 20, **rl_extra},
        # held-out problems of the builtin tasks: 256 each, whole answers (the longest run to ~200 tokens)
        "chat_eval": {"task": ["Arithmetic", "MultipleChoice", "SpellingBee"],
                      "max_problems": 256, "max_new_tokens": 200, "batch_size": 32,
                      "extended_calculator": True},
    }


PRESETS: dict[str, dict[str, Any]] = {
    "demo-cpu": _cpu_run(1),
    # the same chain with 3x the mid-training, 25.5x the SFT steps (multiple choice first), 2.7x RL: ~25-30 min
    "cpu-small": _cpu_run(3),
    # depth 12: a small nanochat-style model on one 8-GPU node
    "d12": _gpu_run(12, base_shards=80),
    # nanochat's speedrun: d20, 8xH100, ~4 h; 370 shards cover 11.2B tokens plus cropping
    "speedrun-d20": _gpu_run(None, base_shards=370),
    # d26 on 8xH100: batch 16 per device fits 80 GB, gradient accumulation keeps the 524,288-token batch
    "d26": _gpu_run(26, base_shards=450, device_batch_size=16),
    # the seed's memory-constrained settings
    "mem-40gb": _gpu_run(None, base_shards=370, device_batch_size=16),                # A100 40 GB class
    "mem-24gb": _gpu_run(16, base_shards=160, device_batch_size=8),                   # 24 GB consumer GPUs
    "single-gpu": _gpu_run(12, base_shards=80, device_batch_size=4, gpus_per_node=1),  # one GPU of >= 24 GB
}


# One line per preset: what it is for (shown by the run form's preset picker and `nanopipe presets`)
PRESET_DESCRIPTIONS: dict[str, str] = {
    "demo-cpu": "the whole pipeline on a 2-core CPU in about 10 minutes, offline builtin data (run_rl=true adds RL)",
    "cpu-small": "demo-cpu with 3x mid-training (short problems), multiple choice first in SFT, longer RL: ~25-30 min",
    "d12": "a quick GPU model: depth 12 on one 8-GPU node",
    "speedrun-d20": "nanochat's $100 speedrun: depth 20 on 8xH100, about 4 hours",
    "d26": "depth 26 on 8xH100, device batch 16 to fit 80 GB",
    "mem-40gb": "the speedrun on 40 GB GPUs: device batch 16, same total batch",
    "mem-24gb": "24 GB GPUs: depth 16, device batch 8",
    "single-gpu": "one GPU of 24 GB or more: depth 12, device batch 4",
}
assert set(PRESET_DESCRIPTIONS) == set(PRESETS), "every preset needs a one-line description"


# Expected wall time of the whole chain where one is known: (hours, the figure as stated and where it comes from).
# The GPU cost is these hours x the run's GPUs x its cost_per_gpu_hour; other presets say "not measured".
PRESET_TIMES: dict[str, tuple[float, str]] = {
    "demo-cpu": (9.75 / 60, "9.75 min on 2 CPU cores, install included; more on a slower host (measured, README)"),
    "cpu-small": (25.5 / 60, "25.5 min on 2 CPU cores at full speed (seeds 1-3), more on a slower host "
                             "(measured, README)"),
    "speedrun-d20": (4.0, "about 4 h on 8xH100 (nanochat's speedrun)"),
    "d26": (12.0, "about 12 h on 8xH100 (nanochat's d26 tier)"),
}


def model_params(depth: int, aspect_ratio: int, head_dim: int, vocab_size: int) -> int:
    """Parameters of the GPT these shape flags build (nanopipe.gpt, counted without torch): per layer 4 width^2
    of attention and 8 width^2 of MLP, plus the untied embedding and LM head over the padded vocabulary."""
    width = -(-depth * aspect_ratio // head_dim) * head_dim
    return 12 * depth * width * width + 2 * padded_vocab_size(vocab_size) * width


def preset_facts(name: str) -> dict[str, Any]:
    """A preset's key values, computed from its resolved config: depth, parameters, base_train steps (and what
    sets them), tokens per step, processes, base training FLOPs, and the expected time and cost where known."""
    from flows.config import PipelineConfig   # flows.config builds on this module
    config = PipelineConfig(preset=name)
    base, res = config.base_train, config.resources
    params = model_params(base.depth, base.aspect_ratio, base.head_dim, config.tok_train.vocab_size)
    width = -(-base.depth * base.aspect_ratio // base.head_dim) * base.head_dim
    flops_per_token = 6 * (params - padded_vocab_size(config.tok_train.vocab_size) * width) + \
        12 * base.depth * width * base.max_seq_len
    if base.num_iterations is not None:
        steps, by = base.num_iterations, "num_iterations"
    elif base.target_flops is not None:
        steps, by = max(1, round(base.target_flops / (flops_per_token * base.total_batch_size))), "target_flops"
    else:
        steps = max(1, int(base.target_param_data_ratio * params) // base.total_batch_size)
        by = f"{base.target_param_data_ratio:g} tokens per parameter"
    hours, time = PRESET_TIMES.get(name, (None, "time not measured"))
    gpus = 0 if config.common.device_type == "cpu" else res.nproc_per_node * res.nnodes
    if not gpus:
        cost = "no GPU cost"
    elif hours is None:
        cost = "cost not measured"
    else:
        usd = hours * gpus * config.cost_per_gpu_hour
        cost = f"about {float(f'{usd:.1g}'):,.0f} USD at {config.cost_per_gpu_hour:g} USD/GPU-h"
    return {"depth": base.depth, "params": params, "steps": steps, "steps_by": by, "batch": base.total_batch_size,
            "nproc_per_node": res.nproc_per_node, "nnodes": res.nnodes, "flops": flops_per_token * steps *
            base.total_batch_size, "time": time, "cost": cost}


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"


def preset_key_values(name: str) -> str:
    """The preset's key values in words: depth, parameters, steps, batch, processes, expected time and cost."""
    f = preset_facts(name)
    steps = f"{f['steps']:,} steps" + ("" if f["steps_by"] == "num_iterations" else f" ({f['steps_by']})")
    if f["time"] == "time not measured":
        ratio = f["flops"] / preset_facts("speedrun-d20")["flops"]
        when = f"time and cost not measured ({ratio:.2g}x the speedrun's pretraining compute)"
    else:
        when = f"{f['time']}, {f['cost']}"
    return (f"depth {f['depth']} ({_millions(f['params'])} parameters), {steps} of {f['batch']:,} tokens, "
            f"{f['nproc_per_node']} x {f['nnodes']} processes; {when}")


def preset_line(name: str) -> str:
    """One line (no markup: both Prefect UIs show it as written): what the preset is for, then its key values."""
    values = preset_key_values(name)
    return f"{name}: {PRESET_DESCRIPTIONS[name]}. {values[0].upper()}{values[1:]}"


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
