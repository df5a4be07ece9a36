"""The code sandbox: HumanEval-format problems pass, fail and time out as they should, and escape attempts
(deleting files, fork bombs, infinite loops, network, huge allocations) are each contained. The attacks that
get past the Python-level guards (a directory-relative open, the real `open` recovered by introspection, a
process that detaches itself) are stopped by the kernel: read-only mounts, a PID namespace."""

import os
import secrets
import socket
import tempfile
import time
from pathlib import Path

import pytest

from nanopipe import execution
from nanopipe.execution import (MAX_OUTPUT_BYTES, REQUIRED_PROTECTIONS, ExecutionResult, SandboxProtections,
                                SandboxUnavailableError, execute_code, sandbox_protections)
from tests.procs import pids_with_cmdline

KERNEL = sandbox_protections()
needs_kernel_sandbox = pytest.mark.skipif(
    not KERNEL.complete, reason=f"namespaces cannot be created here ({KERNEL.describe()})")


def run(program: str, **kwargs) -> ExecutionResult:
    """execute_code with the full kernel sandbox where this machine gives it, and the weaker one elsewhere,
    so that what does not depend on namespaces is tested everywhere."""
    return execute_code(program, allow_weaker_sandbox=not KERNEL.complete, **kwargs)


# Hand-written problems in HumanEval's layout: prompt (signature + docstring), a completion, the test
# (a `check(candidate)` function) and the entry point; the program is prompt + completion + test + call.
PROBLEMS = [
    {
        "prompt": 'def add_evens(numbers: list) -> int:\n    """Sum of the even numbers.\n'
                  '    >>> add_evens([1, 2, 3, 4])\n    6\n    """\n',
        "solution": "    return sum(n for n in numbers if n % 2 == 0)\n",
        "wrong": "    return sum(numbers)\n",
        "test": "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == 6\n    assert candidate([]) == 0\n"
                "    assert candidate([7, 9]) == 0\n",
        "entry_point": "add_evens",
    },
    {
        "prompt": 'from typing import List\n\n\ndef rolling_max(xs: List[int]) -> List[int]:\n'
                  '    """Running maximum of the list."""\n',
        "solution": "    out, best = [], None\n    for x in xs:\n        best = x if best is None else max(best, x)\n"
                    "        out.append(best)\n    return out\n",
        "wrong": "    return sorted(xs)\n",
        "test": "def check(candidate):\n    assert candidate([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]\n"
                "    assert candidate([]) == []\n",
        "entry_point": "rolling_max",
    },
    {
        "prompt": 'import hashlib\n\n\ndef md5_or_none(text: str):\n    """md5 hex digest of text, None if empty."""\n',
        "solution": "    return hashlib.md5(text.encode()).hexdigest() if text else None\n",
        "wrong": "    while True:\n        pass\n",
        "test": "def check(candidate):\n    assert candidate('') is None\n"
                "    assert candidate('a') == '0cc175b9c0f1b6a831c399e269772661'\n",
        "entry_point": "md5_or_none",
    },
]


def program(problem, completion):
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\ncheck({problem['entry_point']})\n"


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p["entry_point"] for p in PROBLEMS])
def test_humaneval_problems_pass_and_fail(problem):
    good = run(program(problem, problem["solution"]), timeout=2.0)
    assert good.success and good.error is None and not good.timeout, good
    bad = run(program(problem, problem["wrong"]), timeout=1.0)
    assert not bad.success
    if "while True" in problem["wrong"]:
        assert bad.timeout and "timed out" in bad.error
    else:
        assert not bad.timeout and bad.error.startswith("AssertionError"), bad


def test_stdout_stderr_and_errors_are_reported():
    result = run("import sys\nprint('out', 1)\nprint('err', file=sys.stderr)\n")
    assert result == ExecutionResult(success=True, stdout="out 1\n", stderr="err\n", timeout=False, error=None)
    result = run("def f(:\n")
    assert not result.success and result.error.startswith("SyntaxError")
    result = run("raise KeyError('k')")
    assert not result.success and result.error == "KeyError: 'k'"
    result = run("import sys\nsys.exit(0)")  # exiting early must not count as passing the tests
    assert not result.success and "SystemExit" in result.error


def test_works_in_a_private_temporary_directory():
    first = run("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\n"
                         "print(open('scratch.txt').read())")
    assert first.success, first
    workdir = first.stdout.splitlines()[0]
    assert first.stdout.splitlines()[1] == "hi"
    assert workdir != os.getcwd() and not os.path.exists(workdir), "the working directory is removed afterwards"
    second = run("import os\nprint(sorted(os.listdir('.')))")
    assert second.stdout == "[]\n", "each run starts from an empty directory"


