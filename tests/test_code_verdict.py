"""Scores no program can forge (issue 21): a HumanEval completion runs in the sandbox, the test runs in a
separate judge process that calls it with literal values only, so code placed before the tests cannot
score itself. Every forging route scores 0 (and, as a control, does forge a pass against a harness that
shares the candidate's interpreter); a right completion scores 1; on the real HumanEval problems every
canonical solution scores 1 and every route 0. Also: what the judge does with a candidate that raises,
hangs, crashes, prints, or returns something that is not a literal value."""

import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from nanopipe import execution
from nanopipe.execution import ExecutionResult, check_candidate, execute_code, sandbox_protections
from nanopipe.sandbox.literals import NotLiteral, decode_literal, encode_literal
from nanopipe.tasks.humaneval import HumanEval, build_program

KERNEL = sandbox_protections()
WEAKER = not KERNEL.complete  # where namespaces cannot be made, the same checks run in the weaker sandbox
TIMEOUT_S = 10.0              # generous: the machine running the tests may be busy


def check(code: str, test: str, entry_point: str, **kwargs) -> ExecutionResult:
    return check_candidate(code, test, entry_point, allow_weaker_sandbox=WEAKER, **{"timeout": TIMEOUT_S, **kwargs})


def parallel(function, items) -> list:
    """Each check is two short-lived interpreters: a few at once keep the CPUs busy."""
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return list(pool.map(function, items))


# -----------------------------------------------------------------------------
# The forging routes. Each defines `_forge()`, which the completion calls when it loads and again inside
# the function before its (wrong) answer; a route that returns a value makes that the answer.

FORGING_ROUTES = {
    # the harness's locals, found by walking up the frames: any report with a `success` becomes a pass
    "frame-locals": '''
def _forge():
    import sys
    frame = sys._getframe(1)
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for value in list(scope.values()):
                if isinstance(value, dict) and "success" in value:
                    value.update(success=True, error=None, timeout=False)
            if "success" in scope:
                scope["success"] = True
        frame = frame.f_back
''',
    # the harness's token, read from its frames, on a "passed" line written to every descriptor
    "token-and-pipe": '''
def _forge():
    import json, posix, sys
    tokens, frame = set(), sys._getframe(1)
    while frame is not None:
        for value in list(frame.f_locals.values()):
            value = value.get("token") if isinstance(value, dict) else value
            if isinstance(value, str) and len(value) == 32 and value.isalnum():
                tokens.add(value)
        frame = frame.f_back
    passed = {"success": True, "error": None, "timeout": False, "memory_exceeded": False}
    data = "".join(json.dumps({"token": token, **passed}) + "\\n" for token in tokens or [""]).encode()
    for fd in range(3, 256):
        try:
            posix.write(fd, data)
        except OSError:
            pass
''',
    # the harness's own write and exit, found in its frame: a "passed" report, then exit before the tests
    "harness-exit": '''
def _forge():
    import json, sys
    frame = sys._getframe(1)
    while frame is not None:
        scope = frame.f_locals
        exits = [v for v in scope.values() if getattr(v, "__name__", "") == "_exit"]
        if exits:
            writes = [v for v in scope.values() if getattr(v, "__name__", "") == "write" and callable(v)]
            for report in [v for v in scope.values() if isinstance(v, dict) and "token" in v]:
                report.update(success=True, error=None)
                for fd in [v for k, v in scope.items() if k.endswith("_fd") and isinstance(v, int)]:
                    for write in writes:
                        try:
                            write(fd, (json.dumps(report) + "\\n").encode())
                        except OSError:
                            pass
            exits[0](0)
        frame = frame.f_back
''',
    # exit with status 0 before any test runs, through a fresh posix module (os._exit itself is guarded)
    "os-exit": '''
def _forge():
    import sys
    for name in ("posix", "os"):
        sys.modules.pop(name, None)
    import posix
    posix._exit(0)
''',
    # AssertionError and builtins replaced, and the JSON encoder any report goes through made to say "passed"
    "monkeypatch-builtins": '''
def _forge():
    import builtins, json
    if getattr(json.dumps, "forged", False):
        return
    real_dumps, real_isinstance = json.dumps, isinstance
    class NeverRaised(BaseException):
        pass
    builtins.AssertionError = NeverRaised
    builtins.abs = lambda value: 0
    builtins.all = builtins.any = lambda *args: True
    builtins.round = lambda *args, **kwargs: 0
    def dumps(obj, *args, **kwargs):
        if real_isinstance(obj, dict) and "success" in obj:
            obj = {**obj, "success": True, "error": None}
        return real_dumps(obj, *args, **kwargs)
    dumps.forged = True
    json.dumps = dumps
''',
    # "passed" in every format this project's pipes have used, on every descriptor 0..255
    "every-fd": '''
def _forge():
    import json, posix
    passed = {"success": True, "error": None, "timeout": False, "memory_exceeded": False, "calls": 1}
    lines = [passed, {"token": "0" * 32, **passed}, {"ready": True}, {"value": True}, {"value": None},
             {"killed_at_deadline": False, "returncode": 0}]
    data = "".join(json.dumps(line) + "\\n" for line in lines).encode()
    for fd in range(256):
        try:
            posix.write(fd, data)
        except OSError:
            pass
''',
    # an answer equal to everything (and close to everything, and true)
    "always-equal": '''
class _AlwaysEqual:
    __hash__ = object.__hash__
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __bool__(self): return True
    def __abs__(self): return 0
    def __sub__(self, other): return self
    __rsub__ = __add__ = __radd__ = __mul__ = __rmul__ = __truediv__ = __sub__
def _forge():
    return _AlwaysEqual()
''',
    # a literal type's subclass that says it equals everything
    "equal-subclass": '''
class _EqualInt(int):
    __hash__ = int.__hash__
    def __eq__(self, other): return True
    def __ne__(self, other): return False
def _forge():
    return _EqualInt(0)
''',
}

