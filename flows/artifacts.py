"""
Content-addressed stage outputs: `NANOPIPE_HOME/artifacts/<stage>/<tag>-<hash>/`.

The hash covers everything that decides what a stage computes: the stage name, its config digest
(`nanopipe.config.config_digest`, which leaves out logging names and output paths), the hashes of the
artifacts it reads, and the code version (package version + a hash of the stage module and every nanopipe
module it imports). Same inputs, same directory; any change, a new one.

A directory is complete only when its `manifest.json` (written last, atomically) verifies: every listed
file present with the recorded size and sha256. Anything else is a leftover of an interrupted run: its
checkpoints may be resumed from, its other contents are never returned as a result.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


def _module_file(name: str, root: Path, package: str) -> Path | None:
    """The source file of `package.a.b` under `root` (the package directory), if it is one of ours."""
    parts = name.split(".")
    if parts[0] != package:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, root: Path, package: str) -> set[str]:
    """Every module name an `import` / `from ... import` anywhere in the file can refer to (functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = [package, *path.relative_to(root).with_suffix("").parts][:-1]   # the module's package
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] + ([node.module] if node.module else [])
                module = ".".join(base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)   # `from pkg import submodule`
    return names


def module_closure(module: str, root: Path | None = None, package: str = "nanopipe") -> list[Path]:
    """The source files a module runs: itself, every package module it imports (transitively, wherever
    the import statement is), and the `__init__.py` of each package on the way."""
    root = Path(root or Path(nanopipe.__file__).parent)
    start = _module_file(module, root, package)
    assert start is not None, f"{module} is not a module of {package} under {root}"
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for parent in path.relative_to(root).parents:   # package __init__ files run on import too
            init = root / parent / "__init__.py"
            if init.is_file() and init not in seen:
                todo.append(init)
        for name in _imported_names(path, root, package):
            found = _module_file(name, root, package)
            if found is not None and found not in seen:
                todo.append(found)
    return sorted(seen)


def source_hash(files: list[Path], root: Path) -> str:
    """sha256 over the relative paths and bytes of the given source files."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:HASH_CHARS]


@functools.lru_cache(maxsize=None)
def code_version(module: str) -> str:
    """What the key calls "code version" for a stage module: `<package version>+<hash of its sources>`,
    where its sources are the module and every nanopipe module it imports. A change to the model code
    thus recomputes training but not the tokenizer.

    Computed once per process: the code a process plans with stays the code it hashed, even if files
    change underneath it (a later run in a new process picks the change up).
    """
    root = Path(nanopipe.__file__).parent
    return f"{nanopipe.__version__}+{source_hash(module_closure(module, root), root)}"


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
    import torch
    import pydantic
    try:
        import prefect
        prefect_version = prefect.__version__
    except ImportError:
        prefect_version = "absent"
    return {"nanopipe": nanopipe.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "prefect": prefect_version, "pydantic": pydantic.__version__,
            "host": socket.gethostname()}


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

@contextlib.contextmanager
def artifact_lock(directory: str | os.PathLike, on_wait=None) -> Iterator[None]:
    """Exclusive lock (flock) on `<parent>/.<name>.lock` for the life of the block.

    A second run of the same config waits here, then finds the manifest the first one wrote. The kernel
    releases the lock when the holder dies, however it dies, so a crash never leaves a stale lock.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.with_name(f".{directory.name}.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if on_wait is not None:
                on_wait(f"{directory.name} is being produced by {holder}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
