"""
How a stage process ends, shared by the stages (`nanopipe.stage_main`) and the launcher that reads the code
(`flows.launcher.classify`). Torch-free: the flow process imports it.

An error a stage reports in one line, without a traceback, is a `StageError`; its class says the exit code.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1      # anything else: a bug, a failed download, ... (a traceback or one line)
    BAD_INPUT = 2   # a bad flag, or a bad input the flags name (checkpoint, tokenizer, task data): fix the input
    DIVERGED = 3    # the training loss stopped being finite: lower the learning rate or check the data


class StageError(Exception):
    """An error a stage reports as one line naming the input and the fix, then exits with `exit_code`."""

    exit_code: ExitCode = ExitCode.FAILED


class BadInputError(StageError):
    """A flag or an input file/directory is wrong; running again without changing it cannot help."""

    exit_code = ExitCode.BAD_INPUT
