"""The builtin offline corpus: the documentation that ships with Python, built once into shards."""

from __future__ import annotations

import ast
import contextlib
import gc
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from nanopipe.common import atomic_directory, get_base_dir, print0
from nanopipe.data.shards import MANIFEST_NAME, DataError
from nanopipe.data.write import _permissions_like_parent, split_text_documents, write_split_shards

# -----------------------------------------------------------------------------
# builtin: the documentation that ships with Python

BUILTIN_VERSION = 2  # bump when the corpus recipe changes
BUILTIN_VAL_FRACTION = 0.05
BUILTIN_ROW_GROUP_DOCS = 16
BUILTIN_SHARD_CHARS = 500_000
# Long topics and modules are cut into documents of at most about this size, at paragraph/docstring
# boundaries: web-text sized documents, so the best-fit packer fills short rows (CPU presets use 256-token
# rows, ~800 characters) from whole documents instead of cropping one long document per row.
BUILTIN_DOC_CHARS = 2_000
# stdlib folders without prose: test suites, generated codecs, the pydoc topics (read through their table)
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "encodings",
              "pydoc_data"}


def _pydoc_topic_documents() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately
        print0("builtin corpus: pydoc_data is not installed, using the standard library docstrings only")
        return
    for name in sorted(topics):
        for text in split_text_documents(topics[name].strip(), BUILTIN_DOC_CHARS):
            if len(text) >= 200:
                # the key is the topic, so all parts of one topic land in the same split
                yield f"pydoc-topic:{name}", text


def _docstring_sections(tree: ast.Module, module: str) -> list[str]:
    """'qualified.name\\n\\ndocstring' for the module, its classes, functions and methods, in source order."""
    sections = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 3:
            sections.append(f"{qualname}\n\n{doc}")
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{qualname}.{child.name}")
            elif isinstance(child, functions) and not isinstance(node, functions):  # not nested helpers
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return sections


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: parsing allocates millions of acyclic AST nodes and the collector's passes
    over them would double the build time. Refcounting still frees every tree."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stdlib_docstring_documents() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        sources += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    for path in sorted(sources, key=lambda p: p.relative_to(stdlib).as_posix()):
        parts = path.relative_to(stdlib).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            with _gc_paused():
                sections = _docstring_sections(ast.parse(path.read_bytes(), filename=str(path)), module)
        except (SyntaxError, ValueError, OSError):  # a few stdlib files are deliberately unparsable
            continue
        document = []
        for section in sections + [None]:
            if document and (section is None or sum(map(len, document)) + len(section) > BUILTIN_DOC_CHARS):
                text = "\n\n".join(document)
                if len(text) >= 200:
                    # the key is the module, so all parts of one module land in the same split
                    yield module, text
                document = []
            if section is not None:
                document.append(section)


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(key, text) documents of the offline corpus, in a fixed order (same Python install, same corpus)."""
    yield from _pydoc_topic_documents()
    yield from _stdlib_docstring_documents()


def builtin_dir() -> Path:
    return get_base_dir() / "base_data" / "builtin"


def ensure_builtin(data_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Materialise the builtin corpus into `data_dir` once; safe when several processes race to do it.

    A file lock serialises builders; the directory is built under a temporary name and renamed into
    place whole, with manifest.json written last, so readers never see a partial corpus.
    """
    target = Path(data_dir) if data_dir else builtin_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / MANIFEST_NAME).is_file() and not force:
            return target
        if target.exists() and not force:
            raise DataError(f"{target} exists but holds no complete builtin corpus (no {MANIFEST_NAME}); "
                            f"remove it or rebuild with `python -m nanopipe.data builtin --force`")
        print0(f"building the builtin corpus (Python {sys.version.split()[0]} documentation) into {target} ...")
        t0 = time.time()
        with atomic_directory(target, overwrite=True) as tmp:
            _permissions_like_parent(tmp)
            manifest = write_split_shards(
                builtin_documents(), tmp, BUILTIN_VAL_FRACTION, BUILTIN_ROW_GROUP_DOCS, BUILTIN_SHARD_CHARS,
                {"source": "builtin", "version": BUILTIN_VERSION, "python": sys.version.split()[0],
                 "implementation": sys.implementation.name})
        docs, chars = manifest["documents"], manifest["chars"]
        print0(f"builtin corpus: {docs['train']:,} train / {docs['val']:,} val documents, "
               f"{chars['train'] + chars['val']:,} characters, {len(manifest['train_shards'])} train shards "
               f"in {time.time() - t0:.1f}s")
    return target
