"""
An artifact store that outlives a node: completed artifacts and training checkpoints copied to any fsspec
URL, so a retry on another machine restores what the first one made instead of starting from nothing.

    file:///mnt/shared/nanopipe-store     a filesystem every node mounts (NFS, Lustre, ...)
    s3://bucket/prefix                    S3 or an S3-compatible server (MinIO, Ceph, R2, ...): endpoint and
                                          credentials from the standard AWS variables (AWS_ENDPOINT_URL,
                                          AWS_ACCESS_KEY_ID, ...) or `storage_options`

Layout: the store mirrors `NANOPIPE_HOME/artifacts`. An artifact's name is `<stage>/<tag>-<hash>` (see
`artifact_name`), and

    <store_url>/<stage>/<tag>-<hash>/...              every file of the local artifact directory
    <store_url>/<stage>/<tag>-<hash>/manifest.json    uploaded LAST: the store copy exists from then on
    <store_url>/<stage>/<tag>-<hash>/out/model_{step:06d}.pt, optim_{step:06d}_rank{r}.pt, meta_{step:06d}.json
                                                      checkpoints, uploaded while the stage trains (meta last)
    <store_url>/<stage>/.<tag>-<hash>.lock            the cross-machine lock of that artifact (`store_lock`)

The rules are the local ones (flows/artifacts.py): no manifest, not done; a reader trusts a store directory
only once its manifest is there, and checks every size and sha256 after downloading. A checkpoint step counts
once its meta is in the store. Nothing half-uploaded is ever restored, and a restore renames a verified copy
into place, so a half-downloaded one is never seen either.

    upload_artifact(directory, url)                    after write_manifest: the finished artifact
    store_has(url, name, digest) / restore_artifact(url, name, directory, digest)   on a cache miss
    with CheckpointUploader(out_dir, url, checkpoints_name(directory, out_dir)): launch(...)
    restore_checkpoints(url, checkpoints_name(directory, out_dir), out_dir)          before a resume
    with store_lock(url, name): ...                     one producer of an artifact across machines
                                                       (flows/store_lock.py)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec
import fsspec.asyn

from flows.artifacts import MANIFEST, MANIFEST_FORMAT, discard, read_manifest, verify

log = logging.getLogger(__name__)

_META_RE = re.compile(r"^meta_(\d+)\.json$")
_OPTIM_RE = re.compile(r"^optim_(\d+)_rank(\d+)\.pt$")


class StoreError(RuntimeError):
    """The store cannot do what was asked (unsupported URL, a failed transfer); the message names the URL."""


# -----------------------------------------------------------------------------
# Names and filesystems

def artifact_name(directory: str | os.PathLike) -> str:
    """`<stage>/<tag>-<hash>`: an artifact directory's name in the store (its path under artifacts/)."""
    directory = Path(directory)
    return f"{directory.parent.name}/{directory.name}"