# Against a harness that runs the tests in the candidate's own interpreter (execute_code on the whole
# program), these routes do forge a pass: the control that they are live. os-exit and every-fd do not
# forge that harness (it wants a report carrying its token), but scoring 0 is asserted for them all the same.
FORGES_AN_IN_PROCESS_HARNESS = ("frame-locals", "token-and-pipe", "harness-exit", "monkeypatch-builtins",
                                "always-equal", "equal-subclass")


def forging_completion(route: str, function: str, wrong_body: str, placement: str = "load+call") -> str:
    """A completion: the route, called as the code loads (unless placement is "call") and at the start of
    the function, whose own answer is wrong."""
    return (FORGING_ROUTES[route] + ("\n_forge()\n" if placement == "load+call" else "\n")
            + f"\n{function}\n    forged = _forge()\n    if forged is not None:\n        return forged\n{wrong_body}")


# A HumanEval-format problem (prompt, test with METADATA and check(candidate), entry point)
ADD = {
    "task_id": "Local/add", "entry_point": "add",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
    "canonical_solution": "    return a + b\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n    assert candidate(10, 0) == 10\n",
}
ADD_WRONG = "    return a - b\n"


@pytest.fixture(scope="module")
def add_task(tmp_path_factory) -> HumanEval:
    path = tmp_path_factory.mktemp("humaneval") / "add.jsonl"
    path.write_text(json.dumps(ADD) + "\n")
    return HumanEval(data_path=path, timeout_s=TIMEOUT_S, allow_weaker_sandbox=WEAKER)


def test_a_right_completion_scores_1_and_a_wrong_one_0(add_task):
    conversation = add_task[0]
    assert add_task.evaluate(conversation, "```python\ndef add(a, b):\n    return a + b\n```") == 1
    assert add_task.evaluate(conversation, conversation["messages"][1]["content"]) == 1
    assert add_task.evaluate(conversation, f"def add(a, b):\n{ADD_WRONG}") == 0


@pytest.mark.parametrize("placement", ["load+call", "call"])
@pytest.mark.parametrize("route", FORGING_ROUTES)
def test_every_forging_route_scores_0(add_task, route, placement):
    completion = forging_completion(route, "def add(a, b):", ADD_WRONG, placement)
    assert add_task.evaluate(add_task[0], completion) == 0


