"""
How a stage process ends, shared by the stages (`nanopipe.stage_main`) and the launcher that reads the code
(`flows.launcher.classify`). Torch-free: the flow process imports it.

An error a stage reports in one line, without a traceback, is a `StageError`; its class says the exit code.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1      # anything else: a missing or bad input file (one line naming it), a failed download, a bug
    BAD_INPUT = 2   # a bad flag or value, before any work started: fix the command line
    DIVERGED = 3    # the training loss stopped being finite: lower the learning rate or check the data


class StageError(Exception):
    """An error a stage reports as one line naming the input and the fix, then exits with `exit_code`."""

    exit_code: ExitCode = ExitCode.FAILED
