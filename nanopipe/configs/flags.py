"""
The command line, derived from the config models: one parser for every stage, the data commands and the
`nanopipe` pipeline command.

    cfg = parse_config(TokTrainConfig, sys.argv[1:], prog="python -m nanopipe.stages.tok_train")
    values = parse_flags(PipelineConfig, ["--tok_train.vocab_size=1024", "--resources.env.X=1"], prog="nanopipe run")
    stage_main(TokTrainConfig, run, argv, prog="python -m nanopipe.stages.tok_train")   # a stage's main()

Every field of the model is a flag, fields of nested models are dotted (`--tok_train.vocab_size`) and dict
fields take `--field.KEY=VALUE` (or `--field KEY=VALUE`, or JSON). Each flag has both spellings, `--max_chars=1`
and `--max-chars 1`; bools may be bare (`--dry_run`); integers take `1e9` and `10_000`; optional fields take
`none`; list fields take comma-separated values or several values after one flag. pydantic validates the
result, so the bounds and choices live in the model only; a bad flag exits with status 2 and a message that
names it and its valid range, before any work starts.

Built on argparse rather than pydantic-settings' CLI source: that one takes either the underscore or the kebab
spelling (not both) and has no `--field.KEY=VALUE` for dict fields.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from nanopipe.configs.base import (ConfigError, build_config, deep_merge, describe_range, dict_value_model,
                                   is_none_text, model_class, unwrap_optional)
from nanopipe.events import StageFailure, emit
from nanopipe.exit_codes import ExitCode, StageError

HELP_FLAGS = ("-h", "--help")


# -----------------------------------------------------------------------------
# From a command-line string to what pydantic validates

def coerce_cli_value(field: FieldInfo, raw: str) -> Any:
    """Turn a CLI string into something pydantic validates; pydantic does the real checking."""
    inner, optional = unwrap_optional(field.annotation)
    if optional and is_none_text(raw):
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
    if typing.get_origin(inner) is dict or (raw[:1] in ("[", "{") and typing.get_origin(inner) in (list, tuple)):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(f"expected JSON, got {raw!r}: {err}") from None
    if typing.get_origin(inner) in (list, tuple):
        return [part for part in raw.split(",") if part != ""]
    return raw


def _kind(field: FieldInfo) -> str:
    inner, _ = unwrap_optional(field.annotation)
    origin = typing.get_origin(inner)
    if inner is bool:
        return "bool"
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "dict"
    return "value"


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """(path, field) of every flag of a model: its plain fields, and its nested models' fields, dotted."""
    for name, field in model.model_fields.items():
        sub = model_class(field.annotation)
        if sub is not None:
            yield from _leaves(sub, prefix + (name,))
        else:
            yield prefix + (name,), field


def _spellings(path: tuple[str, ...]) -> list[str]:
    """Every spelling of a dotted flag: each part with underscores or dashes (--tok_train.vocab-size too)."""
    spellings = [""]
    for part in path:
        forms = dict.fromkeys([part, part.replace("_", "-")])
        spellings = [f"{head}.{form}" if head else form for head in spellings for form in forms]
    return [f"--{s}" for s in spellings]


