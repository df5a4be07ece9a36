"""
The `nanopipe` command's help: one argparse parser per subcommand, listing that command's own options with
their defaults (as they would be resolved now: the home and the Prefect server this shell would use).

The config itself is parsed by nanopipe.configs.flags from PipelineConfig (every stage field, dotted); these
parsers describe the command around it. Imports no Prefect.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PROG = "nanopipe"

COMMANDS = {
    "run": "run the whole pipeline as a Prefect flow (completed stages come back Cached)",
    "stage": "run one stage as its own Prefect flow (its inputs must exist)",
    "status": "which artifacts of a config exist and verify, and why a stage would run again",
    "command": "print (or --exec) one stage's exact launch command",
    "deploy": "set up a Prefect server: work pools, deployments, and the worker commands for this machine",
    "presets": "the presets, one line each; with NAME, the values that preset sets",
    "data": "download or build the data shards (python -m nanopipe.data)",
}

EXAMPLES = {
    "run": ["nanopipe run --preset demo-cpu",
            "nanopipe run --preset d12 --base_train.num_iterations=100 --resources.nproc_per_node=4",
            "nanopipe run --preset demo-cpu --recompute_from=base_train   # redo base_train and what follows"],
    "stage": ["nanopipe stage tok_train --preset demo-cpu --vocab_size=1024"],
    "status": ["nanopipe status --preset demo-cpu --home ~/runs/demo"],
    "command": ["nanopipe command base_train --preset d12 --resources.nnodes=2 "
                "--resources.rdzv_endpoint=node0:29400 --exec"],
    "deploy": ["export PREFECT_API_URL=http://HOST:4200/api", "nanopipe deploy   # again after changing prefect.yaml"],
    "presets": ["nanopipe presets d12"],
}


def home_and_source(flag: str | None) -> tuple[Path, str]:
    """(NANOPIPE_HOME this command uses, how it was chosen): --home, else NANOPIPE_HOME, else the default."""
    from nanopipe.common import base_dir_path
    if flag:
        return Path(flag).expanduser().absolute(), "--home"
    if os.environ.get("NANOPIPE_HOME"):
        return base_dir_path().absolute(), "NANOPIPE_HOME"
    return base_dir_path(), "the default; give --home DIR or set NANOPIPE_HOME for another"


def _home_default() -> str:
    home, source = home_and_source(None)
    return f"{home}, from NANOPIPE_HOME" if source == "NANOPIPE_HOME" else str(home)


def _server_default(command: str) -> str:
    from flows.local_server import configured_api
    found = configured_api()
    if found:
        return f"{found[0]} (from {found[1]})"
    if command == "deploy":
        return "none: no PREFECT_API_URL set, and a temporary server cannot hold deployments"
    return "a temporary server for this command (no PREFECT_API_URL set)"


def _config_options(parser: argparse.ArgumentParser, stage_flags: bool = False) -> None:
    """The top-level PipelineConfig fields, with their defaults, and how to reach every other field."""
    from flows.config import PipelineConfig
    from flows.presets import PRESETS
    fields = PipelineConfig.model_fields
    group = parser.add_argument_group("the config (a PipelineConfig; a preset's values, then what you give)")
    group.add_argument("--preset", choices=list(PRESETS), metavar="NAME", default="none",
                       help=f"{fields['preset'].description}: {', '.join(PRESETS)} (`nanopipe presets`)")
    group.add_argument("--stop_after", metavar="STAGE", default="none", help=fields["stop_after"].description)
    group.add_argument("--recompute_from", metavar="STAGE", default="none",
                       help=f"{fields['recompute_from'].description}")
    group.add_argument("--run_rl", action="store_true", help=fields["run_rl"].description)
    sections = [name for name, f in fields.items() if f.annotation is not None and hasattr(f.annotation, "model_fields")]
    group.add_argument("--SECTION.FIELD", metavar="VALUE", dest="_dotted", default=argparse.SUPPRESS,
                       help=f"any other field, dotted; SECTION is one of {', '.join(sections)}\n"
                            "(e.g. --base_train.depth=12, --resources.env.NCCL_DEBUG=INFO); "
                            "`python -m nanopipe.stages.STAGE --help` lists a stage's fields")
    if stage_flags:
        group.add_argument("--FIELD", metavar="VALUE", dest="_bare", default=argparse.SUPPRESS,
                           help="the stage's own fields may also be given undotted (--depth=6)")


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser whose help `nanopipe COMMAND --help` prints."""
    from flows.stages import STAGE_NAMES
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES.get(command, []))
    if command in ("run", "stage", "status", "command"):
        epilog = f"stages: {', '.join(STAGE_NAMES)}\n\n{epilog}"
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=COMMANDS[command], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command in ("stage", "command"):
        parser.add_argument("name", metavar="NAME", choices=STAGE_NAMES, help="the stage")
    if command == "presets":
        parser.add_argument("name", metavar="NAME", nargs="?", help="also print the values this preset sets")
        return parser
    if command in ("run", "stage", "status", "command"):
        _config_options(parser, stage_flags=command in ("stage", "command"))
        parser.add_argument("--home", metavar="DIR", help=f"NANOPIPE_HOME for this command, where artifacts live "
                                                          f"(default: {_home_default()})")
    if command in ("run", "stage", "deploy"):
        parser.add_argument("--server", metavar="URL|temporary",
                            help=f"the Prefect API to use (default: {_server_default(command)})")
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print the rows as JSON (default: a table)")
    if command == "command":
        parser.add_argument("--exec", action="store_true",
                            help="become the launch command instead of printing it (default: print it)")
    if command == "deploy":
        parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                            help="whether this machine should serve the GPU pool (default: auto, from nvidia-smi)")
    for action in parser._actions:   # argparse's own '(default: ...)' for the options that have one
        if action.help and action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
            action.help += f" (default: {action.default})"
    return parser


def main_parser() -> argparse.ArgumentParser:
    """The parser whose help `nanopipe --help` prints: the commands, one line each."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="nanochat's training pipeline as Prefect flows.",
        epilog=f"`{PROG} COMMAND --help` lists a command's options with their defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text)
    return parser