@pytest.mark.parametrize("attack", [
    "import os\nos.remove({path!r})",
    "import os\nos.unlink({path!r})",
    "import posix\nposix.unlink({path!r})",
    "import pathlib\npathlib.Path({path!r}).unlink()",
    "import shutil\nshutil.rmtree({folder!r})",
    "import os\nos.rename({path!r}, 'stolen')",
    "open({path!r}, 'w').write('overwritten')",
    "import pathlib\npathlib.Path({path!r}).write_text('overwritten')",
    "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_TRUNC)",
    "import io\nio.FileIO({path!r}, 'w')",
    "import os\nos.system('rm -rf {folder}')",
    "import subprocess\nsubprocess.run(['rm', '-rf', {folder!r}])",
    "import os\nos.execv('/bin/rm', ['rm', {path!r}])",
    "import ctypes\nctypes.CDLL(None).unlink({path!r}.encode())",
])
def test_files_outside_the_sandbox_survive(tmp_path, attack):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    result = run(attack.format(path=str(victim), folder=str(tmp_path)), timeout=2.0)
    assert not result.success, f"the attack ran to the end: {result}"
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
    "import threading, time\nthreads = [threading.Thread(target=time.sleep, args=(5,)) for _ in range(10000)]\n"
    "for t in threads:\n    t.start()",
    "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while True: pass'])",
])
def test_fork_bombs_are_contained(bomb):
    start = time.monotonic()
    result = run(bomb, timeout=2.0)
    assert not result.success
    assert time.monotonic() - start < 10


def test_infinite_loops_are_stopped_even_when_they_fight_back():
    start = time.monotonic()
    plain = run("while True:\n    pass", timeout=0.5)
    assert plain.timeout and not plain.success, plain
    # swallows every exception and ignores the alarm: only the hard kill of the process group ends it
    stubborn = run("import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                            "while True:\n    try:\n        time.sleep(0.01)\n    except BaseException:\n"
                            "        pass", timeout=0.5)
    assert stubborn.timeout and not stubborn.success, stubborn
    assert time.monotonic() - start < 8


def test_network_is_unreachable_even_on_loopback():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        for attack in ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                       "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
                       "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
                       "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"):
            result = run(attack.format(port=port), timeout=2.0)
            assert not result.success, f"network call succeeded: {result}"
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_huge_allocations_hit_the_memory_limit():
    for attack in ("x = bytearray(8 * 1024 ** 3)", "x = [0] * (10 ** 9)", "x = ' ' * (2 ** 40)"):
        result = run(attack, max_memory_bytes=128 * 1024 * 1024)
        assert not result.success and result.memory_exceeded, result
    # within the limit, memory is usable
    assert run("x = bytearray(32 * 1024 * 1024)", max_memory_bytes=128 * 1024 * 1024).success


def test_output_floods_are_capped():
    result = run("while True:\n    print('x' * 1000)", timeout=2.0)
    assert not result.success
    assert len(result.stdout) <= MAX_OUTPUT_BYTES + 100 and result.stdout.endswith("[output truncated]")


def test_a_forged_report_does_not_count_as_success():
    # The program writes a success report on every descriptor it can find, then fails.
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n"
             "        os.write(fd, b'{\"success\": true, \"error\": null}\\n')\n    except OSError:\n        pass\n"
             "raise SystemExit(1)")
    result = run(forge)
    assert not result.success


# -----------------------------------------------------------------------------
# Escapes past the Python guards: the kernel stops them

@pytest.fixture(params=["under-tmp", "in-checkout"])
def world_writable_dir(request, tmp_path):
    """A directory anyone may write to, outside the sandbox: under /tmp (which the sandbox sees emptied) and
    next to this file (which it sees read-only). The privilege drop alone would not protect either."""
    if request.param == "under-tmp":
        path = tmp_path / "shared"
        path.mkdir()
        path.chmod(0o777)
        yield path
        return
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent, prefix=".sandbox-target-") as folder:
        os.chmod(folder, 0o777)
        yield Path(folder)


def assert_stopped_by_the_kernel(result: ExecutionResult, folder: Path) -> None:
    assert not result.success, f"the escape ran to the end: {result}"
    # an OSError from the kernel (read-only, or not there at all), not the Python guard's refusal
    assert result.error.startswith(("OSError", "FileNotFoundError", "PermissionError: [Errno")), result
    assert "disabled in the sandbox" not in result.error, result
    assert list(folder.iterdir()) == [], "a file was created outside the sandbox"


@needs_kernel_sandbox
def test_directory_relative_open_cannot_create_files_outside(world_writable_dir):
    # the guard checks the relative name against the working directory; dir_fd points elsewhere
    attack = (f"import os\nfolder = os.open({str(world_writable_dir)!r}, os.O_RDONLY)\n"
              "fd = os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder)\nos.write(fd, b'out')")
    assert_stopped_by_the_kernel(execute_code(attack, timeout=2.0), world_writable_dir)


@needs_kernel_sandbox
@pytest.mark.parametrize("recover", [
    "import builtins\nreal_open = next(c.cell_contents for c in builtins.open.__closure__\n"
    "                 if getattr(c.cell_contents, '__name__', '') == 'open')",
    "import gc, builtins\nreal_open = next(o for o in gc.get_referents(*builtins.open.__closure__)\n"
    "                 if getattr(o, '__name__', '') == 'open' and o is not builtins.open)",
    "import io\nreal_open = io.FileIO.__bases__[0]",  # the real FileIO under the guarded subclass
], ids=["closure", "gc-referents", "base-class"])
def test_the_real_open_recovered_by_introspection_cannot_write_outside(world_writable_dir, recover):
    target = world_writable_dir / "escaped.txt"
    attack = f"{recover}\nassert real_open is not open\nreal_open({str(target)!r}, 'w').write('out')"
    assert_stopped_by_the_kernel(execute_code(attack, timeout=2.0), world_writable_dir)


