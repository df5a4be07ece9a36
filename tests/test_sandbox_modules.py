"""The sandbox's own modules (nanopipe/sandbox/): they import only the standard library and each other, the
entry script loads every one of them before the program runs, leaves sys.path as `python -I -S` made it, and
(in the full sandbox) the program cannot change their files."""

import ast
import errno
import json
import sys
from pathlib import Path

import pytest

from nanopipe import sandbox
from nanopipe.execution import ExecutionResult, execute_code, sandbox_protections
from nanopipe.sandbox.entry import PACKAGE
from nanopipe.sandbox.kernel import HIDDEN_DIRS

FOLDER = Path(sandbox.__file__).parent
KERNEL = sandbox_protections()


def run(program: str) -> ExecutionResult:
    return execute_code(program, timeout=10.0, allow_weaker_sandbox=not KERNEL.complete)


def test_the_modules_import_only_the_standard_library_and_each_other():
    siblings = {path.stem for path in FOLDER.glob("*.py")}
    for path in FOLDER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and (node.module is None or node.module in siblings), (path.name, node.module)
                continue
            else:
                continue
            outside = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names | {"__future__"}]
            assert outside == [], f"{path.name} imports {outside}: the judge and the sandbox import no other code"
    assert set(sandbox.MODULES) == siblings - {"__init__", "entry"}, "entry.py loads every module of the folder"
    assert not siblings & sys.stdlib_module_names, "names that could be confused with the standard library's"


def test_the_program_finds_every_sandbox_module_loaded_and_sys_path_as_isolated_mode_made_it():
    probe = ("import json, os, sys\n"
             f"ours = ('nanopipe', 'sandbox', {PACKAGE!r})\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ours)\n"
             f"folder = os.path.dirname(sys.modules[{PACKAGE!r}].__file__)\n"
             "print(json.dumps({'modules': loaded, 'path': sys.path, 'cwd': os.getcwd(), 'folder': folder}))\n")
    result = run(probe)
    assert result.success, result
    seen = json.loads(result.stdout)
    assert seen["modules"] == sorted([PACKAGE] + [f"{PACKAGE}.{name}" for name in sandbox.MODULES]), seen
    assert Path(seen["folder"]).resolve() == FOLDER.resolve()
    mine = (str(FOLDER.parent), seen["folder"], seen["cwd"])  # nanopipe's folders, the working directory
    assert all(entry and not entry.startswith(mine) for entry in seen["path"]), seen["path"]
    assert str(FOLDER.parent.parent) not in seen["path"], "nanopipe itself is not importable"
    assert not any("site-packages" in entry for entry in seen["path"]), seen["path"]


def test_the_program_cannot_import_nanopipe_or_anything_installed():
    # no site: no site-packages on sys.path and none of their .pth files run (an editable install's finder
    # would make nanopipe importable; setuptools' own .pth would run code before entry.py)
    probe = ("import sys\nprint('site' in sys.modules)\n"
             "for name in ('nanopipe', 'torch', 'pydantic'):\n"
             "    try:\n        __import__(name)\n        print(name, 'imported')\n"
             "    except ImportError:\n        print(name, 'missing')\n")
    result = run(probe)
    assert result.success, result
    assert result.stdout.split("\n")[:4] == ["False", "nanopipe missing", "torch missing", "pydantic missing"], result


@pytest.mark.skipif(not KERNEL.complete, reason=f"namespaces cannot be created here ({KERNEL.describe()})")
def test_the_program_cannot_change_the_sandbox_modules():
    # a fresh posix module has the real open (past the Python guard): the kernel refuses, the files stay
    before = {path.name: path.read_bytes() for path in FOLDER.glob("*.py")}
    attack = ("import sys\nsys.modules.pop('posix', None)\nimport posix\n"
              f"folder = {str(FOLDER)!r}\n"
              "for name, flags in (('literals.py', posix.O_WRONLY | posix.O_TRUNC),\n"
              "                    ('planted.py', posix.O_WRONLY | posix.O_CREAT)):\n"
              "    try:\n        posix.open(folder + '/' + name, flags, 0o644)\n        print('opened', name)\n"
              "    except OSError as e:\n        print(name, e.errno)\n")
    result = execute_code(attack, timeout=10.0)
    # read-only where the program sees the folder; absent where it lies under a directory the sandbox empties
    # (a checkout under /tmp)
    hidden = any(FOLDER.resolve().is_relative_to(d) for d in HIDDEN_DIRS)
    refused = errno.ENOENT if hidden else errno.EROFS
    assert result.success and result.stdout == f"literals.py {refused}\nplanted.py {refused}\n", result
    assert {path.name: path.read_bytes() for path in FOLDER.glob("*.py")} == before
