"""
The processes nanopipe/execution.py starts to run untrusted code (read that module's docstring for the
boundary and the threat model), each as `python -I -S entry.py FLAG ...`:
- the sandbox (`--sandbox-child`, launcher.py): the launcher drops privileges and enters the namespaces,
  then forks the init, which isolates the filesystem and drops every capability (kernel.py), puts up the
  limits and the Python guards (guards.py) and runs the untrusted program (program.py), reporting on two
  pipes; given a pipe of calls, it then serves calls of one function the program defined;
- the judge (`--judge`, judge.py, trusted, never runs untrusted code): runs a problem's tests, whose
  `candidate` is a proxy that sends each call to the sandbox and decodes the answer into fresh builtin
  values (literals.py: the only thing that crosses, and how).

Every module here imports nothing but the standard library and its siblings (relative imports), so that
nothing outside this folder (nanopipe, site-packages) decides what the judge and the sandbox run. The
parent imports the package as `nanopipe.sandbox` for the names below and the literal codec; the children
never import nanopipe: entry.py loads this folder as a package of its own from its file location, without
touching sys.path (-I keeps the script's folder, the working directory, PYTHON* variables and the user's
site off it; -S keeps site-packages off it and runs none of their .pth files, so an editable install of
nanopipe is not importable either), so no module the program writes can shadow one of these, and no module
here can shadow the standard library. entry.py imports every module of the package before anything else happens, so all of
them are loaded before privileges are dropped and before the untrusted program runs; in the full sandbox
this folder is read-only besides (the whole filesystem is).
"""

import os

CHILD_FLAG = "--sandbox-child"
JUDGE_FLAG = "--judge"
ENTRY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "entry.py")
MODULES = ("literals", "kernel", "guards", "program", "launcher", "judge")  # entry.py loads them all first

KILL_GRACE_SECONDS = 2.0                 # wall-clock slack for interpreter start-up before the hard kill
NOBODY_UID = NOBODY_GID = 65534
MAX_ERROR_CHARS = 2000                   # an error message in a report, an answer or the verdict

# Protections, as named in sandbox_protections() and the log line; the required ones make the boundary.
REQUIRED_PROTECTIONS = ("user-namespace", "pid-namespace", "network-namespace", "read-only-filesystem",
                        "private-tmp", "no-capabilities")
OPTIONAL_PROTECTIONS = ("mount-namespace", "ipc-namespace", "private-proc", "nobody")