@needs_kernel_sandbox
@pytest.mark.parametrize("then", ["", "while True:\n    pass\n"], ids=["program-ends", "killed-at-deadline"])
def test_no_process_outlives_the_sandbox(then):
    marker = f"600.{secrets.randbelow(10 ** 6):06d}"  # a sleep duration nothing else uses
    # a fresh posix module has the real fork/setsid/execv; the detached child checks in through /proc
    attack = ("import sys, os, time\nfor name in ('posix', 'os'):\n    sys.modules.pop(name, None)\n"
              "import posix\nif posix.fork() == 0:\n    posix.setsid()\n"
              f"    posix.execv('/bin/sleep', ['sleep', '{marker}'])\n"
              "time.sleep(0.5)\n"
              "print(any(b'" + marker + "' in open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc')\n"
              "          if p.isdigit()), flush=True)\n" + then)
    result = execute_code(attack, timeout=2.0)
    try:
        assert result.stdout == "True\n", f"the detached process never ran: {result}"
        assert result.success if not then else result.timeout, result
        assert pids_with_cmdline(marker) == [], "a process of the sandbox is still running"
    finally:
        for pid in pids_with_cmdline(marker):
            os.kill(pid, 9)


@needs_kernel_sandbox
def test_the_program_sees_a_read_only_world_and_holds_no_capability():
    result = execute_code("import os\nprint(os.getcwd())\n"
                          "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
                          "print(open('/proc/self/status').read())\nprint(open('/proc/self/mountinfo').read())\n"
                          "print(sorted(os.listdir('/tmp')))")
    assert result.success, result
    lines = result.stdout.splitlines()
    work_dir, pids = lines[0], lines[1]
    assert pids == "['1']", "alone in its PID namespace, as its init, with a /proc of its own"
    status = dict(line.split(":\t", 1) for line in lines if line.startswith(("Cap", "NoNewPrivs")))
    assert all(int(status[name], 16) == 0 for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb")), status
    assert status["NoNewPrivs"] == "1"
    mounts = [line.split() for line in lines if " - " in line]
    writable = [fields[4] for fields in mounts if "rw" in fields[5].split(",")]
    assert writable == [work_dir], f"only the private working directory may be writable: {writable}"
    assert [fields[fields.index("-") + 1] for fields in mounts if fields[4] == work_dir] == ["tmpfs"]
    assert lines[-1] == f"['{Path(work_dir).parent.name}']", "the host's /tmp is not visible"


# -----------------------------------------------------------------------------
# Where the kernel cannot isolate, untrusted code is refused unless the caller accepts less

def test_refuses_without_namespaces_unless_allowed(monkeypatch, tmp_path):
    weaker = SandboxProtections(frozenset({"nobody", "network-namespace"}))
    monkeypatch.setattr(execution, "sandbox_protections", lambda: weaker)
    assert not weaker.complete and "pid-namespace" in weaker.missing
    with pytest.raises(SandboxUnavailableError, match="allow_weaker_sandbox=True.*--allow_unsandboxed_code"):
        execute_code(f"open({str(tmp_path / 'ran')!r}, 'w')")
    assert not (tmp_path / "ran").exists()
    assert execute_code("print('ran')", allow_weaker_sandbox=True).stdout == "ran\n"


def test_the_protections_are_named():
    assert KERNEL.describe().startswith("code sandbox: ")
    assert KERNEL.complete == all(name in KERNEL.active for name in REQUIRED_PROTECTIONS)
    assert KERNEL is sandbox_protections(), "found once per process"


def test_chat_eval_opts_in_only_with_its_flag(monkeypatch, tmp_path):
    import json

    from nanopipe.configs.base import non_semantic_fields
    from nanopipe.configs.chat_eval import ChatEvalConfig
    from nanopipe.stages.chat_eval import load_eval_task

    row = {"task_id": "Local/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
           "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    (tmp_path / "humaneval.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(execution, "sandbox_protections", lambda: SandboxProtections(frozenset({"nobody"})))
    assert ChatEvalConfig().allow_unsandboxed_code is False
    assert "allow_unsandboxed_code" in non_semantic_fields(ChatEvalConfig), "it does not change the scores"
    for allowed in (False, True):
        cfg = ChatEvalConfig(humaneval_path=str(tmp_path / "humaneval.jsonl"), allow_unsandboxed_code=allowed)
        task = load_eval_task("HumanEval", cfg)
        solution = "def add(a, b):\n    return a + b\n"
        if allowed:
            assert task.evaluate(task[0], solution) == 1
        else:
            with pytest.raises(SandboxUnavailableError, match="--allow_unsandboxed_code"):
                task.evaluate(task[0], solution)
