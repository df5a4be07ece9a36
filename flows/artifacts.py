"""
Content-addressed stage outputs: `NANOPIPE_HOME/artifacts/<stage>/<tag>-<hash>/`.

The hash covers everything that decides what a stage computes: the stage name, its config digest
(`nanopipe.configs.base.config_digest`, which leaves out logging names and output paths), the hashes of the
artifacts it reads, and the code version: the package version plus a hash of the modules the stage declares
as deciding its result (`Stage.code` in flows/stages.py), with comments, docstrings and log messages left
out. Same inputs, same directory; any change, a new one. The manifest records each module's hash, so
`nanopipe status` can say which config field, module or upstream artifact made a stage rerun.

A directory is complete only when its `manifest.json` (written last, atomically) verifies: every listed
file present with the recorded size and sha256. Anything else is a leftover of an interrupted run: its
checkpoints may be resumed from, its other contents are never returned as a result.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.metadata
import hashlib
import json
import os
import platform
import shutil
import threading
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout
from pydantic import BaseModel, Field

import nanopipe
from nanopipe.common import atomic_write_json, get_base_dir

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH_CHARS = 16


# -----------------------------------------------------------------------------
# Hashing

def _sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Code versions: each stage declares the modules that determine its result (flows/stages.py)

# Statements that only tell a person something: `print(...)`, `print0(...)` (nanopipe.common's rank-0 print), and
# a logger's methods (`logger.info(...)`, `warnings.warn(...)`, a wandb run's `.log(...)`). Only such a call
# standing alone as a statement loses its arguments: wherever a call's value is used (`y = error(a)`,
# `math.log(2)`), it decides what the stage computes and is hashed like any other code.
MESSAGE_FUNCTIONS = frozenset({"print", "print0"})
LOGGERS = frozenset({"logger", "log", "logging", "warnings", "wandb"})
LOGGER_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})
_CONSOLE = frozenset({"sys.stdout", "sys.stderr"})


def is_message_call(node: ast.AST) -> bool:
    """Whether `node` is a call whose only effect is a message: print/print0 to the console, or a logger method
    (the receiver's last name is a logger: `logger`, `self.wandb`, ...). `print(x, file=f)` writes data."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name) and func.id in MESSAGE_FUNCTIONS:
        return all(k.arg != "file" or ast.unparse(k.value) in _CONSOLE for k in node.keywords)
    if isinstance(func, ast.Attribute) and func.attr in LOGGER_METHODS:
        receiver = func.value
        name = receiver.id if isinstance(receiver, ast.Name) else \
            receiver.attr if isinstance(receiver, ast.Attribute) else None
        return name in LOGGERS
    return False


class _Normalizer(ast.NodeTransformer):
    """Drops docstrings and the arguments of message statements, so comments, docs and log lines don't count."""

    def _strip_docstring(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip_docstring

    def visit_Expr(self, node: ast.Expr):
        # the call itself stays (adding or removing a message statement still counts), its arguments go
        if is_message_call(node.value):
            node.value.args, node.value.keywords = [], []
            return node
        return self.generic_visit(node)


def normalized_source(path: Path) -> str:
    """The module's syntax tree without comments, docstrings and log-message arguments."""
    return _normalized_source(str(path), path.read_text(encoding="utf-8"))


# CPython 3.11's parser keeps its AST recursion depth per interpreter, not per thread: two threads parsing at
# once (the flow plans inside task threads) can fail with "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905). One parse at a time.
PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _normalized_source(path: str, text: str) -> str:
    """normalized_source, once per text of a file in a process: the stages share most of their modules, and
    parsing them once per stage took ~1.4 s of a cached run (keyed by the text itself: an edit made within
    the file system's timestamp resolution is still seen)."""
    with PARSE_LOCK:
        tree = _Normalizer().visit(ast.parse(text, filename=path))
        return ast.dump(tree, annotate_fields=False, include_attributes=False)


def module_files(module: str, root: Path | None = None, package: str = "nanopipe") -> list[Path]:
    """The source files of a declared module: `pkg.a.b` is pkg/a/b.py, or every file of the package pkg/a/b/."""
    root = Path(root or Path(nanopipe.__file__).parent)
    parts = module.split(".")
    if parts[0] != package:
        raise ValueError(f"{module} is not a module of {package}")
    base = root.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    if (base / "__init__.py").is_file():
        return sorted(base.rglob("*.py"))
    raise ValueError(f"{module}: no such module or package under {root} (see the stage's `code` in flows/stages.py)")


def module_hashes(modules: tuple[str, ...] | list[str], root: Path | None = None,
                  package: str = "nanopipe") -> dict[str, str]:
    """{module: hash of its normalized source}, the record that lets `nanopipe status` say which one changed."""
    hashes = {}
    for module in sorted(set(modules)):
        digest = hashlib.sha256()
        for path in module_files(module, root, package):
            digest.update(path.name.encode() + b"\0" + normalized_source(path).encode() + b"\0")
        hashes[module] = digest.hexdigest()[:HASH_CHARS]
    return hashes


@functools.lru_cache(maxsize=None)
def code_hashes(modules: tuple[str, ...]) -> dict[str, str]:
    """module_hashes of nanopipe's own modules, computed once per process: the code a process plans with
    stays the code it hashed, even if files change underneath it (a new process picks the change up)."""
    return module_hashes(modules)


def code_version(modules: tuple[str, ...]) -> str:
    """`<package version>+<hash of the declared modules>`: bumping the package version recomputes everything."""
    blob = json.dumps(code_hashes(tuple(modules)), sort_keys=True).encode()
    return f"{nanopipe.__version__}+{hashlib.sha256(blob).hexdigest()[:HASH_CHARS]}"


def artifact_hash(stage: str, config_digest: str, upstream: dict[str, str], code: str) -> str:
    """Hash of everything that decides a stage's output. `upstream` maps input role -> artifact hash."""
    payload = {"stage": stage, "config": config_digest, "upstream": dict(sorted(upstream.items())), "code": code}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:HASH_CHARS]


def artifacts_root(home: str | os.PathLike | None = None) -> Path:
    return Path(home) / "artifacts" if home else get_base_dir() / "artifacts"


def artifact_dir(stage: str, tag: str, digest: str, home: str | os.PathLike | None = None) -> Path:
    safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag) or "run"
    return artifacts_root(home) / stage / f"{safe_tag}-{digest}"


