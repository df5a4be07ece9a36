"""
The judge (`entry.py --judge`; trusted: no code of the candidate ever runs here): runs a problem's code and
test, then check(candidate), where `candidate` is a proxy that sends each call to the sandbox and decodes
the answer into fresh builtin values; writes the verdict, with the caller's token, on a socket that only
the caller holds.
"""

from __future__ import annotations

import json
import os
import sys
import time

from . import MAX_ERROR_CHARS
from .kernel import make_undumpable
from .literals import LineReader, NotLiteral, decode_literal, encode_literal, write_all
from .program import flush_output


class CandidateFailure(BaseException):
    """The candidate failed in a way no test may catch (BaseException: `except Exception` misses it): it
    crashed, ran out of time or memory, or answered with something that is not a literal value."""


class CandidateError(Exception):
    """The candidate raised an exception that is not one of Python's builtin ones."""


class _Candidate:
    """The test's `candidate`: a call crosses to the sandbox as literal values, the answer comes back as one.
    The first failure sticks: every later call fails the same way, and the verdict is a failure whatever
    the test does with the exception."""

    def __init__(self, name: str, calls_fd: int, replies_fd: int, deadline: float):
        self.__name__ = self.__qualname__ = name
        self.calls_fd, self.replies, self.deadline = calls_fd, LineReader(replies_fd), deadline
        self.calls = 0
        self.failure: dict | None = None

    def __repr__(self) -> str:
        return f"<candidate {self.__name__} in the sandbox>"

    def fail(self, error: str, timeout: bool = False, memory_exceeded: bool = False) -> CandidateFailure:
        if self.failure is None:
            self.failure = {"error": error[:MAX_ERROR_CHARS], "timeout": timeout, "memory_exceeded": memory_exceeded}
        return CandidateFailure(self.failure["error"])

    def wait_until_loaded(self) -> None:
        reply = self._receive()
        if reply.get("ready") is not True:
            load = reply.get("load_error")
            load = load if type(load) is dict else {}
            why = load.get("error") or "it did not report that it loaded (it broke the sandbox's protocol)"
            raise self.fail(f"the candidate's program failed: {why}", timeout=load.get("timeout") is True,
                            memory_exceeded=load.get("memory_exceeded") is True)

    def __call__(self, *args, **kwargs):
        if self.failure is not None:
            raise CandidateFailure(self.failure["error"])
        try:
            call = json.dumps({"args": encode_literal(list(args)), "kwargs": encode_literal(kwargs)})
        except (NotLiteral, ValueError) as e:
            raise self.fail(f"the test passed the candidate {e}, which cannot cross to the sandbox") from None
        self.calls += 1
        try:
            write_all(self.calls_fd, (call + "\n").encode())
        except OSError:
            raise self.fail("the candidate's process ended before the call (it exited or crashed)") from None
        reply = self._receive()
        if "value" in reply:
            try:
                return decode_literal(reply["value"])
            except ValueError as e:
                raise self.fail(f"the sandbox answered with {e}") from None
        if "raised" in reply:
            raise self._raised(reply["raised"])
        failure = reply.get("failure")
        raise self.fail(failure if type(failure) is str else "the sandbox sent an unknown message",
                        timeout=reply.get("timeout") is True, memory_exceeded=reply.get("memory_exceeded") is True)

    def _receive(self) -> dict:
        try:
            line = self.replies.readline(self.deadline)
        except TimeoutError:
            raise self.fail("timed out: the candidate did not answer in time", timeout=True) from None
        except ValueError as e:
            raise self.fail(f"the sandbox sent {e}") from None
        if line is None:
            raise self.fail("the candidate's process ended without answering (it exited or crashed)")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = None
        if type(reply) is not dict:
            raise self.fail("the sandbox sent something that is not a message")
        return reply

    def _raised(self, raised) -> BaseException:
        """The candidate's exception, as the same builtin exception type if it is one (a test may expect a
        ValueError), else as a CandidateError; an exit or interrupt is a failure."""
        import builtins
        if not (type(raised) is list and len(raised) == 2 and all(type(part) is str for part in raised)):
            return self.fail("the sandbox sent a malformed exception")
        name, error = raised
        message = error.partition(": ")[2] if error.startswith(name + ": ") else ""
        kind = getattr(builtins, name, None)
        if not isinstance(kind, type) or not issubclass(kind, BaseException):
            kind = None
        elif not issubclass(kind, Exception):  # SystemExit, KeyboardInterrupt, GeneratorExit
            return self.fail(f"the candidate raised {error}")
        exception = None
        if kind is not None:
            try:
                exception = kind(message)
            except Exception:  # a builtin that needs more arguments (UnicodeDecodeError)
                pass
        exception = exception if exception is not None else CandidateError(error)
        exception.candidate_error = error
        return exception


def _describe_test_failure(e: BaseException) -> str:
    """What failed, for the verdict: the candidate's own error, or the test's exception with its line."""
    if hasattr(e, "candidate_error"):
        return f"the candidate raised {e.candidate_error}"
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    tb, where = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            where = tb.tb_lineno
        tb = tb.tb_next
    if where is not None:
        import linecache
        text += f" (test line {where}: {linecache.getline('<test>', where).strip()})"
    return text[:MAX_ERROR_CHARS]


def _judge(spec: dict, calls_fd: int, replies_fd: int) -> dict:
    """Run the problem's trusted code and test, then check(candidate); the verdict."""
    import linecache
    candidate = _Candidate(spec["entry_point"], calls_fd, replies_fd, time.monotonic() + spec["deadline_s"])
    verdict = {"success": False, "error": None, "timeout": False, "memory_exceeded": False}
    namespace = {"__name__": "__main__"}
    linecache.cache["<test>"] = (len(spec["test"]), None, spec["test"].splitlines(True), "<test>")
    try:
        exec(compile(spec["context"], "<context>", "exec"), namespace)
        exec(compile(spec["test"], "<test>", "exec"), namespace)
        if not callable(namespace.get("check")):
            raise NameError("the test defines no check(candidate) function")
    except BaseException as e:  # the problem's own code: its failure is not the candidate's
        verdict["error"] = f"the problem's test does not run: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
        return verdict
    namespace[spec["entry_point"]] = candidate  # a test may call the function by its name (HumanEval/33)
    try:
        candidate.wait_until_loaded()
        namespace["check"](candidate)
        verdict["success"] = True
    except BaseException as e:  # the test failed, whatever it raised
        verdict["error"] = _describe_test_failure(e)
    if candidate.failure is not None:  # even where the test caught it
        verdict.update(success=False, **candidate.failure)
    return {**verdict, "calls": candidate.calls}


def judge_main(argv: list[str]) -> None:
    """The judge, given its descriptors and the problem (with the token) on stdin; never returns."""
    calls_fd, replies_fd, verdict_fd = int(argv[0]), int(argv[1]), int(argv[2])
    make_undumpable()
    spec = json.loads(sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass"))
    sys.stdin = open(os.devnull)
    verdict = _judge(spec, calls_fd, replies_fd)
    os.close(calls_fd)  # the sandbox's serving ends
    flush_output()
    write_all(verdict_fd, (json.dumps({"token": spec["token"], **verdict}) + "\n").encode())
    os._exit(0)