@pytest.mark.parametrize("route", FORGES_AN_IN_PROCESS_HARNESS)
def test_the_routes_are_live_against_a_harness_in_the_candidates_process(add_task, route):
    completion = forging_completion(route, "def add(a, b):", ADD_WRONG)
    honest = execute_code(build_program(add_task[0], f"def add(a, b):\n{ADD_WRONG}"), timeout=TIMEOUT_S,
                          allow_weaker_sandbox=WEAKER)
    forged = execute_code(build_program(add_task[0], completion), timeout=TIMEOUT_S, allow_weaker_sandbox=WEAKER)
    assert not honest.success and forged.success, f"the route no longer forges an in-process harness: {forged}"


def test_the_verdict_says_why(add_task):
    result = check(forging_completion("os-exit", "def add(a, b):", ADD_WRONG), ADD["test"], "add")
    assert not result.success and "ended" in result.error, result
    result = check(forging_completion("always-equal", "def add(a, b):", ADD_WRONG), ADD["test"], "add")
    assert "returned a value of type _AlwaysEqual, which is not a literal value" in result.error, result
    result = check(f"def add(a, b):\n{ADD_WRONG}", ADD["test"], "add")
    assert result.error == "AssertionError (test line 7: assert candidate(2, 3) == 5)", result


def test_the_sandbox_never_holds_the_verdicts_token(monkeypatch):
    token = "5ec2e7" * 5 + "00"
    monkeypatch.setattr(execution, "secrets", SimpleNamespace(token_hex=lambda nbytes: token))
    # everything the program can read about itself: every frame's variables, its arguments and environment
    search = ("import sys\ndef f(x):\n    seen, frame = [repr(sys.argv)], sys._getframe()\n"
              "    while frame is not None:\n        seen += [repr(frame.f_locals), repr(frame.f_globals)]\n"
              "        frame = frame.f_back\n    for name in ('cmdline', 'environ'):\n        try:\n"
              "            seen.append(repr(open('/proc/self/' + name, 'rb').read()))\n"
              "        except OSError:  # environ: unreadable once not dumpable\n            pass\n"
              f"    return {token[::-1]!r}[::-1] in ''.join(seen)\n")  # (its own source holds the token reversed)
    result = check(search, "def check(candidate):\n    assert candidate(0) is False\n", "f")
    assert result.success, result
    # the control: execute_code's program carries its token, and the same search finds it
    found = execute_code(search + "assert f(0)\n", allow_weaker_sandbox=WEAKER)
    assert found.success, found


# -----------------------------------------------------------------------------
# The judge's side of the proxy

TEST = "def check(candidate):\n    assert candidate({arg}) == {expected}\n"
# a function that kills its own process (a fresh posix module has the abort the guards disable)
CRASH = "import sys\nsys.modules.pop('posix', None)\nimport posix\ndef f(x):\n    posix.abort()\n"


def test_answers_cross_as_literals():
    values = [None, True, 0, -3, 2 ** 100, 1.5, float("inf"), -0.0, "é\udc80", b"\x00\xff", 1 + 2j, [1, [2]],
              (1, (2,)), {"a": 1, 2: (3,), (4, 5): None}, {1, "x", (2,)}, frozenset({1}), [], (), {}, set()]
    for value in values:
        decoded = decode_literal(json.loads(json.dumps(encode_literal(value))))
        assert decoded == value and type(decoded) is type(value), value
    nan = decode_literal(json.loads(json.dumps(encode_literal(float("nan")))))
    assert nan != nan
    from collections import Counter, OrderedDict, namedtuple
    point = namedtuple("Point", "x y")
    for value, plain in [(Counter("aab"), {"a": 2, "b": 1}), (OrderedDict(a=1), {"a": 1}), (point(1, 2), (1, 2))]:
        decoded = decode_literal(encode_literal(value))
        assert decoded == plain and type(decoded) is type(plain)
    assert list(decode_literal(encode_literal(x * x for x in range(3)))) == [0, 1, 4]
    for value in (object(), print, {1: object()}, range(3), {}.keys()):
        with pytest.raises(NotLiteral):
            encode_literal(value)
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(NotLiteral, match="nested deeper"):
        encode_literal(deep)
    for garbage in ({"tuple": 1}, {"set": [[1]]}, {"dict": [[[1], 2]]}, {"complex": [1, "x"]}, {"a": 1, "b": 2},
                    {"bytes": "zz"}, {"complex": [10 ** 400, 0]}):
        with pytest.raises(ValueError):
            decode_literal(garbage)


