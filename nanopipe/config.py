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

import ast
import importlib.util
import sys
from pathlib import Path
import types
import typing
from typing import Any, Literal

from pydantic.fields import FieldInfo


from nanopipe.configs.base import (CommonConfig, ConfigError, DownstreamConfig, NanoConfig,  # noqa: F401
                                   build_config, config_digest, describe_range, non_semantic_fields,
                                   unwrap_optional as _unwrap_optional, validation_error_message)


def stage_docstring(cls: type) -> str | None:
    """The docstring of the stage a config in nanopipe.configs belongs to, read without importing the stage."""
    package, _, name = cls.__module__.rpartition(".")
    if package != "nanopipe.configs":
        return None
    spec = importlib.util.find_spec(f"nanopipe.stages.{name}")
    if spec is None or not spec.origin:
        return None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))


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
    doc = (stage_docstring(cls) or sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
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



