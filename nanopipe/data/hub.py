"""Shards of a Hugging Face dataset repo, through huggingface-hub's public API: listed with their sizes and
sha256 (`HfApi.dataset_info`), downloaded in parallel (`hf_hub_download` per file into a staging `local_dir`),
retried with backoff, checked against the listing, and only then renamed into place."""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from nanopipe.common import atomic_write_json, print0
from nanopipe.configs.data import DEFAULT_HF_REPO, DataFlags
from nanopipe.data.shards import DataError, ShardSet, read_json, resolve_data_dir, resolve_val_shard, validate_shard
from nanopipe.exit_codes import ExitCode

# -----------------------------------------------------------------------------
# hf: shards of a Hugging Face dataset repo, through huggingface-hub

HF_SOURCE_NAME = "hf_source.json"  # the repo listing (commit, names, sizes, hashes) the shards came from
STAGING_DIR = ".hf_download"  # hf_hub_download's local_dir inside the data dir: files land here, are checked,
                              # then renamed to their flat name beside it (same filesystem, so the rename is atomic)


class DownloadError(DataError):
    """A shard could not be downloaded intact, or the repo not listed, after retries. The message names the file.

    Not a bad input: a later retry may succeed, so a stage exits with FAILED (1), which the flows retry."""

    exit_code = ExitCode.FAILED


class _CorruptDownload(Exception):
    """The bytes on disk are not the file the repo lists: start that file again from scratch."""


@dataclass(frozen=True)
class RemoteFile:
    name: str  # local file name: the repo path with "/" as "__" (shards live flat in one directory)
    path: str  # path inside the repo
    size: int
    sha256: str | None = None  # LFS files (every real shard)
    git_sha1: str | None = None  # small files kept in git: the blob id


def hf_endpoint(endpoint: str | None = None) -> str:
    """The hub to talk to: the argument, else $HF_ENDPOINT read now (not at import), else huggingface-hub's."""
    from huggingface_hub import constants
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth a retry, for whichever HTTP client huggingface-hub is built on."""
    # HfHubHTTPError, LocalEntryNotFoundError (hf_hub_download's "cannot reach the file") and its size
    # "Consistency check failed" are OSErrors; connection errors the library gave up on are TransportErrors
    classes: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def _http_status(err: BaseException) -> int | None:
    """The HTTP status behind an error, also when huggingface-hub wraps it (a failed HEAD raises
    LocalEntryNotFoundError from the HTTP error)."""
    for e in (err, err.__cause__):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:
            return status
    return None


def _retryable(err: BaseException) -> bool:
    """Server errors, throttling and broken connections are worth another try; 4xx answers are not."""
    status = _http_status(err)
    return status is None or status >= 500 or status in (408, 429)


def _backoff(attempt: int, backoff_s: float) -> float:
    return backoff_s * 2 ** (attempt - 1) * random.uniform(1.0, 1.25)  # jitter: parallel workers spread out


def _one_line(err: BaseException) -> str:
    """The error, and what caused it when the library wraps a cause in a generic message."""
    text = " ".join(str(err).split()) or type(err).__name__
    if err.__cause__ is not None and getattr(err, "response", None) is None:
        text += f" (caused by {type(err.__cause__).__name__}: {' '.join(str(err.__cause__).split())})"
    return text[:400]


def list_hf_shards(repo_id: str, revision: str = "main", endpoint: str | None = None, max_attempts: int = 5,
                   backoff_s: float = 2.0) -> tuple[str, dict[str, RemoteFile]]:
    """(commit, {file name: RemoteFile}) of the parquet files of a dataset repo, sizes and hashes included."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hf_endpoint(endpoint))
    for attempt in range(1, max_attempts + 1):
        try:  # dataset_info does not retry server errors itself
            info = api.dataset_info(repo_id, revision=revision, files_metadata=True)
            break
        except _transient_errors() as err:
            if not _retryable(err) or attempt == max_attempts:  # a missing repo is bad input, a dead network not
                error_class = DownloadError if _retryable(err) else DataError
                raise error_class(f"cannot list hf dataset repo {repo_id}@{revision} at {hf_endpoint(endpoint)}: "
                                  f"{_one_line(err)}") from None
            wait = _backoff(attempt, backoff_s)
            print0(f"listing {repo_id}: attempt {attempt}/{max_attempts} failed ({_one_line(err)}); "
                   f"retrying in {wait:.1f}s")
            time.sleep(wait)
    files = {}
    for sibling in info.siblings or []:
        if not sibling.rfilename.endswith(".parquet"):
            continue
        if sibling.size is None:
            raise DataError(f"hf repo {repo_id}: the listing gives no size for {sibling.rfilename}")
        name = sibling.rfilename.replace("/", "__")
        files[name] = RemoteFile(name, sibling.rfilename, sibling.size, sibling.lfs.sha256 if sibling.lfs else None,
                                 None if sibling.lfs else sibling.blob_id)
    return info.sha, files