def test_values_of_every_kind_reach_the_test():
    code = "def f(x):\n    return x\n"
    args = "[1, 2.5, 'a', b'b', (1, 2), {3}, frozenset({4}), {'k': [None, True]}, 1j, 2 ** 100]"
    assert check(code, TEST.format(arg=args, expected=args), "f").success
    # a generator crosses as what it yields: a test that makes a tuple of it passes (HumanEval/33 does)
    result = check("def f(n):\n    return (i for i in range(n))\n",
                   "def check(candidate):\n    assert tuple(candidate(3)) == (0, 1, 2)\n"
                   "    assert candidate(2) != [0, 1]\n", "f")
    assert result.success, result
    # keyword arguments, and a test that calls the function by its own name
    result = check("def f(a, b=0):\n    return a - b\n",
                   "def check(candidate):\n    assert candidate(5, b=2) == 3\n    assert f(1) == 1\n", "f")
    assert result.success, result


def test_the_prompts_helpers_are_the_problems_not_the_candidates():
    # HumanEval/38 and /50: the test encodes with the prompt's helper; the completion redefines it
    prompt = "def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    \"\"\"Undo encode.\"\"\"\n"
    test = "def check(candidate):\n    for s in ('abc', 'xy'):\n        assert candidate(encode(s)) == s\n"
    cheat = "def encode(s):\n    return s\n\n\ndef decode(s):\n    return s\n"
    assert not check(cheat, test, "decode", context=prompt).success
    assert check("def decode(s):\n    return s[::-1]\n", test, "decode", context=prompt).success


def test_a_candidate_that_raises_fails_unless_the_test_expects_it():
    raises = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    result = check(raises, TEST.format(arg=-1, expected=-1), "f")
    assert not result.success and result.error == "the candidate raised ValueError: negative", result
    assert "ValueError: negative" in result.stderr, "the candidate's traceback is kept"
    expects = ("def check(candidate):\n    assert candidate(1) == 1\n    try:\n        candidate(-1)\n"
               "    except ValueError as e:\n        assert str(e) == 'negative'\n    else:\n        assert False\n")
    assert check(raises, expects, "f").success
    # its own exception class reaches the test as a CandidateError (an Exception)
    own = "class Oops(Exception):\n    pass\n\ndef f(x):\n    raise Oops('no')\n"
    result = check(own, expects, "f")
    assert not result.success and "Oops: no" in result.error, result
    # an exit is not an exception a test may catch: it fails even where the test catches everything
    catch_all = "def check(candidate):\n    try:\n        candidate(1)\n    except BaseException:\n        pass\n"
    result = check("import sys\ndef f(x):\n    sys.exit(0)\n", catch_all, "f")
    assert not result.success and "SystemExit" in result.error, result


def test_failures_stick_even_where_the_test_catches_them():
    catch_all = ("def check(candidate):\n    for x in range(3):\n        try:\n            candidate(x)\n"
                 "        except BaseException:\n            pass\n")
    for code, why in [("def f(x):\n    return object()\n", "not a literal value"),
                      (CRASH, "ended"),
                      ("def f(x):\n    while True:\n        pass\n", "timed out")]:
        result = check(code, catch_all, "f", timeout=2.0)
        assert not result.success and why in result.error, (code, result)


def test_hanging_and_crashing_candidates_fail_within_the_deadline():
    test = TEST.format(arg=1, expected=1)
    loop = check("def f(x):\n    while True:\n        pass\n", test, "f", timeout=1.0)
    assert loop.timeout and "timed out" in loop.error, loop
    # it blocks the alarm: the judge's deadline and the launcher's kill end it
    stubborn = check("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                     "def f(x):\n    while True:\n        try:\n            pass\n        except BaseException:\n"
                     "            pass\n", test, "f", timeout=1.0)
    assert stubborn.timeout and not stubborn.success, stubborn
    # the time limit covers the calls together: many quick calls pass, each taking a share
    many = "def check(candidate):\n    for i in range(300):\n        assert candidate(i) == i\n"
    assert check("def f(x):\n    return x\n", many, "f").success
    slow = "import time\ndef f(x):\n    time.sleep(0.4)\n    return x\n"
    result = check(slow, "def check(candidate):\n    for i in range(10):\n        assert candidate(i) == i\n", "f",
                   timeout=1.0)
    assert result.timeout and not result.success, result
    crash = check(CRASH, test, "f")
    assert not crash.success and "ended without answering" in crash.error, crash
    memory = check("def f(x):\n    return ' ' * (2 ** 40)\n", test, "f", max_memory_bytes=128 * 1024 * 1024)
    assert memory.memory_exceeded and not memory.success, memory


