"""
How a stage process ends, shared by the stages (`nanopipe.stage_main`) and the launcher that reads the code
(`flows.launcher.classify`). Torch-free: the flow process imports it.

An error a stage reports in one line, without a traceback, is a `StageError`; its class says the exit code.
The convention for every stage and `python -m nanopipe.data`: a user's input error (a flag, a file, a directory)
is BAD_INPUT, reported as one line naming the input and the fix, before any work where it can be checked then.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1      # anything else: a failed download, a lost process, a bug
    BAD_INPUT = 2   # a bad flag or value, or a missing, corrupt or empty input file (data shard, tokenizer), named
                    # in one line with the fix; not worth retrying: fix the command line or the input
    DIVERGED = 3    # the training loss stopped being finite: lower the learning rate or check the data


class StageError(Exception):
    """An error a stage reports as one line naming the input and the fix, then exits with `exit_code`."""

    exit_code: ExitCode = ExitCode.FAILED
