"""
Base classes of the stage configs, and what every config shares: validation into one error that names each
flag and its valid range, the `Off[...]` type for "-1 or none means off", the `ResumeStep` type of
--resume_from_step, and the cache-key digest.

One pydantic model per stage is the single source of truth for its flags, defaults, bounds and help; the
command line (`nanopipe.configs.flags`), the Prefect parameter form and the cache key all come from it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from nanopipe.exit_codes import ExitCode, StageError


class ConfigError(StageError, ValueError):
    """A stage was given a bad flag or value. The message names the flag and the valid choices."""

    exit_code = ExitCode.BAD_INPUT


_WORLD_SIZE_LATER = contextvars.ContextVar("world_size_later", default=False)


@contextlib.contextmanager
def world_size_checked_later():
    """Within: a config's batch arithmetic is not checked for one process when it is validated, because the
    caller checks it for the world size the stage will run on (the pipeline's planner, flows/plan.py), and a
    suggestion of valid values must be made for that world size, not for one process."""
    token = _WORLD_SIZE_LATER.set(True)
    try:
        yield
    finally:
        _WORLD_SIZE_LATER.reset(token)


def check_for_one_process() -> bool:
    """Should a config validator check its batch arithmetic for one process? (Not within world_size_checked_later.)"""
    return not _WORLD_SIZE_LATER.get()


# nanochat's total batch, in tokens per optimizer step: the learning rates were tuned at it (base_train scales
# them by sqrt(batch / this)), and validation measures 20 of it
REFERENCE_BATCH_TOKENS = 2**19
EVAL_TOKENS = 20 * REFERENCE_BATCH_TOKENS


def is_none_text(value: Any) -> bool:
    """Is this the typed spelling of None: '', 'none' or 'null' (any case, surrounding blanks ignored)?"""
    return isinstance(value, str) and value.strip().lower() in ("", "none", "null")


def deep_merge(base: dict, override: dict) -> dict:
    """`override` laid over `base` (neither is changed), recursing into dicts that are present in both."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _minus_one_is_none(value: Any) -> Any:
    """The CLI's -1 (nanochat's spelling of "disabled" / "all") is None inside configs."""
    if is_none_text(value) or (isinstance(value, str) and value.strip() in ("-1", "-1.0")):
        return None
    return None if value is not None and not isinstance(value, bool) and value == -1 else value


class _Off:
    """`Off[int]` is `int | None` where -1 (or "none") also means None: off, disabled, all."""

    def __class_getitem__(cls, item):
        return Annotated[item | None, BeforeValidator(_minus_one_is_none)]


Off = _Off

# top-k sampling: 0 means "all tokens" as well as -1/none
TopK = Annotated[Off[int], BeforeValidator(lambda value: None if value in (0, "0") else value)]


def _resume_step_text(value: Any) -> Any:
    """--resume_from_step as typed: '', none, null mean None; 'latest' in any case; a step, signed or not."""
    if is_none_text(value):
        return None
    if isinstance(value, str):
        value = value.strip().lower()
        if value.lstrip("+-").isdigit():
            return int(value)
    return value


def _resume_step(value: Any) -> Any:
    """After parsing (so that "-2" and -2.0 are caught like -2): -1 is None, other negative steps are an error."""
    if isinstance(value, int) and value < 0:
        if value == -1:
            return None
        raise ValueError("must be a step >= 0, 'latest', or -1/none")
    return value


# A checkpoint step to resume from, 'latest' (the last complete one, if any), or None: start fresh.
ResumeStep = Annotated[int | Literal["latest"] | None, BeforeValidator(_resume_step_text),
                       AfterValidator(_resume_step)]


def _plain_name(value: str | None) -> str | None:
    if value is not None and (not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value):
        raise ValueError("must be a plain name (no '/', no '..'): it becomes a directory name")
    return value


# A name that becomes a directory (model tags): never a path that could leave its parent directory.
PlainName = Annotated[str | None, AfterValidator(_plain_name)]


class NanoConfig(BaseModel):
    """Base of every config: unknown keys are an error, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields that never change what a stage computes (logging, output locations). They are left out
    # of the cache key; subclasses extend this tuple.
    NON_SEMANTIC: typing.ClassVar[tuple[str, ...]] = ("run", "out_dir")


class CommonConfig(NanoConfig):
    """Flags shared by every training stage."""

    run: str = Field("dummy", description="wandb run name; 'dummy' disables wandb logging")
    device_type: Literal["", "cuda", "cpu", "mps"] = Field(
        "", description="device to run on; empty autodetects (cuda > mps > cpu)")
    dtype: Literal["", "bfloat16", "float32"] = Field(
        "", description="compute dtype; empty means bfloat16 where the hardware supports it, else float32")
    seed: int = Field(42, ge=0, description="random seed")


class CpuMatmulFlags(NanoConfig):
    """How float32 matmuls run on CPU, for every training stage (nanopipe.training.cpu_matmul_precision)."""

    cpu_matmul_precision: Literal["auto", "ieee", "bf16"] = Field(
        "auto", description="float32 matmuls on CPU: bf16 lets oneDNN use the CPU's bf16 instructions (about 2x "
                            "faster, Muon's Newton-Schulz then runs in bf16 as on CUDA), ieee is torch's default, "
                            "auto is bf16 where the CPU has native bf16")


class CalculatorFlags(NanoConfig):
    """Which calculator answers the model's tool calls (nanopipe.calculator), for every stage that samples."""

    extended_calculator: bool = Field(False, description="nanopipe's calculator: % and ** too, 48/2 gives '24' "
                                                         "(default: nanochat's outputs and refusals, '24.0')")


CheckpointSource = Literal["base", "mid", "sft", "rl"]


class DownstreamConfig(CommonConfig):
    """Flags of stages that start from an earlier stage's checkpoint."""

    source: CheckpointSource = Field("base", description="which stage's checkpoints to load")
    model_tag: PlainName = Field(None, description="model tag to load (default: the largest model of the source)")
    model_step: int | None = Field(None, ge=0, description="checkpoint step to load (default: the last one)")
    checkpoint_dir: str | None = Field(
        None, description="explicit checkpoint directory to load from (overrides source/model_tag)")


def model_tag_for_depth(depth: int) -> str:
    """The default model tag of a GPT of this depth: checkpoint directory and artifact names ('d12')."""
    return f"d{depth}"


def depth_of_model_tag(tag: str) -> int | None:
    """The depth a default model tag names ('d12' -> 12), None for any other tag."""
    match = re.fullmatch(r"d(\d+)", tag)
    return int(match.group(1)) if match else None


# -----------------------------------------------------------------------------
# torch.compile: one rule for every training stage

COMPILE_MIN_STEPS = 50   # --compile auto compiles on CUDA for runs of at least this many steps


class CompileFlag(NanoConfig):
    """--compile of the stages that train on fixed-shape rows (base_train, mid_train)."""

    compile: bool | None = Field(None, description="torch.compile the model (none: auto, the rule of "
                                                   "nanopipe.configs.base.compile_decision; the run prints it)")


def compile_decision(flag: bool | None, device_type: str, num_steps: int | None) -> tuple[bool, str]:
    """(compile the model?, why) for --compile (None: auto: on CUDA, for runs of at least COMPILE_MIN_STEPS
    steps or of a horizon not known yet (one pass over the data); never on CPU or MPS).

    Measured at bench_base_train's d4 on one CPU thread: the eager step with the hand-fused CPU kernels of
    nanopipe.gpt takes 366 ms of CPU, the compiled one 487 ms, after 8-30 s of compilation, so compiling never
    pays on CPU. On CUDA the compiled step is the fast one (fused elementwise kernels around the GEMMs), and
    its minute or so of compilation is repaid within a few dozen steps of a real model."""
    if flag is not None:
        return flag, f"--compile={str(flag).lower()}"
    if device_type != "cuda":
        return False, f"auto: on {device_type} the eager step with hand-fused kernels is faster than the compiled one"
    if num_steps is None:
        return True, "auto: CUDA, a horizon of one pass over the data"
    if num_steps < COMPILE_MIN_STEPS:
        return False, f"auto: {num_steps} steps are too few to repay compilation (< {COMPILE_MIN_STEPS})"
    return True, f"auto: CUDA, {num_steps} steps"


# -----------------------------------------------------------------------------
# Introspection: what a field accepts, in words

def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / Optional[X]; Annotated wrappers are looked through."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def is_off_field(field: FieldInfo) -> bool:
    return any(getattr(m, "func", None) is _minus_one_is_none for m in field.metadata)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(annotation))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def describe_range(field: FieldInfo) -> str:
    """Human-readable valid range/choices of a field, e.g. 'an integer >= 1' or one of ['a', 'b']."""
    inner, optional = unwrap_optional(field.annotation)
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(c) for c in typing.get_args(inner))
    else:
        members = typing.get_args(inner) if typing.get_origin(inner) in (typing.Union, types.UnionType) else (inner,)
        name = " or ".join(_type_name(t) for t in members if t is not type(None))
        bounds = []
        for meta in field.metadata:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                value = getattr(meta, attr, None)
                if value is not None:
                    bounds.append(f"{sym} {value}")
        text = name + (" " + " and ".join(bounds) if bounds else "")
    if is_off_field(field):
        text += " (or -1/none: off)"
    elif optional:
        text += " (or none)"
    return text