def test_programs_that_do_not_load_fail_with_their_error():
    test = TEST.format(arg=1, expected=1)
    for code, error in [("def f(x:\n", "SyntaxError"), ("raise KeyError('k')\n", "KeyError: 'k'"),
                        ("def g(x):\n    return x\n", "defines no function 'f'"), ("f = 3\n", "defines no function")]:
        result = check(code, test, "f")
        assert not result.success and error in result.error, (code, result)


def test_the_candidates_output_is_kept_apart_from_the_verdict():
    code = ("import sys\nprint('loading')\ndef f(x):\n    print('{\"success\": true}')\n"
            "    print('err', file=sys.stderr)\n    return x\n")
    result = check(code, TEST.format(arg=1, expected=2), "f")
    assert not result.success and result.stdout == 'loading\n{"success": true}\n' and result.stderr == "err\n", result


def test_a_test_that_does_not_run_is_a_failure_that_says_so():
    result = check("def f(x):\n    return x\n", "def check(candidate)\n", "f")
    assert not result.success and result.error.startswith("the problem's test does not run: SyntaxError"), result
    result = check("def f(x):\n    return x\n", "assert True\n", "f")
    assert not result.success and "no check(candidate)" in result.error, result
    result = check("def f(x):\n    return x\n", "def check(candidate):\n    candidate(object())\n", "f")
    assert not result.success and "cannot cross to the sandbox" in result.error, result


# -----------------------------------------------------------------------------
# The real HumanEval problems

def load_real(shared_dir) -> HumanEval:
    path = shared_dir / "data" / "humaneval" / "HumanEval.jsonl"
    if not path.is_file():
        pytest.skip(f"the real HumanEval problems are not at {path}")
    return HumanEval(data_path=path, shuffle_seed=None, timeout_s=TIMEOUT_S, allow_weaker_sandbox=WEAKER)


def forging_completion_for(conversation: dict, route: str, placement: str = "load+call") -> str:
    """The route around the prompt's own stub, which answers None (wrong on every problem)."""
    name = conversation["entry_point"]
    return forging_completion(route, conversation["messages"][0]["content"] + f"\n_stub = {name}\n\n"
                              f"def {name}(*args, **kwargs):", f"    return _stub(*args, **kwargs)\n", placement)


# A few problems of different kinds: lists, a float root checked with the prompt's helper (32), strings
# through the prompt's encoder (38), the test calling the function by name (33), random arguments (53).
SAMPLE = ("HumanEval/0", "HumanEval/32", "HumanEval/33", "HumanEval/38", "HumanEval/53", "HumanEval/95")


def test_every_canonical_solution_scores_1_and_every_stub_0(shared_dir):
    task = load_real(shared_dir)
    conversations = [task[i] for i in range(task.num_examples())]
    assert len(conversations) == 164
    canonical = parallel(lambda c: task.evaluate(c, c["messages"][1]["content"]), conversations)
    assert [c["task_id"] for c, score in zip(conversations, canonical) if score != 1] == []
    sample = [c for c in conversations if c["task_id"] in SAMPLE]
    stubs = parallel(lambda c: task.evaluate(c, c["messages"][0]["content"]), sample)
    assert stubs == [0] * len(SAMPLE)


@pytest.fixture
def scored(monkeypatch):
    """scored(task, [(conversation, completion), ...]): task.evaluate of each, in parallel, as (score, the
    sandbox's result that the score was made from)."""
    kept, real_check = threading.local(), execution.check_candidate

    def keeping(*args, **kwargs) -> ExecutionResult:
        kept.result = real_check(*args, **kwargs)
        return kept.result

    monkeypatch.setattr(execution, "check_candidate", keeping)  # HumanEval.evaluate imports it when it runs

    def evaluate(task: HumanEval, conversation: dict, completion: str) -> tuple[int, ExecutionResult]:
        return task.evaluate(conversation, completion), kept.result
    return lambda task, cases: parallel(lambda case: evaluate(task, *case), cases)


