"""
The script the sandbox and the judge run as: `python -I -S entry.py --sandbox-child|--judge ARGS`. It loads
this folder as a package (under PACKAGE, not as nanopipe) straight from its own location, leaving sys.path
as -I -S made it, then imports every module of the package, and only then starts the role the flag names.
"""

import importlib
import importlib.util
import os
import sys

PACKAGE = "nanopipe_sandbox"


def load_package():
    """This folder as the package PACKAGE, with each of its modules imported; the package."""
    folder = os.path.dirname(os.path.realpath(__file__))
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    for name in package.MODULES:
        importlib.import_module(f"{PACKAGE}.{name}")
    return package


if __name__ == "__main__" and len(sys.argv) > 1:
    sandbox = load_package()
    if sys.argv[1] == sandbox.CHILD_FLAG:
        sandbox.launcher.child_main(sys.argv[2:])
    elif sys.argv[1] == sandbox.JUDGE_FLAG:
        sandbox.judge.judge_main(sys.argv[2:])