# -----------------------------------------------------------------------------
# References passed between tasks

class ArtifactRef(BaseModel):
    """What a stage task returns and downstream stages consume: a place, its hash, its key metrics."""

    stage: str = Field(description="stage that produced it")
    hash: str = Field(description="content address: hash of stage, config, upstream hashes and code version")
    path: str = Field(description="artifact directory")
    metrics: dict[str, Any] = Field(default_factory=dict, description="the stage's metrics.json")
    seconds: float = Field(0.0, description="wall time of the run that produced it")
    resumed_from: int | None = Field(None, description="checkpoint step the run that produced it resumed from; "
                                     "none = it ran from the start (or was reused)")
    segments: list[dict] = Field(default_factory=list, description="[{from_step, to_step, world_size}]: which "
                                 "number of processes trained which steps (flows/world.py); empty when reused")


# -----------------------------------------------------------------------------
# Manifest

def _listed_files(directory: Path) -> list[Path]:
    """Files that belong to the artifact: everything except the manifest and hidden temporaries."""
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.as_posix() != MANIFEST and not any(p.startswith(".") for p in rel.parts):
            files.append(path)
    return files


def write_manifest(directory: str | os.PathLike, *, stage: str, digest: str, config: dict,
                   upstream: dict[str, dict], metrics: dict, timings: dict, extra: dict | None = None) -> dict:
    """Checksum every file and write manifest.json last, atomically: from now on the artifact is complete."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in _listed_files(directory)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "hash": digest,
        "config": config,
        "upstream": upstream,
        "files": files,
        "metrics": metrics,
        "timings": timings,
        "versions": versions(),
        **(extra or {}),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def versions() -> dict[str, str]:
    """Versions of what produced an artifact, read from package metadata (importing torch here would cost
    the flow process seconds and memory it never needs)."""
    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"
    return {"nanopipe": nanopipe.__version__, "python": platform.python_version(), "torch": installed("torch"),
            "prefect": installed("prefect"), "pydantic": installed("pydantic"), "host": socket.gethostname()}


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Verification:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def verify(directory: str | os.PathLike, expected_hash: str | None = None) -> Verification:
    """Does the directory hold a complete, intact artifact? The reason names the first problem found."""
    directory = Path(directory)
    if not directory.is_dir():
        return Verification(False, f"{directory} does not exist")
    manifest = read_manifest(directory)
    if manifest is None:
        return Verification(False, f"{directory / MANIFEST} is missing or unreadable (incomplete run)")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return Verification(False, f"{directory / MANIFEST} has an unknown format")
    if expected_hash is not None and manifest.get("hash") != expected_hash:
        return Verification(False, f"{directory / MANIFEST} records hash {manifest.get('hash')}, "
                                   f"expected {expected_hash}")
    for rel, info in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            return Verification(False, f"{path} is listed in the manifest but missing")
        if path.stat().st_size != info["bytes"]:
            return Verification(False, f"{path} has {path.stat().st_size} bytes, the manifest says {info['bytes']}")
        if _sha256_file(path) != info["sha256"]:
            return Verification(False, f"{path} does not match its sha256 in the manifest (corrupted)")
    return Verification(True, "ok")


def ref_from_manifest(directory: str | os.PathLike) -> ArtifactRef:
    manifest = read_manifest(directory)
    assert manifest is not None, f"no manifest in {directory}"
    return ArtifactRef(stage=manifest["stage"], hash=manifest["hash"], path=str(directory),
                       metrics=manifest.get("metrics", {}), seconds=manifest.get("timings", {}).get("seconds", 0.0))


def discard(directory: str | os.PathLike) -> None:
    """Remove an artifact directory: renamed aside first, so a half-deleted tree is never mistaken for it."""
    directory = Path(directory)
    if not directory.exists():
        return
    trash = directory.with_name(f".{directory.name}.discard-{uuid.uuid4().hex[:8]}")
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


# -----------------------------------------------------------------------------
# One writer per artifact directory

def _lock_paths(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(f".{directory.name}.lock"), directory.with_name(f".{directory.name}.holder")


@contextlib.contextmanager
def artifact_lock(directory: str | os.PathLike, on_wait=None) -> Iterator[None]:
    """Exclusive lock on `<parent>/.<name>.lock` for the life of the block (filelock: flock underneath).

    A second run of the same config waits here, then finds the manifest the first one wrote. The kernel
    releases the lock when the holder dies, however it dies, so a crash never leaves a stale lock. Who
    holds it is written beside it (`.<name>.holder`) for the waiting run and `nanopipe status`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path, holder_path = _lock_paths(directory)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(f"{directory.name} is being produced by {lock_holder(directory) or 'another process'}; "
                    "waiting for it")
        lock.acquire()
    try:
        holder_path.write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            holder_path.unlink()
        lock.release()


def lock_holder(directory: str | os.PathLike) -> str | None:
    """Who is producing the artifact right now ("pid N on host since ..."), or None when nobody is."""
    lock_path, holder_path = _lock_paths(Path(directory))
    if not lock_path.exists():
        return None
    probe = FileLock(lock_path)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        try:
            return holder_path.read_text().strip() or "another process"
        except OSError:
            return "another process"
    probe.release()
    return None
