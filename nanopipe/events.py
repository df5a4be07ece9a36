"""
What a stage tells the flow, as typed records. The flow reads these and nothing else of a stage's output: a
stage's human lines are for people and may say anything.

A record is one line on the stage's output (rank 0 only), `@@nanopipe-<kind> <json>`, beside the human lines,
so it lands where the flow already reads: the launch's stream and the stage's `stage.log`. The final metrics
are the one exception: `metrics.json` in the stage's output directory, written last.

    progress   {"step": 10, "total": 100, "loss": 3.2}      per step; any further figure of that step
    resumed    {"step": 40, "checkpoint_dir": "...",       the checkpoint a training stage resumes from, the
                "written_by": 2, "world_size": 1}           processes that wrote it and the processes now
    memory     {"peak_bytes": 123, "parts": {...}}          the peak-memory estimate per device, before training
    plan       {"num_params": .., "model": {..}, ..}        a planning run (`--plan_only`) found nothing wrong
    error      {"error": "CheckpointError", "message": ..,  why the stage stops, in its own words, and the exit
                "exit_code": 2}                             code it is about to exit with (nanopipe.exit_codes)

A value that is not finite (a loss with nothing to measure) is written as null, so every line is strict JSON.
Torch-free: the flow process imports this module.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

RECORD_PREFIX = "@@nanopipe-"
METRICS_FILE = "metrics.json"


class Record(BaseModel):
    """One fact a stage reports; `kind` names it on the line."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = ""


class Progress(Record):
    """Where the stage is: `step` of `total` (either may be missing) and that step's figures."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: ClassVar[str] = "progress"
    step: int | float | None = Field(None, description="steps (or units of work) done")
    total: int | float | None = Field(None, description="steps (or units of work) in all")


class Resumed(Record):
    """A training stage resumes from this checkpoint (after it verified and loaded on every rank)."""

    kind: ClassVar[str] = "resumed"
    step: int = Field(ge=0, description="the checkpoint's step")
    checkpoint_dir: str = Field(description="the directory the checkpoint is in")
    written_by: int | None = Field(None, ge=1, description="processes that wrote the checkpoint (its world size)")
    world_size: int | None = Field(None, ge=1, description="processes that resume from it; another number than "
                                   "written_by means the optimizer state was re-sharded (nanopipe.reshard)")


class MemoryEstimate(Record):
    """The stage's estimate of its peak memory per device, before it allocates anything."""

    kind: ClassVar[str] = "memory"
    peak_bytes: int = Field(ge=0, description="the estimated peak, bytes per device")
    parts: dict[str, int] = Field(default_factory=dict, description="what the peak is made of, bytes")

    @classmethod
    def of(cls, memory: dict[str, int]) -> MemoryEstimate:
        """From an `estimate_peak_memory` dict ({"total": .., "weights": .., ...})."""
        return cls(peak_bytes=int(memory["total"]), parts={k: int(v) for k, v in memory.items() if k != "total"})


class Plan(Record):
    """A planning run (`--plan_only`) checked the flags, the batch arithmetic and the memory, and found
    nothing wrong: what the real run would be."""

    kind: ClassVar[str] = "plan"
    num_params: int | None = Field(None, description="the model's parameters")
    num_iterations: int | None = Field(None, description="optimizer steps (none: known once the data is read)")
    world_size: int | None = Field(None, description="processes the run was planned for")
    peak_bytes: int | None = Field(None, description="the estimated peak memory per device, bytes")
    model: dict[str, Any] = Field(default_factory=dict, description="the model it plans for (its GPTConfig: "
                                  "n_layer, n_embd, sequence_len, vocab_size, ...)")

    @classmethod
    def of(cls, info: dict[str, Any]) -> Plan:
        """From a stage's planning dict (the keys it has: num_params, num_iterations, world_size,
        estimated_peak_memory_bytes and model_config)."""
        memory = info.get("estimated_peak_memory_bytes") or {}
        return cls(num_params=info.get("num_params"), num_iterations=info.get("num_iterations"),
                   world_size=info.get("world_size"), peak_bytes=memory.get("total"),
                   model=info.get("model_config") or {})


class StageFailure(Record):
    """Why the stage stops, in one line, and the exit code it exits with."""

    kind: ClassVar[str] = "error"
    error: str | None = Field(None, description="the error's class (a StageError's, e.g. CheckpointError); none "
                              "for a flag the stage rejected")
    message: str = Field(description="the stage's one-line reason, naming the flag or file and the fix")
    exit_code: int = Field(description="the process's exit code (nanopipe.exit_codes.ExitCode)")

    def reason(self) -> str:
        return f"{self.error}: {self.message}" if self.error else self.message


RECORDS: dict[str, type[Record]] = {r.kind: r for r in (Progress, Resumed, MemoryEstimate, Plan, StageFailure)}


# -----------------------------------------------------------------------------
# Writing and reading

def _json_value(value: Any) -> Any:
    """A value as strict JSON: NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    try:
        return _json_value(float(value))   # e.g. a 0-d tensor or numpy scalar
    except (TypeError, ValueError):
        return str(value)


def record_line(record: Record) -> str:
    """The line that carries `record`: `@@nanopipe-<kind> <json>`."""
    body = _json_value(record.model_dump(mode="json", exclude_unset=isinstance(record, Progress)))
    return f"{RECORD_PREFIX}{record.kind} {json.dumps(body, sort_keys=True, allow_nan=False)}"


def emit(record: Record) -> None:
    """Print `record` for the flow, on rank 0 only, flushed at once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(record_line(record), flush=True)


def parse_record(line: str) -> Record | None:
    """The record a line carries; None for any other line (a human line, an unknown kind, a line cut short)."""
    if not line.startswith(RECORD_PREFIX):
        return None
    kind, _, body = line[len(RECORD_PREFIX):].partition(" ")
    cls = RECORDS.get(kind)
    if cls is None:
        return None
    try:
        values = json.loads(body)
        return cls.model_validate(values) if isinstance(values, dict) else None
    except (json.JSONDecodeError, ValidationError):
        return None


def last(records: list[Record], cls: type[Record]) -> Any:
    """The last record of this type, or None."""
    return next((r for r in reversed(records) if isinstance(r, cls)), None)


# -----------------------------------------------------------------------------
# Progress, as the stages call it

PROGRESS_PREFIX = RECORD_PREFIX + Progress.kind + " "


def report_progress(**figures: Any) -> None:
    """Report one step, e.g. report_progress(step=10, total=100, loss=3.2)."""
    emit(Progress(**{key: _json_value(value) for key, value in figures.items()}))


def parse_progress(line: str) -> dict | None:
    """The figures of a progress line, or None for any other line."""
    record = parse_record(line)
    return record.model_dump(exclude_unset=True) if isinstance(record, Progress) else None


# -----------------------------------------------------------------------------
# Final metrics: metrics.json in the stage's output directory, a JSON object, written last by rank 0
# (nanopipe.common.write_metrics)

def read_metrics(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The stage's final metrics; None when it wrote none. Raises ValueError when the file is not a JSON
    object (a stage that wrote something else broke the contract)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} holds a {type(metrics).__name__}, not a JSON object of metrics")
    return metrics
