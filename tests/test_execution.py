"""The code sandbox: HumanEval-format problems pass, fail and time out as they should, and escape attempts
(deleting files, fork bombs, infinite loops, network, huge allocations) are each contained."""

import os
import socket
import time

import pytest

from nanopipe.execution import MAX_OUTPUT_BYTES, ExecutionResult, execute_code

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
    good = execute_code(program(problem, problem["solution"]), timeout=2.0)
    assert good.success and good.error is None and not good.timeout, good
    bad = execute_code(program(problem, problem["wrong"]), timeout=1.0)
    assert not bad.success
    if "while True" in problem["wrong"]:
        assert bad.timeout and "timed out" in bad.error
    else:
        assert not bad.timeout and bad.error.startswith("AssertionError"), bad


def test_stdout_stderr_and_errors_are_reported():
    result = execute_code("import sys\nprint('out', 1)\nprint('err', file=sys.stderr)\n")
    assert result == ExecutionResult(success=True, stdout="out 1\n", stderr="err\n", timeout=False, error=None)
    result = execute_code("def f(:\n")
    assert not result.success and result.error.startswith("SyntaxError")
    result = execute_code("raise KeyError('k')")
    assert not result.success and result.error == "KeyError: 'k'"
    result = execute_code("import sys\nsys.exit(0)")  # exiting early must not count as passing the tests
    assert not result.success and "SystemExit" in result.error


def test_works_in_a_private_temporary_directory():
    first = execute_code("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\n"
                         "print(open('scratch.txt').read())")
    assert first.success, first
    workdir = first.stdout.splitlines()[0]
    assert first.stdout.splitlines()[1] == "hi"
    assert workdir != os.getcwd() and not os.path.exists(workdir), "the working directory is removed afterwards"
    second = execute_code("import os\nprint(sorted(os.listdir('.')))")
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
    result = execute_code(attack.format(path=str(victim), folder=str(tmp_path)), timeout=2.0)
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
    result = execute_code(bomb, timeout=2.0)
    assert not result.success
    assert time.monotonic() - start < 10


def test_infinite_loops_are_stopped_even_when_they_fight_back():
    start = time.monotonic()
    plain = execute_code("while True:\n    pass", timeout=0.5)
    assert plain.timeout and not plain.success, plain
    # swallows every exception and ignores the alarm: only the hard kill of the process group ends it
    stubborn = execute_code("import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
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
            result = execute_code(attack.format(port=port), timeout=2.0)
            assert not result.success, f"network call succeeded: {result}"
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_huge_allocations_hit_the_memory_limit():
    for attack in ("x = bytearray(8 * 1024 ** 3)", "x = [0] * (10 ** 9)", "x = ' ' * (2 ** 40)"):
        result = execute_code(attack, max_memory_bytes=128 * 1024 * 1024)
        assert not result.success and result.memory_exceeded, result
    # within the limit, memory is usable
    assert execute_code("x = bytearray(32 * 1024 * 1024)", max_memory_bytes=128 * 1024 * 1024).success


def test_output_floods_are_capped():
    result = execute_code("while True:\n    print('x' * 1000)", timeout=2.0)
    assert not result.success
    assert len(result.stdout) <= MAX_OUTPUT_BYTES + 100 and result.stdout.endswith("[output truncated]")


def test_a_forged_report_does_not_count_as_success():
    # The program writes a success report on every descriptor it can find, then fails.
    forge = ("import os\nfor fd in range(3, 64):\n    try:\n"
             "        os.write(fd, b'{\"success\": true, \"error\": null}\\n')\n    except OSError:\n        pass\n"
             "raise SystemExit(1)")
    result = execute_code(forge)
    assert not result.success