def _put(values: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        values = values.setdefault(part, {})
    values[path[-1]] = value


# -----------------------------------------------------------------------------
# The parser

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # a ConfigError, which callers turn into exit status 2
        raise ConfigError(message)


def _help_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    text = f"{field.description or ''} (default: {default!r}; {describe_range(field)})"
    return text.replace("%", "%%")


def build_parser(model: type[BaseModel], prog: str, *, short_aliases: dict[str, str] | None = None,
                 bare_prefix: str | None = None, extra_flags: dict[str, str] | None = None,
                 description: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, FieldInfo]]:
    """An argparse parser with one option per leaf field of `model` (dest: the dotted path), and the fields.

    short_aliases: {"-p": "prompt"}; bare_prefix: a nested model whose fields also answer to their undotted
    name (`nanopipe stage tok_train --vocab_size=1`); extra_flags: {name: help} of flags outside the model,
    returned as strings (a bare one as "true")."""
    aliases: dict[str, list[str]] = {}
    for short, name in (short_aliases or {}).items():
        aliases.setdefault(name, []).append(short)
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False, description=description,
                     formatter_class=argparse.RawTextHelpFormatter,
                     epilog="Flags take --max_chars=1 or --max-chars 1; -1 or none switches off what says so.")
    parser.add_argument(*HELP_FLAGS, action="store_true", help="show this help and exit")
    fields: dict[str, FieldInfo] = {}
    top_level = set(model.model_fields)
    for path, field in _leaves(model):
        dest = ".".join(path)
        fields[dest] = field
        names = [*aliases.get(dest, []), *_spellings(path)]
        if bare_prefix and path[:-1] == (bare_prefix,) and path[-1] not in top_level:
            names += _spellings(path[-1:])
        kind = _kind(field)
        kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=_help_text(field))
        if kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="true|false")
        elif kind == "list":
            kwargs.update(nargs="+", action="extend", metavar="VALUE")
        elif kind == "dict":
            kwargs.update(action="append", metavar="KEY=VALUE")
        else:
            kwargs.update(metavar="VALUE")
        parser.add_argument(*names, **kwargs)
    for name, help_text in (extra_flags or {}).items():
        parser.add_argument(*_spellings((name,)), dest=f"extra:{name}", nargs="?", const="true",
                            default=argparse.SUPPRESS, help=help_text)
    return parser, fields


