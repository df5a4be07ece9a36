"""
Named starting points for `PipelineConfig`: partial nested dicts laid over the config's defaults (which are
the seed's defaults, i.e. the d20 speedrun's stage settings). `nanopipe run --preset NAME --a.b=c` and a
deployment's `{"config": {"preset": NAME, ...}}` both start here; given values win.

    demo-cpu      whole pipeline on a 2-core CPU in minutes, offline builtin data (the README's demo)
    d12           a quick GPU model: depth 12 on one 8-GPU node
    speedrun-d20  nanochat's $100 speedrun: depth 20 on 8xH100, ~4 h
    d26           depth 26 on 8xH100 (device batch 16 to fit 80 GB)
    mem-40gb      speedrun-d20 on 40 GB GPUs: device batch 16 (gradient accumulation keeps the total batch)
    mem-24gb      24 GB GPUs: depth 16, device batch 8
    single-gpu    one GPU: depth 12, device batch 4
"""

from __future__ import annotations

import copy
from typing import Any

_GPU_NODE = {"resources": {"nproc_per_node": 8, "env": {"OMP_NUM_THREADS": "1"}, "retries": 2,
                           "retry_delay_seconds": 60}}

_SPEEDRUN: dict[str, Any] = {
    **_GPU_NODE,
    "data": {"data_source": "hf"},
    "tok_train": {"max_chars": 2_000_000_000, "vocab_size": 32768},
}

PRESETS: dict[str, dict[str, Any]] = {
    "demo-cpu": {
        "data": {"data_source": "builtin"},
        "resources": {"nproc_per_node": 1, "retries": 1, "retry_delay_seconds": 1},
        "tok_train": {"max_chars": 3_000_000, "vocab_size": 2048, "device_type": "cpu"},
        "tok_eval": {"val_chars": 200_000, "references": [], "device_type": "cpu"},
    },
    "d12": {**_SPEEDRUN, "tok_train": {"max_chars": 1_000_000_000, "vocab_size": 32768}},
    "speedrun-d20": _SPEEDRUN,
    "d26": {**_SPEEDRUN, "tok_train": {"max_chars": 4_000_000_000, "vocab_size": 32768}},
    "mem-40gb": _SPEEDRUN,
    "mem-24gb": _SPEEDRUN,
    "single-gpu": {**_SPEEDRUN, "resources": {"nproc_per_node": 1, "retries": 2, "retry_delay_seconds": 60}},
}


def deep_merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, recursing into dicts that are present in both."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("env",):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
