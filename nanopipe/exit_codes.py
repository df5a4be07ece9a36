"""
How a stage process ends, shared by the stages (`nanopipe.configs.flags.stage_main`) and the launcher that reads
the code (`flows.launcher.classify`). Torch-free: the flow process imports it.

An error a stage reports in one line, without a traceback, is a `StageError`; its class says the exit code.
The convention for every stage and `python -m nanopipe.data`: a user's input error (a flag, a file, a directory)
is BAD_INPUT, reported as one line naming the input and the fix, before any work where it can be checked then.
A StageError that is also a ValueError or a FileNotFoundError is such an error unless its class says otherwise
(a missing checkpoint step, a garbled meta, a tokenizer that does not fit the model): the same kind of failure
exits with the same code in every stage, whichever module raised it.

Under torchrun, each worker exits with its code and torchrun itself exits 1, naming the first failed worker's
code as the root cause; the launcher (`flows.launcher.root_exit_code`) reads that code back.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1      # anything else: a failed download, a lost process, a bug
    BAD_INPUT = 2   # a bad flag or value, or a missing, corrupt or empty input file (data shard, tokenizer), named
                    # in one line with the fix; not worth retrying: fix the command line or the input
    DIVERGED = 3    # the training loss stopped being finite: lower the learning rate or check the data


# What a StageError is about, when its class does not set `exit_code`: a value or a file the user gave.
INPUT_ERRORS = (ValueError, FileNotFoundError)


class StageError(Exception):
    """An error a stage reports as one line naming the input and the fix, then exits with `exit_code`: the
    class's own, else BAD_INPUT for an input error (INPUT_ERRORS), else FAILED."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = any("exit_code" in vars(klass) for klass in cls.__mro__[:cls.__mro__.index(StageError)])
        if not declared:
            cls.exit_code = ExitCode.BAD_INPUT if issubclass(cls, INPUT_ERRORS) else ExitCode.FAILED
