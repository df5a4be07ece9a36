"""
The untrusted program, in the init of the sandbox's namespaces (or in the launcher itself where there are
none): run_program limits the process, puts up the guards, runs the program and reports how it went; given
a pipe of calls, it then serves calls of the function the program defined (serve), arguments and results
crossing as literal values only, one JSON line each.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import signal
import sys

from . import MAX_ERROR_CHARS
from .guards import disable_dangerous, guard_writes, set_limits
from .literals import LineReader, NotLiteral, decode_literal, encode_literal, write_all


class SandboxTimeout(BaseException):
    """Raised inside the program when its wall-clock time is up (BaseException: `except Exception` misses it)."""


def run_program(header: dict, program: str, report_fd: int, calls_fd: int, work_dir: str, timeout: float,
                 max_memory_bytes: int, in_namespace: bool) -> None:
    """Limit this process, put up the Python guards, run the program and report how it went (to the parent,
    or to the judge whose calls it then serves); never returns."""
    import linecache
    from traceback import format_exception as format_exc
    write, exit_now = os.write, os._exit
    set_limits(timeout, max_memory_bytes, in_namespace)
    guard_writes(work_dir)
    disable_dangerous()

    def on_alarm(signum, frame):
        raise SandboxTimeout(f"timed out after {timeout:g} s")

    def on_cpu_limit(signum, frame):
        raise SandboxTimeout(f"CPU time limit exceeded ({math.ceil(timeout) + 1} s)")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGXCPU, on_cpu_limit)  # as the init, an unhandled SIGXCPU would be ignored
    report = {"token": header["token"], "success": False, "timeout": False, "memory_exceeded": False, "error": None}
    # tracebacks show the program's lines
    linecache.cache["<program>"] = (len(program), None, program.splitlines(True), "<program>")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    budget_s = timeout  # what is left of it goes to the calls the judge makes
    try:
        code = compile(program, "<program>", "exec")
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(code, namespace)
        finally:
            budget_s = signal.setitimer(signal.ITIMER_REAL, 0)[0]
        report["success"] = True
    except BaseException as e:  # the program's failure is the result we report, whatever it was
        report.update(_describe_failure(e, max_memory_bytes, format_exc))
    flush_output()
    if calls_fd < 0:
        write(report_fd, (json.dumps(report) + "\n").encode())
        exit_now(0)
    function = namespace.get(header["entry_point"])
    if report["success"] and not callable(function):
        report.update(success=False, error=f"NameError: the program defines no function {header['entry_point']!r}")
    if not report["success"]:
        write_all(report_fd, (json.dumps({"load_error": report}) + "\n").encode())
        exit_now(0)
    write_all(report_fd, b'{"ready": true}\n')
    serve(function, timeout, budget_s, calls_fd, report_fd, max_memory_bytes, format_exc)
    exit_now(0)


def _describe_failure(e: BaseException, max_memory_bytes: int, format_exc) -> dict:
    """The report's fields for an exception of the program (its traceback goes to stderr)."""
    if isinstance(e, SandboxTimeout):
        return {"timeout": True, "error": str(e)}
    if isinstance(e, MemoryError):
        return {"memory_exceeded": True, "error": f"MemoryError: over the memory limit of {max_memory_bytes} bytes"}
    try:
        message = str(e)
    except Exception:  # the program's own exception class may fail to describe itself
        message = ""
    try:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # skip the sandbox's frame
        sys.stderr.write("".join(format_exc(type(e), e, tb)))
    except (OSError, ValueError):
        pass
    return {"error": (f"{type(e).__name__}: {message}" if message else type(e).__name__)[:MAX_ERROR_CHARS]}


def flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def serve(function, timeout: float, budget_s: float, calls_fd: int, replies_fd: int, max_memory_bytes: int,
           format_exc) -> None:
    """Answer the judge's calls of `function`, one JSON line each, until it closes the calls pipe or something
    ends the session (time up, memory, an answer that is not a literal value). The program's time limit
    covers the calls together: the clock stops while waiting for the next one."""
    reader = LineReader(calls_fd)
    while (line := reader.readline()) is not None:
        call = json.loads(line)
        args, kwargs = decode_literal(call["args"]), decode_literal(call["kwargs"])
        reply = None
        try:
            if budget_s <= 0:
                raise SandboxTimeout(f"timed out after {timeout:g} s")
            signal.setitimer(signal.ITIMER_REAL, budget_s)
            try:
                value = function(*args, **kwargs)
                try:  # a generator's code runs now, on the same clock
                    reply = {"value": encode_literal(value)}
                except (NotLiteral, RecursionError) as e:
                    reply = {"failure": f"the candidate returned {e}, which is not a literal value (numbers, strings, "
                                        f"bytes, None, and lists, tuples, dicts and sets of them)"}
            finally:
                budget_s = signal.setitimer(signal.ITIMER_REAL, 0)[0]
        except (SandboxTimeout, MemoryError) as e:
            reply = {"failure": _describe_failure(e, max_memory_bytes, format_exc)["error"],
                     "timeout": isinstance(e, SandboxTimeout), "memory_exceeded": isinstance(e, MemoryError)}
        except BaseException as e:  # raised by the candidate: the test decides what that means
            reply = {"raised": [type(e).__name__, _describe_failure(e, max_memory_bytes, format_exc)["error"]]}
        flush_output()
        try:
            data = (json.dumps(reply) + "\n").encode()
        except ValueError as e:  # an int too long to print (sys.get_int_max_str_digits)
            failure = f"the candidate returned a value that cannot be written: {e}"
            data = (json.dumps({"failure": failure}) + "\n").encode()
        write_all(replies_fd, data)
        if "failure" in reply:
            return
