"""
One producer per artifact across machines: the lock of an artifact in the store (flows/store.py), held while
a stage produces it, so that two runs on two nodes never train the same artifact at once.

    with store_lock(url, name, on_wait=log): ...      s3:// (a leased object) or file:// (a flock)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import fsspec.asyn

from flows.artifacts import artifact_lock
from flows.store import StoreError, is_local, open_store

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """The store lock stayed held by a live holder for longer than the caller would wait."""


def _s3_code(err: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's ClientError as the cause)."""
    cause = err.__cause__
    response = getattr(cause, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


class StoreLock:
    """A lease on `<store_url>/<parent>/.<leaf>.lock` held by at most one process anywhere.

    On S3 the lock is an object written with conditional requests (S3 has them since 2024; MinIO and moto
    too): `If-None-Match: *` creates it only when absent, the holder renews it every lease/3 seconds with
    `If-Match: <its ETag>`, and releases it with a conditional delete. A waiter that sees the same ETag for
    a whole lease (on its own clock: machines need not agree on the time) knows the holder is dead and
    takes the lock over with `If-Match` on that ETag, so of several waiters exactly one wins. A holder whose
    renewal fails has lost the lock; `lost` says so (the artifact stays safe: a store copy only counts with
    its manifest, and every restore verifies it).
    """

    def __init__(self, store_url: str, name: str, lease_seconds: float = 60.0, poll_seconds: float = 1.0,
                 on_wait: Callable[[str], None] | None = None, **storage_options):
        self.fs, root = open_store(store_url, **storage_options)
        if not hasattr(self.fs, "call_s3"):
            raise StoreError(f"store lock on {store_url!r}: conditional writes need an s3:// store "
                             "(a shared filesystem store locks with store_lock's file lock)")
        parent, _, leaf = f"{root}/{name}".rpartition("/")
        self.bucket, _, self.key = f"{parent}/.{leaf}.lock".partition("/")
        self.url = f"s3://{self.bucket}/{self.key}"
        self.lease_seconds, self.poll_seconds, self.on_wait = lease_seconds, poll_seconds, on_wait
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.etag: str | None = None
        self.lost = False
        self._renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._renewals += 1
        return json.dumps({"holder": self.holder, "lease_seconds": self.lease_seconds,
                           "renewal": self._renewals}).encode()

    def _put(self, **condition) -> str | None:
        """Conditional PUT of the lock object: its new ETag, or None when the condition did not hold."""
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(),
                                   **condition)["ETag"]
        except OSError as err:
            # 412: the condition failed; 409: a concurrent conditional write won; 404: If-Match on a released lock
            if isinstance(err, (FileExistsError, FileNotFoundError)) \
                    or _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise

    def _current(self) -> tuple[str, dict] | None:
        """(ETag, body) of the lock object as it is now (one GET), or None when nobody holds it."""
        async def get():
            got = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return got["ETag"], await got["Body"].read()
        try:
            etag, data = fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            return etag, json.loads(data)
        return etag, {}

    def acquire(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[str, float] | None = None   # (ETag, when this process first saw it)
        told = False
        while True:
            if (etag := self._put(IfNoneMatch="*")) is not None:
                break
            current = self._current()
            if current is None:
                continue   # released between our two requests
            etag_now, body = current
            if seen is None or seen[0] != etag_now:
                seen = (etag_now, time.monotonic())
            lease = float(body.get("lease_seconds", self.lease_seconds))
            if time.monotonic() - seen[1] > lease and (etag := self._put(IfMatch=etag_now)) is not None:
                log.warning(f"{self.url}: took over from {body.get('holder', 'a holder')} whose lease of "
                            f"{lease:.0f} s ran out without a renewal")
                break
            if not told and self.on_wait is not None:
                self.on_wait(f"{self.url} is held by {body.get('holder', 'another process')}; waiting for it")
                told = True
            if deadline is not None and time.monotonic() > deadline:
                raise LockTimeout(f"{self.url} still held by {body.get('holder', 'another process')} "
                                  f"after {timeout} s")
            time.sleep(self.poll_seconds)
        self.etag, self.lost = etag, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3) and self._renew_once():
            pass

    def _renew_once(self) -> bool:
        """Extend the lease; False once it is lost (taken over by a waiter after a stall)."""
        try:
            etag = self._put(IfMatch=self.etag)
        except OSError as err:   # a blip: the lease lasts three renewal periods
            log.warning(f"{self.url}: lease renewal failed, will retry: {err}")
            return True
        if etag is None:
            self.lost = True
            log.error(f"{self.url}: the lock was taken over by another process (this holder's renewals "
                      "stalled for a whole lease); another run may now produce the same artifact")
            return False
        self.etag = etag
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.etag is not None and not self.lost:
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except OSError as err:   # taken over meanwhile, or already gone: not ours to delete
                if not isinstance(err, FileNotFoundError) and _s3_code(err) not in ("PreconditionFailed", "NoSuchKey"):
                    raise
        self.etag = None

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def store_lock(store_url: str, name: str, on_wait: Callable[[str], None] | None = None,
               lease_seconds: float = 60.0, **storage_options) -> Iterator[None]:
    """Hold artifact `name`'s lock in the store for the life of the block, across machines.

    s3:// stores: a StoreLock (conditional writes, a lease). A shared-filesystem store (file://): the same
    flock as flows.artifacts.artifact_lock, on `<store>/<parent>/.<leaf>.lock`; the file server releases it
    when the holder dies (NFSv4, Lustre and GPFS carry flock across clients)."""
    fs, root = open_store(store_url, **storage_options)
    if is_local(fs):
        with artifact_lock(Path(root) / name, on_wait=on_wait):
            yield
        return
    with StoreLock(store_url, name, lease_seconds=lease_seconds, on_wait=on_wait, **storage_options):
        yield