class _DownloadProgress:
    """One log line per finished file with the running total (huggingface-hub draws per-file byte bars on a
    terminal; logs of parallel downloads need the aggregate)."""

    def __init__(self, files: list[RemoteFile]):
        self.total_bytes, self.total_files = sum(f.size for f in files), len(files)
        self.done_bytes = self.files_done = 0
        self._lock = threading.Lock()
        self._t0 = time.time()

    def file_done(self, file: RemoteFile) -> None:
        with self._lock:
            self.done_bytes += file.size
            self.files_done += 1
            print0(f"  [{self.files_done}/{self.total_files}] {file.name} ({file.size / 1e6:.1f} MB)")

    def line(self) -> str:
        seconds = max(time.time() - self._t0, 1e-6)
        return (f"download: {self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB "
                f"({100 * self.done_bytes / max(self.total_bytes, 1):.0f}%), "
                f"{self.done_bytes / 1e6 / seconds:.1f} MB/s, {self.files_done}/{self.total_files} files")


def _verify_download(path: Path, file: RemoteFile) -> None:
    """huggingface-hub checks a download's size against the HEAD answer but never its hash: this checks
    both against the repo listing."""
    size = path.stat().st_size
    if size != file.size:
        raise _CorruptDownload(f"size mismatch: got {size} bytes, the repo lists {file.size}")
    if file.sha256 or file.git_sha1:
        digest = hashlib.sha256() if file.sha256 else hashlib.sha1(f"blob {size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        expected = file.sha256 or file.git_sha1
        if digest.hexdigest() != expected:
            kind = "sha256" if file.sha256 else "git blob sha1"
            raise _CorruptDownload(f"{kind} mismatch: got {digest.hexdigest()}, the repo lists {expected}")


def _drop_killed_downloads(staging: Path, file: RemoteFile) -> None:
    """Delete the temporary files of killed downloads of `file`. hf_hub_download removes its temporary file when
    it fails, but not when its process is killed, and no later call reuses or removes it (its name is unique to
    one call). It lives under local_dir/.cache/huggingface/download and carries the file's etag (for LFS files
    the sha256) in its name. The caller holds the shard's lock, so no one else is writing one."""
    if file.sha256:
        for stale in (staging / ".cache" / "huggingface" / "download").rglob(f"*.{file.sha256}.*incomplete"):
            stale.unlink(missing_ok=True)


def download_file(repo_id: str, commit: str, file: RemoteFile, data_dir: Path, endpoint: str,
                  max_attempts: int = 5, backoff_s: float = 2.0) -> Path:
    """Download one shard to `data_dir / file.name`: retried with exponential backoff, checked, renamed into place.

    huggingface-hub's `hf_hub_download` does the transfer: it resumes a dropped connection from the last byte it
    wrote, retries 408/429 and unreachable HEADs itself, writes a temporary file and moves it into `local_dir`
    whole. What it lacks is written here: retries of 5xx answers to the download itself (it raises those at
    once), the sha256 check, and a lock over check + rename. Across processes it keeps no partial file (its
    temporary file is unique to one call: https://github.com/huggingface/huggingface_hub/pull/4228), so a killed
    run starts the shards it was fetching again; finished shards are never fetched twice.
    """
    from huggingface_hub import hf_hub_download
    dest, staging = data_dir / file.name, data_dir / STAGING_DIR
    error: BaseException | None = None
    with FileLock(str(data_dir / f".{file.name}.lock")):  # one process per shard, from download to rename
        if _complete(dest, file.size):
            return dest  # another process finished it while we waited
        _drop_killed_downloads(staging, file)
        for attempt in range(1, max_attempts + 1):
            try:
                # revision is the listed commit, so every file comes from the one snapshot that was listed;
                # a file a crashed run left in staging at that commit is returned at once (and checked below)
                staged = Path(hf_hub_download(repo_id, file.path, repo_type="dataset", revision=commit,
                                              local_dir=staging, endpoint=endpoint))
                _verify_download(staged, file)
                os.replace(staged, dest)
                return dest
            except _CorruptDownload as err:
                (staging / file.path).unlink(missing_ok=True)
                error = err
            except _transient_errors() as err:
                if not _retryable(err):
                    raise DownloadError(f"{file.name}: {_one_line(err)}") from None
                error = err
            if attempt < max_attempts:
                wait = _backoff(attempt, backoff_s)
                print0(f"  {file.name}: attempt {attempt}/{max_attempts} failed ({_one_line(error)}); "
                       f"retrying in {wait:.2f}s")
                time.sleep(wait)
    raise DownloadError(f"{file.name}: download failed after {max_attempts} attempts: {_one_line(error)}")


def download_shards(repo_id: str = DEFAULT_HF_REPO, data_dir: str | os.PathLike | None = None,
                    num_shards: int | None = 8, val_shard: str | None = None, revision: str = "main",
                    num_workers: int = 4, max_attempts: int = 5, backoff_s: float = 2.0,
                    endpoint: str | None = None) -> ShardSet:
    """Download the first `num_shards` training shards (None: all) of a dataset repo plus its pinned
    validation shard, in parallel; files already complete on disk are kept."""
    flags = DataFlags(data_source="hf", hf_repo_id=repo_id, val_shard=val_shard,
                      data_dir=str(data_dir) if data_dir else None)
    data_dir, val_shard = resolve_data_dir(flags), resolve_val_shard(flags)
    from huggingface_hub import constants
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise DataError(f"HF_HUB_OFFLINE is set: cannot download {repo_id} shards into {data_dir}")
    endpoint = hf_endpoint(endpoint)
    commit, remote = list_hf_shards(repo_id, revision, endpoint, max_attempts, backoff_s)
    if val_shard not in remote:
        examples = ", ".join(sorted(remote)[-3:]) or "none"
        raise DataError(f"validation shard {val_shard} (--val_shard) is not in hf repo {repo_id}@{commit[:12]}: "
                        f"{len(remote)} parquet files, the last ones {examples}")
    train_names = sorted(n for n in remote if n != val_shard)
    if num_shards is not None and num_shards > len(train_names):
        print0(f"{repo_id} has {len(train_names)} training shards, fewer than the {num_shards} asked for")
    train_names = train_names[:num_shards]
    wanted = [remote[n] for n in train_names + [val_shard]]
    data_dir.mkdir(parents=True, exist_ok=True)
    # the listing goes down first: later runs can then check what is on disk without the network
    atomic_write_json(data_dir / HF_SOURCE_NAME, {
        "repo_id": repo_id, "revision": revision, "commit": commit, "val_shard": val_shard,
        "files": {f.name: {"size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1} for f in remote.values()}})
    todo = [f for f in wanted if not _complete(data_dir / f.name, f.size)]
    progress = _DownloadProgress(todo)
    print0(f"hf {repo_id}@{commit[:12]}: {len(train_names)} training shards + validation {val_shard}; "
           f"{len(todo)} to download ({progress.total_bytes / 1e6:.1f} MB) with {num_workers} workers into {data_dir}")

    def fetch(file: RemoteFile) -> None:
        download_file(repo_id, commit, file, data_dir, endpoint, max_attempts, backoff_s)
        progress.file_done(file)

    failures = []
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        for future in [pool.submit(fetch, f) for f in todo]:
            try:
                future.result()
            except DownloadError as err:
                failures.append(str(err))
    if failures:
        raise DownloadError(f"{len(failures)} of {len(todo)} shards failed (the others are in {data_dir}, "
                            f"run again to resume): " + "; ".join(failures))
    if todo:
        print0(progress.line())
    shards = ShardSet(train=[data_dir / n for n in train_names], val=data_dir / val_shard, data_dir=data_dir)
    for path in shards.train + [shards.val]:
        validate_shard(path)
    return shards


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def ensure_hf_shards(repo_id: str, data_dir: Path, num_shards: int | None, val_shard: str) -> ShardSet:
    """hf shards for a stage: checked against the recorded repo listing offline, downloaded when missing.

    With num_shards None, the training shards already complete on disk are used (at least one).
    """
    source = data_dir / HF_SOURCE_NAME
    listing = read_json(source) if source.is_file() else {}
    files = listing.get("files", {}) if listing.get("repo_id") == repo_id else {}
    train_names = sorted(n for n in files if n != val_shard)
    if num_shards is None:
        train_names = [n for n in train_names if _complete(data_dir / n, files[n]["size"])]
    else:
        train_names = train_names[:num_shards]
    ready = (val_shard in files and train_names and (num_shards is None or len(train_names) == num_shards)
             and all(_complete(data_dir / n, files[n]["size"]) for n in train_names + [val_shard]))
    if ready:
        shards = ShardSet(train=[data_dir / n for n in train_names], val=data_dir / val_shard, data_dir=data_dir)
        for path in shards.train + [shards.val]:
            validate_shard(path)
        return shards
    if num_shards is None:
        raise DataError(f"no complete shards of hf repo {repo_id} in {data_dir} (training shards and the "
                        f"validation shard {val_shard}): pass --num_shards=N to download the first N, or run "
                        f"`python -m nanopipe.data download -n N --hf_repo_id={repo_id}`")
    return download_shards(repo_id, data_dir, num_shards, val_shard)