def model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`M`, `M | None`), else None."""
    inner, _ = unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def dict_value_model(annotation: Any) -> type[BaseModel] | None:
    """M for `dict[K, M]` (a dict of models, addressed key by key), else None."""
    inner, _ = unwrap_optional(annotation)
    args = typing.get_args(inner)
    return model_class(args[1]) if typing.get_origin(inner) is dict and len(args) == 2 else None


def field_at(cls: type[BaseModel], loc: tuple) -> tuple[FieldInfo | None, str]:
    """(field, its dotted path) that a pydantic error location points at, through nested models and dicts
    of models; (None, "") when the location names no field (a model-level error)."""
    field, path, model, keyed = None, [], cls, None
    for part in loc:
        if keyed is not None and isinstance(part, str):  # the key of a dict of models
            path.append(part)
            model, keyed = keyed, None
        elif model is not None and isinstance(part, str) and part in model.model_fields:
            field = model.model_fields[part]
            path.append(part)
            model, keyed = model_class(field.annotation), dict_value_model(field.annotation)
        else:
            break  # a list index, a union member or a dict key inside a leaf field
    return field, ".".join(path)


# -----------------------------------------------------------------------------
# Validation with errors that name the flag

def validation_error_message(cls: type[BaseModel], err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field, path = field_at(cls, tuple(e["loc"]))
        if field is not None:
            flag = "--" + path
            parts.append(f"{flag}: {e['msg']} (got {e.get('input')!r}; valid: {describe_range(field)})")
        else:
            parts.append(f"{cls.__name__}: {e['msg']}")
    return "; ".join(parts)


def build_config(cls: type[BaseModel], values: dict[str, Any]):
    """Validate a dict into a config, turning pydantic's errors into one ConfigError naming each flag."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ConfigError(validation_error_message(cls, err)) from None


# -----------------------------------------------------------------------------
# The cache key

def non_semantic_fields(cls: type[NanoConfig]) -> set[str]:
    """NON_SEMANTIC of the class and of every base (mixins included), so no subclass can hide a base's."""
    names = set()
    for klass in cls.__mro__:
        names.update(klass.__dict__.get("NON_SEMANTIC", ()))
    return names & set(cls.model_fields)


def config_digest(cfg: NanoConfig, length: int = 16) -> str:
    """Stable hash of the fields that change what a stage computes (NON_SEMANTIC fields excluded)."""
    payload = cfg.model_dump(mode="json", exclude=non_semantic_fields(type(cfg)))
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
