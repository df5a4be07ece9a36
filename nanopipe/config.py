"""
One pydantic model per stage is the single source of truth for its flags, defaults, bounds and help.

    class TokTrainConfig(StageConfig):
        vocab_size: int = Field(32768, ge=256 + 9, description="vocabulary size, special tokens included")

    cfg = parse_cli(TokTrainConfig, sys.argv[1:])

The CLI accepts the seed's spelling (`--vocab_size=512`) and the kebab form (`--vocab-size 512`).
Unknown flags, wrong types and out-of-range values exit with status 2 and a message naming the flag and
its valid range, before any work starts. The same model is the Prefect parameter form and, through
`config_digest`, part of every artifact's cache key.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A stage was given a bad flag or value. The message names the flag and the valid choices."""


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


class DownstreamConfig(CommonConfig):
    """Flags of stages that start from an earlier stage's checkpoint."""

    source: Literal["base", "mid", "sft", "rl"] = Field("base", description="which stage's checkpoints to load")
    model_tag: str | None = Field(None, description="model tag to load (default: the largest model of the source)")
    model_step: int | None = Field(None, ge=0, description="checkpoint step to load (default: the last one)")
    checkpoint_dir: str | None = Field(
        None, description="explicit checkpoint directory to load from (overrides source/model_tag)")


# -----------------------------------------------------------------------------
# Introspection helpers

def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for `X | None` / Optional[X]."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def describe_range(field: FieldInfo) -> str:
    """Human-readable valid range/choices of a field, e.g. 'an integer >= 1' or one of ['a', 'b']."""
    inner, optional = _unwrap_optional(field.annotation)
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(c) for c in typing.get_args(inner))
    else:
        name = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
            inner, getattr(inner, "__name__", str(inner)))
        bounds = []
        for meta in field.metadata:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                value = getattr(meta, attr, None)
                if value is not None:
                    bounds.append(f"{sym} {value}")
        text = name + (" " + " and ".join(bounds) if bounds else "")
    if optional:
        text += " (or none)"
    return text


def flag_name(field_name: str) -> str:
    return "--" + field_name


def _coerce_cli_value(field: FieldInfo, raw: str) -> Any:
    """Turn a CLI string into something pydantic validates; pydantic does the real checking."""
    inner, optional = _unwrap_optional(field.annotation)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if inner is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return raw  # pydantic will reject it with a clear message
    if inner in (int, float):
        # accept 10_000_000 and, for integers, 1e9 (exact for any integer a float can hold)
        cleaned = raw.replace("_", "")
        try:
            number = float(cleaned)
        except ValueError:
            return raw  # pydantic reports the type error against the flag
        if inner is int and number.is_integer() and not cleaned.lstrip("+-").isdigit():
            return int(number)
        return cleaned
    if typing.get_origin(inner) in (list, tuple):
        return [part for part in raw.split(",") if part != ""]
    return raw


# -----------------------------------------------------------------------------
# CLI parsing

def format_help(cls: type[NanoConfig], prog: str) -> str:
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
    lines = [f"usage: {prog} [--flag=value ...]", ""]
    if doc:
        lines += [doc, ""]
    lines.append("flags (underscores or dashes: --max_chars=1 and --max-chars 1 are the same):")
    for name, field in cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        inner, _ = _unwrap_optional(field.annotation)
        if inner is bool:
            flag = f"  {flag_name(name)}[=true|false]"
        else:
            flag = f"  {flag_name(name)}=VALUE"
        lines.append(flag)
        lines.append(f"      {field.description or ''} (default: {default!r}; {describe_range(field)})")
    return "\n".join(lines)


def _split_argv(cls: type[NanoConfig], argv: list[str], short_aliases: dict[str, str]) -> dict[str, Any]:
    """Parse `--a=b`, `--a b`, `--flag` (bools) and `--a-b` into {field: raw value}."""
    fields = cls.model_fields
    raw: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in short_aliases:
            token = "--" + short_aliases[token]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: flags look like --name=value (see --help)")
        key, has_value, value = token[2:].partition("=")
        name = key.replace("-", "_")
        if name not in fields:
            close = [f"--{f}" for f in fields if f.startswith(name[:3])]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown flag --{key} for {cls.__name__}{hint} (see --help)")
        inner, _ = _unwrap_optional(fields[name].annotation)
        if not has_value:
            if inner is bool and (i >= len(argv) or argv[i].startswith("-")):
                value = "true"
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise ConfigError(f"flag --{key} needs a value: {describe_range(fields[name])}")
        raw[name] = _coerce_cli_value(fields[name], value)
    return raw


def validation_error_message(cls: type[NanoConfig], err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = e["loc"][0] if e["loc"] else None
        if isinstance(loc, str) and loc in cls.model_fields:
            field = cls.model_fields[loc]
            got = e.get("input")
            parts.append(f"{flag_name(loc)}: {e['msg']} (got {got!r}; valid: {describe_range(field)})")
        else:
            parts.append(f"{cls.__name__}: {e['msg']}")
    return "; ".join(parts)


def build_config(cls: type[NanoConfig], values: dict[str, Any]):
    """Validate a dict into a config, turning pydantic's errors into one ConfigError naming each flag."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ConfigError(validation_error_message(cls, err)) from None


def parse_cli(cls: type[NanoConfig], argv: list[str] | None = None, prog: str | None = None,
              short_aliases: dict[str, str] | None = None):
    """Parse argv into a validated config; on error print the reason and exit with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (sys.argv[0] if sys.argv else cls.__name__)
    if "-h" in argv or "--help" in argv:
        print(format_help(cls, prog))
        raise SystemExit(0)
    try:
        return build_config(cls, _split_argv(cls, argv, short_aliases or {}))
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2)


def to_cli_args(cfg: NanoConfig) -> list[str]:
    """The inverse of parse_cli: flags that reproduce `cfg` (only fields that differ from the default)."""
    args = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if value == field.get_default(call_default_factory=True):
            continue
        if value is None:
            value = "none"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args.append(f"--{name}={value}")
    return args


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