def checkpoints_name(directory: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The store name of a stage's checkpoint directory (`<stage>/<tag>-<hash>/out`)."""
    rel = Path(out_dir).relative_to(directory).as_posix()
    return f"{artifact_name(directory)}/{rel}"


def open_store(store_url: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of a store URL. A fresh filesystem object each time: fsspec's instance cache
    would otherwise hand back a client made for another endpoint or other credentials."""
    try:
        fs, root = fsspec.core.url_to_fs(store_url, skip_instance_cache=True, **storage_options)
    except (ImportError, ValueError) as err:
        raise StoreError(f"artifact store {store_url!r}: {err}") from err
    return fs, root.rstrip("/")


# What the store supports: a filesystem every node mounts, or S3 (the cross-machine lock needs S3's conditional
# writes, flows/store_lock.py). Other fsspec protocols would fail at the first upload, after training.
LOCAL_PROTOCOLS = ("file", "local")
SUPPORTED_PROTOCOLS = LOCAL_PROTOCOLS + ("s3", "s3a")


def check_store(store_url: str, name: str = "artifact_store") -> None:
    """A StoreError, before any stage runs, for a store this run could not use: an unsupported protocol, a
    relative path (it would resolve against whichever working directory the flow runs in), or a local directory
    that cannot be created or written (probed with a temporary file). An S3 store is not probed: its
    credentials may be the workers' own. `name` is where the URL came from, for the message."""
    protocol = fsspec.utils.get_protocol(store_url)
    if protocol not in SUPPORTED_PROTOCOLS:
        raise StoreError(f"{name} {store_url!r}: unsupported protocol {protocol}:// (use an absolute path or a "
                         f"file:// URL on a filesystem every node mounts, or s3://bucket/prefix)")
    if protocol not in LOCAL_PROTOCOLS:
        return
    path = store_url.split("://", 1)[1] if "://" in store_url else store_url
    if not os.path.isabs(path):
        raise StoreError(f"{name} {store_url!r} is a relative path: it would resolve against the flow's working "
                         f"directory ({os.getcwd()}); give an absolute path or a file:/// URL")
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"{name} {store_url!r} cannot be created: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nanopipe-store-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StoreError(f"{name} {store_url!r} cannot be written: {err.strerror or err} ({existing}); give a "
                         f"directory this node can create and write") from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _put(fs, local: Path, remote: str) -> None:
    """Copy one file into the store so that it appears whole: an object PUT is atomic on S3; on a
    filesystem the copy goes to a hidden name beside the target and is renamed."""
    if not is_local(fs):
        fs.put_file(str(local), remote)
        return
    parent = remote.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{remote.rsplit('/', 1)[1]}.part-{uuid.uuid4().hex[:8]}"
    try:
        fs.put_file(str(local), tmp)
        fs.mv(tmp, remote)
    finally:
        if fs.exists(tmp):
            fs.rm_file(tmp)


def _get(fs, remote: str, local: Path) -> int:
    """Download one file to a hidden name beside `local`, then rename it there; returns its bytes."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        fs.get_file(remote, str(tmp))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local.stat().st_size


def _read_json(fs, remote: str) -> Any | None:
    try:
        return json.loads(fs.cat_file(remote))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _sizes(fs, prefix: str) -> dict[str, int]:
    """{path relative to prefix: bytes} of every file under a store prefix (one listing)."""
    try:
        found = fs.find(prefix, detail=True)
    except FileNotFoundError:
        return {}
    return {path[len(prefix) + 1:]: info["size"] for path, info in found.items()
            if path.startswith(prefix + "/") and info.get("type", "file") == "file"}


# -----------------------------------------------------------------------------
# Completed artifacts

@dataclass
class Transfer:
    """What an upload or restore moved. Falsy when nothing was restored; `reason` says why."""

    ok: bool
    reason: str = "ok"
    step: int | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.ok


def upload_artifact(local_dir: str | os.PathLike, store_url: str, name: str | None = None,
                    already_uploaded: dict[str, tuple[int, int]] | None = None,
                    **storage_options) -> Transfer:
    """Copy a completed artifact to `<store_url>/<name>`: every file its manifest lists, the manifest last.

    The local directory must verify (a store copy is only ever made of a complete artifact). A manifest
    already in the store is removed first, so the copy is invisible until it is whole again.
    `already_uploaded` ({local path: (bytes, mtime_ns)}: `CheckpointUploader.uploaded`) skips the files
    that went up during training and are unchanged since.
    """
    started = time.monotonic()
    local_dir = Path(local_dir)
    name = name or artifact_name(local_dir)
    check = verify(local_dir)
    if not check:
        raise StoreError(f"will not upload {local_dir} to {store_url}: {check.reason}")
    manifest = read_manifest(local_dir)
    fs, root = open_store(store_url, **storage_options)
    prefix = f"{root}/{name}"
    if fs.exists(f"{prefix}/{MANIFEST}"):
        fs.rm_file(f"{prefix}/{MANIFEST}")
    skip = already_uploaded or {}
    sent = sent_bytes = 0
    for rel, info in manifest["files"].items():
        stat = (local_dir / rel).stat()
        if skip.get(os.path.abspath(local_dir / rel)) == (stat.st_size, stat.st_mtime_ns):
            continue
        _put(fs, local_dir / rel, f"{prefix}/{rel}")
        sent, sent_bytes = sent + 1, sent_bytes + info["bytes"]
    _put(fs, local_dir / MANIFEST, f"{prefix}/{MANIFEST}")
    seconds = time.monotonic() - started
    log.info(f"uploaded {name} to {store_url}: {sent} file(s), {sent_bytes} bytes in {seconds:.1f} s")
    return Transfer(True, files=sent + 1, bytes=sent_bytes + (local_dir / MANIFEST).stat().st_size,
                    seconds=seconds)


def _store_check(fs, prefix: str, digest: str) -> tuple[dict | None, str]:
    """(manifest, "ok") when the store copy's manifest is there, records `digest`, and every file it lists is
    in the store with its size (one listing, nothing downloaded); else (None, why not)."""
    manifest = _read_json(fs, f"{prefix}/{MANIFEST}")
    if manifest is None:
        return None, f"{prefix}/{MANIFEST} is missing or unreadable (no complete copy in the store)"
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return None, f"{prefix}/{MANIFEST} has an unknown format"
    if manifest.get("hash") != digest:
        return None, f"{prefix}/{MANIFEST} records hash {manifest.get('hash')}, expected {digest}"
    sizes = _sizes(fs, prefix)
    for rel, info in manifest["files"].items():
        if sizes.get(rel) != info["bytes"]:
            return None, (f"{prefix}/{rel}: {sizes.get(rel, 'missing')} bytes in the store, "
                          f"the manifest says {info['bytes']}")
    return manifest, "ok"


def store_has(store_url: str, name: str, digest: str, **storage_options) -> bool:
    """Is there a complete copy of artifact `name` with content hash `digest` in the store?"""
    fs, root = open_store(store_url, **storage_options)
    return _store_check(fs, f"{root}/{name}", digest)[0] is not None


def restore_artifact(store_url: str, name: str, local_dir: str | os.PathLike, digest: str,
                     **storage_options) -> Transfer:
    """Download artifact `name` into a hidden directory beside `local_dir`, verify every file against the
    manifest and `digest`, then rename it into place (whatever was at `local_dir` is discarded first: call
    it under the artifact's lock). Falsy, with the reason, when the store has no complete, intact copy."""
    started = time.monotonic()
    local_dir = Path(local_dir)
    fs, root = open_store(store_url, **storage_options)
    prefix = f"{root}/{name}"
    manifest, reason = _store_check(fs, prefix, digest)
    if manifest is None:
        return Transfer(False, reason)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_dir.with_name(f".{local_dir.name}.restore-{uuid.uuid4().hex[:8]}")
    try:
        total = sum(_get(fs, f"{prefix}/{rel}", tmp / rel) for rel in manifest["files"])
        total += _get(fs, f"{prefix}/{MANIFEST}", tmp / MANIFEST)
        check = verify(tmp, digest)
        if not check:
            return Transfer(False, f"store copy {store_url}/{name} does not verify: {check.reason}")
        discard(local_dir)
        os.replace(tmp, local_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    log.info(f"restored {name} from {store_url}: {len(manifest['files']) + 1} file(s), {total} bytes "
             f"in {seconds:.1f} s")
    return Transfer(True, files=len(manifest["files"]) + 1, bytes=total, seconds=seconds)


# -----------------------------------------------------------------------------
# Checkpoints, uploaded as training saves them

def _step_world_size(meta: dict) -> int | None:
    """How many ranks wrote a step, from its meta's loader state (None when the meta does not say)."""
    loader_state = meta.get("loader_state")
    if isinstance(loader_state, dict) and isinstance(loader_state.get("world_size"), int):
        return loader_state["world_size"]
    return None


def _step_files(names: set[str], step: int, world_size: int | None) -> list[str] | None:
    """The files of checkpoint `step` in upload order (model, optimizer ranks, meta last), or None while
    the step is incomplete (model or a rank's optimizer file not there yet)."""
    model, meta = f"model_{step:06d}.pt", f"meta_{step:06d}.json"
    if model not in names or meta not in names:
        return None
    if world_size is None:
        optims = sorted(n for n in names if (m := _OPTIM_RE.match(n)) and int(m.group(1)) == step)
    else:
        optims = [f"optim_{step:06d}_rank{r}.pt" for r in range(world_size)]
        if not all(o in names for o in optims):
            return None
    return [model, *optims, meta]


@dataclass
class StepUpload:
    step: int
    files: int
    bytes: int
    seconds: float


class CheckpointUploader:
    """Uploads each checkpoint step of `out_dir` to `<store_url>/<name>` once it is complete, from a thread
    of the flow's process (training never waits for it).

    A step is complete when its meta (written last by nanopipe.checkpoint.save_checkpoint) is there, with
    the model and, when the meta names the world size, every rank's optimizer file. Its files go up model
    first and meta last, so a step is in the store only once its meta is. A step is uploaded once (steps
    already in the store count as uploaded); files that vanish (a pruned checkpoint) skip the step; a failed
    transfer is logged and tried again on the next scan. `stop()` makes one last scan, so a checkpoint
    written just before the stage exits still goes up.

        with CheckpointUploader(out_dir, url, checkpoints_name(artifact_dir, out_dir)):
            launch(...)
    """

    def __init__(self, out_dir: str | os.PathLike, store_url: str, name: str, poll_seconds: float = 5.0,
                 log_line: Callable[[str], None] | None = None, **storage_options):
        self.out_dir, self.store_url, self.name = Path(out_dir), store_url, name
        self.poll_seconds = poll_seconds
        self.log = log_line or log.info
        self.fs, root = open_store(store_url, **storage_options)
        self.prefix = f"{root}/{name}"
        self.uploads: list[StepUpload] = []
        self.uploaded: dict[str, tuple[int, int]] = {}  # {local path: (bytes, mtime_ns)} of what went up
        self.last_error: str | None = None   # the last failed scan, for the stage's report
        # steps already in the store (a retry after restore_checkpoints) are not sent again
        self._done_steps = {int(m.group(1)) for rel in _sizes(self.fs, self.prefix) if (m := _META_RE.match(rel))}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "CheckpointUploader":
        self._thread = threading.Thread(target=self._run, name=f"upload-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[StepUpload]:
        """Upload what is complete now, end the thread, return what was uploaded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.uploads

    def __enter__(self) -> "CheckpointUploader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self.scan()
            except Exception as err:  # noqa: BLE001 -- a blip, a full store, expired credentials: this thread
                # must not die quietly while training goes on; it says why and the next scan tries again
                self.last_error = f"{type(err).__name__}: {err}"
                self.log(f"checkpoint upload to {self.store_url}/{self.name} failed, will retry: {self.last_error}")
            if stopping:
                return
            self._stop.wait(self.poll_seconds)

    def scan(self) -> list[StepUpload]:
        """Upload every complete step not uploaded yet, oldest first."""
        try:
            names = set(os.listdir(self.out_dir))
        except FileNotFoundError:
            return []
        new = []
        for step in sorted(int(m.group(1)) for n in names if (m := _META_RE.match(n))):
            if step not in self._done_steps and (done := self._upload_step(step, names)) is not None:
                new.append(done)
        return new

    def _upload_step(self, step: int, names: set[str]) -> StepUpload | None:
        started = time.monotonic()
        files = None
        try:
            meta = json.loads((self.out_dir / f"meta_{step:06d}.json").read_text(encoding="utf-8"))
            files = _step_files(names, step, _step_world_size(meta) if isinstance(meta, dict) else None)
            if files is None:
                return None   # a rank's optimizer file is still being written: next scan
            stats = [(self.out_dir / f).stat() for f in files]
            for filename in files:
                _put(self.fs, self.out_dir / filename, f"{self.prefix}/{filename}")
        except FileNotFoundError as err:
            if files is not None and all((self.out_dir / f).exists() for f in files):
                raise   # the store's side (no such bucket): not the step's fault, the next scan tries again
            # pruned while we looked at it: nothing to upload
            self.log(f"checkpoint step {step} in {self.out_dir} vanished before its upload ({err.filename})")
            self._done_steps.add(step)
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.log(f"checkpoint step {step} in {self.out_dir}: unreadable meta, not uploaded")
            self._done_steps.add(step)
            return None
        for filename, stat in zip(files, stats):
            self.uploaded[os.path.abspath(self.out_dir / filename)] = (stat.st_size, stat.st_mtime_ns)
        done = StepUpload(step, len(files), sum(s.st_size for s in stats), time.monotonic() - started)
        self._done_steps.add(step)
        self.uploads.append(done)
        self.log(f"checkpoint step {step}: {done.files} file(s), {done.bytes} bytes uploaded to "
                 f"{self.store_url}/{self.name} in {done.seconds:.1f} s")
        return done


def _local_steps(out_dir: Path) -> list[int]:
    names = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
    return sorted(s for n in names if (m := _META_RE.match(n)) and f"model_{(s := int(m.group(1))):06d}.pt" in names)


def restore_checkpoints(store_url: str, name: str, out_dir: str | os.PathLike, **storage_options) -> Transfer:
    """Download the newest complete checkpoint step in `<store_url>/<name>` into `out_dir` (meta last), so the
    stage resumes from it. Does nothing when `out_dir` already holds that step or a newer one. A step counts
    when its meta is in the store with the model and every optimizer file the meta calls for; each
    download is checked against the store's size. Falsy, with the reason, when nothing was restored."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    fs, root = open_store(store_url, **storage_options)
    prefix = f"{root}/{name}"
    sizes = _sizes(fs, prefix)
    names = {rel for rel in sizes if "/" not in rel}
    local = _local_steps(out_dir)
    for step in sorted((int(m.group(1)) for n in names if (m := _META_RE.match(n))), reverse=True):
        if local and local[-1] >= step:
            return Transfer(False, f"{out_dir} already holds step {local[-1]} (the store's newest is {step})")
        meta = _read_json(fs, f"{prefix}/meta_{step:06d}.json")
        files = _step_files(names, step, _step_world_size(meta) if isinstance(meta, dict) else None)
        if files is None:
            log.info(f"checkpoint step {step} in {store_url}/{name} is incomplete; trying an older one")
            continue
        total = 0
        for filename in files:
            got = _get(fs, f"{prefix}/{filename}", out_dir / filename)
            if got != sizes[filename]:
                raise StoreError(f"{store_url}/{name}/{filename}: downloaded {got} bytes, the store lists "
                                 f"{sizes[filename]}")
            total += got
        seconds = time.monotonic() - started
        log.info(f"restored checkpoint step {step} from {store_url}/{name}: {len(files)} file(s), {total} bytes "
                 f"in {seconds:.1f} s")
        return Transfer(True, step=step, files=len(files), bytes=total, seconds=seconds)
    return Transfer(False, f"no complete checkpoint step in {store_url}/{name}")