# What a route leaves the judge with, whatever the problem: the stub's own answers (the route's effects stay
# in the sandbox), or one failure of the candidate, the same on every problem (a failure sticks: the verdict
# is failed whatever the test does with it). Not these, whose answer crosses as a literal (the int 0): whether
# that passes depends on what the problem expects.
ANSWERS_AS_A_LITERAL = ("equal-subclass",)


def forging_failures(scored, task: HumanEval, conversations: list[dict], stubs: dict[str, ExecutionResult]) -> list:
    """What does not hold on these problems: a (problem, route, placement) that scores anything but 0, or a
    route (but those ANSWERS_AS_A_LITERAL) whose verdict is neither the stub's (`stubs`, by task id) on each
    problem nor one failure the same on all. Every route is called as the code loads and in the call; those
    that end the process are tried in the call alone too."""
    cases = [(c, route, "load+call") for c in conversations for route in FORGING_ROUTES]
    cases += [(c, route, "call") for c in conversations for route in ("harness-exit", "os-exit")]
    results = scored(task, [(c, forging_completion_for(c, route, placement)) for c, route, placement in cases])
    failures = [(c["task_id"], route, placement, score) for (c, route, placement), (score, _) in zip(cases, results)
                if score != 0]
    errors = {}
    for (c, route, placement), (_, result) in zip(cases, results):
        errors.setdefault((route, placement), []).append((stubs[c["task_id"]].error, result.error))
    for (route, placement), pairs in errors.items():
        as_the_stub = all(stub == error for stub, error in pairs)
        one_failure = len({error for _, error in pairs}) == 1 and "(test line" not in pairs[0][1]
        if not (as_the_stub or one_failure or route in ANSWERS_AS_A_LITERAL):
            failures.append((route, placement, "depends on the problem", pairs))
    return failures


def stub_results(scored, task: HumanEval, conversations: list[dict]) -> dict[str, ExecutionResult]:
    """The prompt's own stub (it answers None) on each problem, by task id; each must score 0."""
    results = scored(task, [(c, c["messages"][0]["content"]) for c in conversations])
    assert [c["task_id"] for c, (score, _) in zip(conversations, results) if score != 0] == [], "a stub passes"
    return {c["task_id"]: result for c, (_, result) in zip(conversations, results)}


def test_forging_routes_score_0_on_a_sample_of_real_problems(shared_dir, scored):
    task = load_real(shared_dir)
    sample = [task[i] for i in range(task.num_examples()) if task[i]["task_id"] in SAMPLE]
    assert forging_failures(scored, task, sample, stub_results(scored, task, sample)) == []


@pytest.mark.slow
def test_forging_routes_score_0_on_every_real_problem(shared_dir, scored):
    """Every route on every problem would be 164 x 10 checks; this proves as much with about a quarter of them.
    Whatever the problem, a route leaves the judge with the stub's own answers (its effects stay in the
    sandbox) or with one failure of the candidate (it ended, answered with no literal, or sent garbage),
    which sticks whatever the test does; either way it scores 0 wherever the stub does, and the stub scores 0
    on every problem (checked here). The routes whose answer crosses as a literal (ANSWERS_AS_A_LITERAL) are
    the exception: they run on every problem. That each other route is one of those two kinds is checked on
    a seeded sample of 12 problems besides SAMPLE (the test above covers those), every route in every
    placement: a route that starts to depend on the problem fails here."""
    task = load_real(shared_dir)
    conversations = [task[i] for i in range(task.num_examples())]
    stubs = stub_results(scored, task, conversations)
    literal = [(c, forging_completion_for(c, route)) for c in conversations for route in ANSWERS_AS_A_LITERAL]
    assert [score for score, _ in scored(task, literal)] == [0] * len(literal)
    others = sorted(c["task_id"] for c in conversations if c["task_id"] not in SAMPLE)
    drawn = set(random.Random(21).sample(others, 12))
    sample = [c for c in conversations if c["task_id"] in drawn]
    assert forging_failures(scored, task, sample, stubs) == []
