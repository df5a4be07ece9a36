"""
Single files fetched from a public URL into NANOPIPE_HOME: the reference's identity conversations and the
370K-word English list of the spelling tasks. Torch-free and light: the flow's planning imports it.

    path = fetch(WORD_LIST)                    # downloaded once; later calls check and reuse the cached copy
    path = fetch(remote_file(url))             # any URL: pinned if it is a known file, else trust on first use
    problem = availability_problem(WORD_LIST)  # planning: None when cached intact or reachable, else one line

A download streams into a temporary file beside its target, is checked against the expected size and sha256,
and only then renamed into place: a cut connection or a wrong checksum leaves no file under the target's name.
A file whose sha256 is not known in advance (no public checksum exists for the identity conversations) is
trusted on first use: the first download records its size and sha256 in `<name>.sha256.json` beside it, and
every later use checks the cached file against that record.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from nanopipe.common import atomic_path, atomic_write_json, get_base_dir, print0
from nanopipe.configs.chat_common import IDENTITY_CONVERSATIONS_URL, WORD_LIST_URL
from nanopipe.exit_codes import ExitCode, StageError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


class RemoteFileError(StageError, OSError):
    """A file could not be fetched intact (offline, an HTTP error, a size or sha256 that does not match).

    One line naming the URL and the way around it. Not retried: the same network or file gives the same answer."""

    exit_code = ExitCode.BAD_INPUT


@dataclass(frozen=True)
class RemoteFile:
    """A public file and what it must be: `size` bytes with this `sha256` (None: recorded at first download)."""

    url: str
    name: str
    subdir: str = "downloads"
    size: int | None = None
    sha256: str | None = None

    def target(self) -> Path:
        return get_base_dir() / self.subdir / self.name

    def record_path(self) -> Path:
        return self.target().with_name(self.name + ".sha256.json")


# The public English word list (dwyl/english-words, 370,099 words); size and sha256 of its current version
WORD_LIST = RemoteFile(WORD_LIST_URL, "words_alpha.txt", "words", 4_234_861,
                       "2d8cf2326673fa0c179bdc3a58053872d16bff5352331580955ae62101f6a34d")
# The identity conversations of nanochat's speedrun (about 2.3 MB); no checksum is published
IDENTITY_CONVERSATIONS = RemoteFile(IDENTITY_CONVERSATIONS_URL, "identity_conversations.jsonl", "identity")
KNOWN_FILES = {f.url: f for f in (WORD_LIST, IDENTITY_CONVERSATIONS)}


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def remote_file(url: str, subdir: str | None = None) -> RemoteFile:
    """The known file at `url` (pinned size and sha256), else an unpinned one cached under a name that also
    carries a short hash of the URL (two URLs ending in the same file name do not share a cache entry)."""
    if url in KNOWN_FILES:
        known = KNOWN_FILES[url]
        return known if subdir is None else RemoteFile(url, known.name, subdir, known.size, known.sha256)
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "file"
    if subdir is None:
        return RemoteFile(url, f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{base}")
    return RemoteFile(url, base, subdir)


# -----------------------------------------------------------------------------
# Checks

def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def expected(remote: RemoteFile) -> tuple[int | None, str | None]:
    """The pinned (size, sha256), else the one recorded at first download, else (None, None)."""
    if remote.sha256 is not None:
        return remote.size, remote.sha256
    record = remote.record_path()
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("url") == remote.url:
            return saved["size"], saved["sha256"]
    return remote.size, None


def mismatch(size: int, sha256: str, want_size: int | None, want_sha256: str | None) -> str | None:
    """What differs from the expectation, in words (None: nothing)."""
    if want_size is not None and size != want_size:
        return f"{size} bytes, expected {want_size}"
    if want_sha256 is not None and sha256 != want_sha256:
        return f"sha256 {sha256}, expected {want_sha256}"
    return None


def cached(remote: RemoteFile) -> Path | None:
    """The cached copy when it exists and matches what is expected of it, else None."""
    target = remote.target()
    if not target.is_file():
        return None
    want_size, want_sha256 = expected(remote)
    if want_sha256 is None:
        return None  # an unrecorded file (an older download): fetch again, and record that one
    return target if mismatch(*file_digest(target), want_size, want_sha256) is None else None


# -----------------------------------------------------------------------------
# Fetching

def _offline_hint(remote: RemoteFile) -> str:
    return (f"offline? download it where the network is reachable and give the local file instead, "
            f"or place it at {remote.target()}")  # no ';': planning joins its problems with '; '


def _reason(err: BaseException) -> str:
    """One line: an HTTP error as "HTTP Error 404: Not Found", a connection error by its cause."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    return " ".join(str(err).split()) or type(err).__name__


def _download(remote: RemoteFile, timeout_s: float) -> None:
    """Stream the URL into a temporary file beside the target; check; rename into place."""
    want_size, want_sha256 = expected(remote)
    digest, size = hashlib.sha256(), 0
    try:
        with atomic_path(remote.target()) as tmp, urllib.request.urlopen(remote.url, timeout=timeout_s) as response:
            with open(tmp, "wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            announced = response.headers.get("Content-Length")
            if announced is not None and int(announced) != size:  # http.client ends a cut body without an error
                raise RemoteFileError(f"cannot download {remote.url}: the connection ended after {size} of "
                                      f"{announced} bytes (try again)")
            wrong = mismatch(size, digest.hexdigest(), want_size, want_sha256)
            if wrong:  # raised inside atomic_path: the temporary file is removed, the target left as it was
                raise RemoteFileError(f"refusing the download of {remote.url}: {wrong} (the file changed at its "
                                      f"source, or the transfer was corrupted)")
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError is an OSError
        if isinstance(err, RemoteFileError):
            raise
        raise RemoteFileError(f"cannot download {remote.url}: {_reason(err)} "
                              f"({_offline_hint(remote)})") from None
    if want_sha256 is None:  # trust on first use: later uses are checked against this record
        atomic_write_json(remote.record_path(), {"url": remote.url, "size": size, "sha256": digest.hexdigest(),
                                                 "note": "recorded at first download (no published checksum)"})
        print0(f"recorded sha256 {digest.hexdigest()} ({size} bytes) of {remote.url} in {remote.record_path()}")


def fetch(remote: RemoteFile, timeout_s: float = TIMEOUT_S) -> Path:
    """The local path of `remote`, downloaded once (one process at a time: the others wait, then reuse it)."""
    target = remote.target()
    if cached(remote):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if cached(remote):  # another process fetched it while this one waited
            return target
        print0(f"downloading {remote.url} -> {target}")
        _download(remote, timeout_s)
    return target


def availability_problem(remote: RemoteFile, timeout_s: float = 10.0) -> str | None:
    """None when the file is cached intact or its URL answers a HEAD request, else one line saying why not.
    Planning calls this so that an offline machine fails before any GPU time, not in the middle of a stage."""
    if cached(remote):
        return None
    request = urllib.request.Request(remote.url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except (OSError, ValueError, http.client.HTTPException) as err:
        return f"cannot reach {remote.url}: {_reason(err)} ({_offline_hint(remote)})"


def fetch_source(value: str | os.PathLike) -> Path:
    """A local path as given, or the cached download of a URL."""
    return fetch(remote_file(value)) if is_url(value) else Path(value).expanduser()
