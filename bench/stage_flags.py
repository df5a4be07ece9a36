"""
A bench script's command line: the stage settings it takes are the stages' own flags, defined once in
`nanopipe.configs` (type, bound, default, help), and argparse keeps only what belongs to the bench (repeats,
seeds, workdir, reference trees, threads).

    bench_args, stage = parse_bench_flags(parser, [(BaseTrainConfig, ("depth", "max_seq_len"))],
                                          scale={"depth": 4})

`scale` is the bench's starting point (a bench runs a small model, not the stage's d20): those values are laid
under what the command line gives, and --help shows both the stage's default and the bench's value.
`--parse_only` prints the settings the command resolves to and exits, without running anything.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, create_model

from nanopipe.configs.base import ConfigError, build_config, deep_merge
from nanopipe.configs.flags import HELP_FLAGS, format_help, parse_flags

# (a stage's config model, the names of the fields the bench takes from it; None: all of them)
StageFields = tuple[type[BaseModel], Sequence[str] | None]


class _BenchStage(BaseModel):
    model_config = ConfigDict(extra="forbid")


def stage_model(sources: Sequence[StageFields], name: str = "StageFlags") -> type[BaseModel]:
    """A model of the chosen fields of the stages' configs, each exactly as its stage defines it.

    A stage model taken whole is returned as it is, its validators included. A field named by two stages must
    be the same field (one definition), or this raises."""
    if len(sources) == 1 and sources[0][1] is None:
        return sources[0][0]
    fields: dict[str, Any] = {}
    for cls, names in sources:
        for field_name in names if names is not None else list(cls.model_fields):
            field = cls.model_fields[field_name]
            if field_name in fields and fields[field_name][1] != field:
                raise ValueError(f"--{field_name} differs between stages; take it from one of them")
            fields[field_name] = (field.annotation, field)
    return create_model(name, __base__=_BenchStage, **fields)


def stages_model(stages: dict[str, type[BaseModel]], name: str = "StagesFlags") -> type[BaseModel]:
    """A model with one field per stage, each that stage's whole config: flags `--base_train.depth=4`."""
    fields = {stage: (cls, Field(default_factory=cls, description=f"flags of {stage}"))
              for stage, cls in stages.items()}
    return create_model(name, __base__=_BenchStage, **fields)


def parse_bench_flags(parser: argparse.ArgumentParser, sources: Sequence[StageFields] | type[BaseModel], *,
                      scale: dict[str, Any] | None = None,
                      argv: list[str] | None = None) -> tuple[argparse.Namespace, Any]:
    """(the bench's own options, the validated stage settings) from argv; a bad flag exits 2 naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    scale = dict(scale or {})
    model = sources if isinstance(sources, type) else stage_model(sources)
    names = ([cls.__name__ for cls, _ in sources] if not isinstance(sources, type)
             else [field.annotation.__name__ for field in sources.model_fields.values()])
    parser.add_argument("--parse_only", action="store_true",
                        help="print the settings this command resolves to, then exit without running")
    if any(token in HELP_FLAGS for token in argv):
        parser.print_help()
        print(f"\nStage flags (defined by {', '.join(names)}); "
              f"this bench starts from {scale or 'the stage defaults'}:\n")
        print(format_help(model, parser.prog, description=" "))
        raise SystemExit(0)
    bench_args, rest = parser.parse_known_args(argv)
    try:
        stage = build_config(model, deep_merge(scale, parse_flags(model, rest, prog=parser.prog)))
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if bench_args.parse_only:
        bench_values = {k: v for k, v in vars(bench_args).items() if k != "parse_only"}
        print(f"bench: {bench_values}")
        print(f"stage: {stage.model_dump()}")
        raise SystemExit(0)
    return bench_args, stage


def stage_cli_args(stage: BaseModel, names: Sequence[str] | None = None) -> list[str]:
    """The stage settings as the flags a stage's command takes (`--depth=4`): the named ones, or (by default)
    those the bench's scale or the command line set."""
    args = []
    for name in names if names is not None else sorted(stage.model_fields_set):
        value = getattr(stage, name)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            value = "none"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args.append(f"--{name}={value}")
    return args