def _split_dict_flags(model: type[BaseModel], argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Take `--dictfield.KEY[.sub]=VALUE` (and `--dictfield.KEY VALUE`) out of argv: (rest, [(dest, key, raw)])."""
    dict_fields = {".".join(path) for path, field in _leaves(model) if _kind(field) == "dict"}
    rest, found, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        key, has_value, value = token.partition("=")
        name = key[2:].replace("-", "_") if key.startswith("--") else ""
        dest = next((d for d in dict_fields if name.startswith(d + ".")), None)
        if dest is None:
            rest.append(token)
            continue
        if not has_value:
            if i >= len(argv):
                raise ConfigError(f"flag {key} needs a value")
            value, i = argv[i], i + 1
        found.append((dest, name[len(dest) + 1:], value))
    return rest, found


def _dict_entry(field: FieldInfo, key: str, raw: str, flag: str) -> tuple[str, Any]:
    """(key, value) of one dict entry: `KEY=VALUE`, or `KEY.sub=VALUE` into a dict of models."""
    sub = dict_value_model(field.annotation)
    head, _, rest = key.partition(".")
    if sub is None:
        if rest:
            raise ConfigError(f"{flag}: the values of this dict are plain, they have no field {rest!r}")
        return key, raw
    if not rest:
        try:
            return head, json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{flag}: expected a JSON object for {head}, got {raw!r}: {err}") from None
    return head, parse_flags(sub, [f"--{rest}={raw}"], prog=flag)


def parse_flags(model: type[BaseModel], argv: list[str], *, prog: str, short_aliases: dict[str, str] | None = None,
                bare_prefix: str | None = None, extra_flags: dict[str, str] | None = None) -> dict[str, Any]:
    """argv into the nested dict of values it sets (unset fields are left out; nothing validated yet).

    Raises ConfigError naming the flag on an unknown flag or a malformed value; `build_config(model, values)`
    then validates. Extra flags come back at the top level under their name, as strings."""
    argv, dict_flags = _split_dict_flags(model, list(argv))
    parser, fields = build_parser(model, prog, short_aliases=short_aliases, bare_prefix=bare_prefix,
                                  extra_flags=extra_flags)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(_unknown_flag_message(model, unknown[0], fields))
    values: dict[str, Any] = {}
    for dest, raw in vars(namespace).items():
        if dest.startswith("extra:"):
            values[dest[len("extra:"):]] = raw
        elif dest in fields:
            field, flag = fields[dest], f"--{dest}"
            if _kind(field) == "dict":
                entries = dict(_dict_entry(field, *item.split("=", 1), flag) if "=" in item and item[:1] != "{"
                               else (None, coerce_cli_value(field, item)) for item in raw)
                merged = entries.pop(None, None) or {}
                _put(values, tuple(dest.split(".")), {**merged, **entries})
            elif _kind(field) == "list":
                _put(values, tuple(dest.split(".")), [v for item in raw for v in coerce_cli_value(field, item)])
            else:
                try:
                    _put(values, tuple(dest.split(".")), coerce_cli_value(field, raw))
                except ConfigError as err:
                    raise ConfigError(f"{flag}: {err}") from None
    for dest, key, raw in dict_flags:
        entry_key, value = _dict_entry(fields[dest], key, raw, f"--{dest}.{key}")
        target = values
        for part in dest.split("."):
            target = target.setdefault(part, {})
        if isinstance(value, dict) and isinstance(target.get(entry_key), dict):
            value = deep_merge(target[entry_key], value)
        target[entry_key] = value
    return values


def _unknown_flag_message(model: type[BaseModel], token: str, fields: dict[str, FieldInfo]) -> str:
    if not token.startswith("-"):
        return f"unexpected argument {token!r}: flags look like --name=value (see --help)"
    key = token.lstrip("-").partition("=")[0]
    name = key.replace("-", "_")
    close = [f"--{f}" for f in fields if f.rpartition(".")[2].startswith(name.rpartition(".")[2][:3])]
    hint = f"; did you mean {', '.join(close[:8])}?" if close else ""
    if name == "dry_run" and "plan_only" in fields:  # the seed's planning flag, renamed for nanochat's meaning
        hint = "; to plan (shapes, steps, memory) without training use --plan_only"
    return f"unknown flag --{key} for {model.__name__}{hint} (see --help)"


# -----------------------------------------------------------------------------
# Stages: parse, validate, run, exit with the right code

def stage_docstring(cls: type) -> str | None:
    """The docstring of the stage a config in nanopipe.configs belongs to, read without importing the stage."""
    package, _, name = cls.__module__.rpartition(".")
    spec = importlib.util.find_spec(f"nanopipe.stages.{name}") if package == "nanopipe.configs" else None
    if spec is None or not spec.origin:
        return None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))


def format_help(cls: type[BaseModel], prog: str, short_aliases: dict[str, str] | None = None,
                description: str | None = None) -> str:
    doc = description or stage_docstring(cls) or sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    parser, _ = build_parser(cls, prog, short_aliases=short_aliases, description=doc.strip())
    return parser.format_help()


def parse_config(cls: type[BaseModel], argv: list[str] | None = None, *, prog: str | None = None,
                 short_aliases: dict[str, str] | None = None, description: str | None = None):
    """argv into a validated config; --help prints the flags and exits 0, a bad flag exits 2 naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (sys.argv[0] if sys.argv else cls.__name__)
    if any(token in HELP_FLAGS for token in argv):
        print(format_help(cls, prog, short_aliases, description))
        raise SystemExit(ExitCode.OK)
    try:
        return build_config(cls, parse_flags(cls, argv, prog=prog, short_aliases=short_aliases))
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        emit(StageFailure(message=str(err), exit_code=ExitCode.BAD_INPUT))
        raise SystemExit(ExitCode.BAD_INPUT)


def stage_main(cls: type[BaseModel], run: Callable[[Any], Any], argv: list[str] | None = None, *, prog: str,
               short_aliases: dict[str, str] | None = None) -> Any:
    """Every stage's main(): parse and validate the flags, run, and turn a StageError into one line on stderr
    and its exit code (ExitCode: 2 bad flag or input, 3 diverged, 1 otherwise). Anything else is a bug and
    keeps its traceback."""
    cfg = parse_config(cls, argv, prog=prog, short_aliases=short_aliases)
    try:
        return run(cfg)
    except StageError as err:
        print(f"{prog}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        emit(StageFailure(error=type(err).__name__, message=str(err), exit_code=err.exit_code))
        raise SystemExit(err.exit_code)


def to_cli_args(cfg: BaseModel) -> list[str]:
    """The inverse of parse_config: flags that reproduce `cfg` (only fields that differ from the default)."""
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
