"""The artifact store against a real S3 server on loopback (moto in server mode) and a shared-filesystem store:
artifacts and checkpoints go up, come back on a node without them, and nothing half-uploaded is ever restored;
the cross-machine lock admits one holder and outlives a dead one by a lease."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from flows.artifacts import MANIFEST, discard, verify, write_manifest
from flows.store import (CheckpointUploader, StoreError, artifact_name, checkpoints_name, open_store, restore_artifact,
                         restore_checkpoints, store_has, upload_artifact)
from flows.store_lock import LockTimeout, StoreLock, store_lock

REPO = Path(__file__).resolve().parents[1]
DIGEST = "0123456789abcdef"


# -----------------------------------------------------------------------------
# A real S3-compatible server on loopback

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3_url(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket on the loopback server; the standard AWS variables point every client at it."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for var, value in S3_ENV.items():
        monkeypatch.setenv(var, value)
    bucket = f"nanopipe-{uuid.uuid4().hex[:8]}"
    fs, _ = open_store(f"s3://{bucket}")
    fs.mkdir(bucket)
    return f"s3://{bucket}/store"


@pytest.fixture(params=["s3", "file"])
def store_url(request, tmp_path) -> str:
    if request.param == "file":
        return (tmp_path / "shared-store").as_uri()
    return request.getfixturevalue("s3_url")


def _artifact(home: Path, stage: str = "tok_train", digest: str = DIGEST) -> Path:
    """A small artifact in the real layout: outputs in out/, a log, metrics, the manifest written last."""
    directory = home / "artifacts" / stage / f"t-{digest}"
    (directory / "out" / "nested").mkdir(parents=True)
    (directory / "out" / "tokenizer.pkl").write_bytes(os.urandom(3000))
    (directory / "out" / "nested" / "table.bin").write_bytes(os.urandom(700))
    (directory / "out" / "metrics.json").write_text(json.dumps({"bpb": 1.25}))
    (directory / "stage.log").write_text("step 1/1\n")
    write_manifest(directory, stage=stage, digest=digest, config={"vocab_size": 512}, upstream={},
                   metrics={"bpb": 1.25}, timings={"seconds": 1.0})
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------
# Completed artifacts

def test_upload_then_restore_on_a_node_without_it(store_url, tmp_path):
    directory = _artifact(tmp_path / "node-a")
    name = artifact_name(directory)
    assert name == f"tok_train/t-{DIGEST}"
    before = _files(directory)
    sent = upload_artifact(directory, store_url)
    fs, root = open_store(store_url)
    stored = {p[len(root) + len(name) + 2:] for p in fs.find(f"{root}/{name}")}
    assert stored == set(before), "the store copy mirrors the local directory, file for file"
    assert sent.files == len(before) and sent.bytes == sum(len(b) for b in before.values())
    assert store_has(store_url, name, DIGEST)
    assert not store_has(store_url, name, "f" * 16), "another hash is another artifact"

    # another node: same NANOPIPE_HOME layout, nothing on disk
    elsewhere = tmp_path / "node-b" / "artifacts" / "tok_train" / f"t-{DIGEST}"
    restored = restore_artifact(store_url, name, elsewhere, DIGEST)
    assert restored, restored.reason
    assert verify(elsewhere, DIGEST)
    assert _files(elsewhere) == before
    assert [p.name for p in elsewhere.parent.iterdir()] == [elsewhere.name], "no temporary directory left"
    print(f"\n[{store_url.split(':')[0]}] artifact: {sent.bytes} bytes up in {sent.seconds:.3f} s, "
          f"{restored.bytes} bytes restored in {restored.seconds:.3f} s")

    # the usual case: the same node lost its copy (deleted, or a damaged one replaced)
    discard(directory)
    assert restore_artifact(store_url, name, directory, DIGEST)
    assert verify(directory, DIGEST) and _files(directory) == before


def test_a_store_copy_without_its_manifest_is_never_restored(store_url, tmp_path):
    directory = _artifact(tmp_path / "a")
    name = artifact_name(directory)
    fs, root = open_store(store_url)
    # an upload interrupted before its last file: every data file is there, the manifest is not
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST:
            fs.makedirs(f"{root}/{name}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), f"{root}/{name}/{rel}")
    assert not store_has(store_url, name, DIGEST)
    target = tmp_path / "b" / "artifacts" / "tok_train" / f"t-{DIGEST}"
    restored = restore_artifact(store_url, name, target, DIGEST)
    assert not restored and "manifest.json is missing" in restored.reason
    assert not target.exists()


def test_a_damaged_store_copy_is_refused_after_download(store_url, tmp_path):
    directory = _artifact(tmp_path / "a")
    name = artifact_name(directory)
    upload_artifact(directory, store_url)
    fs, root = open_store(store_url)
    # same size, other bytes: the listing cannot tell, the sha256 after download does
    fs.pipe_file(f"{root}/{name}/out/tokenizer.pkl", os.urandom(3000))
    assert store_has(store_url, name, DIGEST)
    target = tmp_path / "b" / "artifacts" / "tok_train" / f"t-{DIGEST}"
    target.mkdir(parents=True)
    (target / "leftover.txt").write_text("an interrupted local run")
    restored = restore_artifact(store_url, name, target, DIGEST)
    assert not restored and "sha256" in restored.reason, restored.reason
    assert _files(target) == {"leftover.txt": b"an interrupted local run"}, "the local directory is untouched"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "the download was cleaned up"
    # a missing file is seen from the listing alone
    fs.rm_file(f"{root}/{name}/stage.log")
    assert not store_has(store_url, name, DIGEST)


def test_only_a_complete_artifact_is_uploaded(store_url, tmp_path):
    directory = _artifact(tmp_path)
    (directory / MANIFEST).unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        upload_artifact(directory, store_url)
    fs, root = open_store(store_url)
    assert not fs.exists(f"{root}/{artifact_name(directory)}")


def test_reupload_hides_the_old_copy_until_the_new_manifest(s3_url, tmp_path):
    directory = _artifact(tmp_path)
    name = artifact_name(directory)
    upload_artifact(directory, s3_url)
    fs, root = open_store(s3_url)
    manifest_path = f"{root}/{name}/{MANIFEST}"
    order = []
    real_put = type(fs).put_file

    def spy(self, lpath, rpath, *args, **kwargs):   # a real upload, with the store's state at each file
        order.append((rpath.rsplit("/", 1)[1], self.exists(manifest_path)))
        return real_put(self, lpath, rpath, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(fs), "put_file", spy)
        upload_artifact(directory, s3_url)
    assert order[-1] == (MANIFEST, False), "the manifest goes up last"
    assert all(present is False for _, present in order), f"the old manifest was visible during upload: {order}"
    assert store_has(s3_url, name, DIGEST)


# -----------------------------------------------------------------------------
# Checkpoints as training saves them

def _save(out_dir: Path, step: int, rank: int, world_size: int, width: int = 64):
    """One rank's part of a checkpoint, written by nanopipe's own save_checkpoint."""
    import torch
    from nanopipe.checkpoint import save_checkpoint
    model = {"w": torch.full((width, width), float(step))} if rank == 0 else None
    meta = {"model_config": {"n_layer": 1}, "loader_state": {"world_size": world_size, "pq_idx": step}}
    save_checkpoint(out_dir, step, model, {"m": torch.full((width,), float(rank))}, meta, rank=rank)


def _wait_until(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting after {timeout} s for {what}"
        time.sleep(0.05)


def test_checkpoints_go_up_as_saved_and_come_back_on_another_node(s3_url, tmp_path):
    directory = tmp_path / "a" / "artifacts" / "base_train" / f"d2-{DIGEST}"
    out_dir = directory / "out"
    out_dir.mkdir(parents=True)
    name = checkpoints_name(directory, out_dir)
    assert name == f"base_train/d2-{DIGEST}/out"
    fs, root = open_store(s3_url)
    store_files = lambda: sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{root}/{name}"))  # noqa: E731

    uploader = CheckpointUploader(out_dir, s3_url, name, poll_seconds=0.05).start()
    try:
        _save(out_dir, 10, rank=1, world_size=2)
        _save(out_dir, 10, rank=0, world_size=2)
        _wait_until(lambda: [u.step for u in uploader.uploads] == [10], "step 10 to go up")
        assert store_files() == ["meta_000010.json", "model_000010.pt", "optim_000010_rank0.pt",
                                 "optim_000010_rank1.pt"]
        # rank 0 finished step 20 (its meta is there) but rank 1's optimizer file is not written yet
        _save(out_dir, 20, rank=0, world_size=2)
        time.sleep(0.5)   # several scans, none of which may upload the half-written step
        assert [u.step for u in uploader.uploads] == [10], "a step is uploaded only with every rank's file"
        _save(out_dir, 20, rank=1, world_size=2)
        _wait_until(lambda: [u.step for u in uploader.uploads] == [10, 20], "step 20 to go up")
        # the stage prunes an old step while a new one appears
        for path in out_dir.glob("*_000010*"):
            path.unlink()
        _save(out_dir, 30, rank=1, world_size=2)
        _save(out_dir, 30, rank=0, world_size=2)
    finally:
        uploads = uploader.stop()
    assert [u.step for u in uploads] == [10, 20, 30], "each step once, the last one by stop()'s final scan"
    assert all(u.files == 4 for u in uploads)
    for u in uploads:
        print(f"\ncheckpoint step {u.step}: {u.bytes} bytes uploaded in {u.seconds:.3f} s")
    assert len(uploader.uploaded) == 12

    # a node without the local files resumes from the newest complete step
    elsewhere = tmp_path / "b" / "artifacts" / "base_train" / f"d2-{DIGEST}" / "out"
    restored = restore_checkpoints(s3_url, name, elsewhere)
    assert restored and restored.step == 30, restored.reason
    print(f"restore of step 30 ({restored.bytes} bytes, {restored.files} files): {restored.seconds:.3f} s")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["meta_000030.json", "model_000030.pt",
                                                           "optim_000030_rank0.pt", "optim_000030_rank1.pt"]
    from nanopipe.checkpoint import load_resume_checkpoint
    for rank in (0, 1):
        point = load_resume_checkpoint(elsewhere, "latest", world_size=2, device="cpu", rank=rank)
        assert point.step == 30 and float(point.model_state["w"][0, 0]) == 30.0
        assert float(point.optim_state["m"][0]) == float(rank)
    assert not restore_checkpoints(s3_url, name, elsewhere), "already there: nothing to download"

    # a new uploader on that node (the retry) does not send the restored step again
    again = CheckpointUploader(elsewhere, s3_url, name, poll_seconds=0.05).start()
    assert again.stop() == []


def test_an_interrupted_checkpoint_upload_is_not_restored(s3_url, tmp_path):
    out_dir = tmp_path / "a" / "out"
    for step in (5, 9):
        _save(out_dir, step, rank=0, world_size=1)
    name = "base_train/d2-x/out"
    with CheckpointUploader(out_dir, s3_url, name, poll_seconds=0.05) as uploader:
        pass
    assert [u.step for u in uploader.uploads] == [5, 9]
    fs, root = open_store(s3_url)
    fs.rm_file(f"{root}/{name}/meta_000009.json")   # the upload of step 9 died before its meta went up
    target = tmp_path / "b" / "out"
    restored = restore_checkpoints(s3_url, name, target)
    assert restored.step == 5
    assert sorted(p.name for p in target.iterdir()) == ["meta_000005.json", "model_000005.pt",
                                                        "optim_000005_rank0.pt"]
    assert not restore_checkpoints(s3_url, "base_train/d2-none/out", tmp_path / "c")


def test_a_store_failure_is_retried_not_mistaken_for_a_pruned_step(s3_url, tmp_path):
    out_dir = tmp_path / "out"
    _save(out_dir, 1, rank=0, world_size=1)
    later = f"s3://later-{uuid.uuid4().hex[:8]}/store"
    uploader = CheckpointUploader(out_dir, later, "s/d/out", poll_seconds=0.05).start()
    try:
        _wait_until(lambda: uploader.last_error is not None, "the upload to a missing bucket to fail")
        assert uploader.uploads == []
        fs, _ = open_store(later)
        fs.mkdir(later.split("/")[2])   # the store comes back
        _wait_until(lambda: [u.step for u in uploader.uploads] == [1], "step 1 to go up once the store is there")
    finally:
        uploader.stop()
    assert restore_checkpoints(later, "s/d/out", tmp_path / "b").step == 1


def test_the_uploader_survives_steps_that_vanish(tmp_path):
    store = (tmp_path / "store").as_uri()
    out_dir = tmp_path / "out"
    _save(out_dir, 3, rank=0, world_size=2)   # waits for rank 1, which never writes: the step is pruned
    uploader = CheckpointUploader(out_dir, store, "s/d/out", poll_seconds=0.05).start()
    time.sleep(0.3)
    for path in out_dir.iterdir():
        path.unlink()
    _save(out_dir, 4, rank=0, world_size=1)
    assert [u.step for u in uploader.stop()] == [4]
    (out_dir / "meta_000007.json").write_text("{not json")
    (out_dir / "model_000007.pt").write_bytes(b"x")
    assert CheckpointUploader(out_dir, store, "s/d/out").scan() == []


# -----------------------------------------------------------------------------
# One producer across machines

HOLDER = textwrap.dedent("""
    import sys, time
    from flows.store_lock import StoreLock
    lock = StoreLock(sys.argv[1], sys.argv[2], lease_seconds=float(sys.argv[3]))
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
""")

LOCKER = textwrap.dedent("""
    import os, sys, time
    from flows.store_lock import store_lock
    url, name, log = sys.argv[1], sys.argv[2], sys.argv[3]
    for _ in range(3):
        with store_lock(url, name, lease_seconds=30):
            with open(log, "a") as f:
                f.write(f"enter {os.getpid()}\\n")
            time.sleep(0.2)
            with open(log, "a") as f:
                f.write(f"exit {os.getpid()}\\n")
""")


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_processes_never_hold_the_lock_at_once(store_url, tmp_path):
    log = tmp_path / "events.log"
    procs = [_python(LOCKER, store_url, "base_train/d2-abc", str(log)) for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    events = log.read_text().split("\n")[:-1]
    assert len(events) == 12
    for enter, leave in zip(events[::2], events[1::2]):
        assert enter.startswith("enter") and leave == enter.replace("enter", "exit"), events
    fs, root = open_store(store_url)
    assert not fs.exists(f"{root}/base_train/.d2-abc.lock") or store_url.startswith("file:"), "released"


def test_a_dead_holder_blocks_only_for_its_lease(s3_url, tmp_path):
    holder = _python(HOLDER, s3_url, "base_train/d2-dead", "6")   # renewed every 2 s: a loaded machine stalls less
    try:
        assert holder.stdout.readline().strip() == "held"
        waits = []
        with pytest.raises(LockTimeout):   # alive and renewing: never taken over
            StoreLock(s3_url, "base_train/d2-dead", poll_seconds=0.2, on_wait=waits.append).acquire(timeout=10)
        assert waits and f"pid {holder.pid}" in waits[0]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)   # dies without releasing, like a lost node
        holder.wait()
    lock = StoreLock(s3_url, "base_train/d2-dead", lease_seconds=30, poll_seconds=0.2)
    lock.acquire(timeout=120)
    try:
        fs, root = open_store(s3_url)
        body = json.loads(fs.cat_file(f"{root}/base_train/.d2-dead.lock"))
        assert body["holder"].startswith(f"pid {os.getpid()} ")
    finally:
        lock.release()
    assert not lock.lost


def test_a_holder_that_stalls_past_its_lease_knows_it_lost(s3_url):
    first = StoreLock(s3_url, "s/d-stall", lease_seconds=2, poll_seconds=0.1)
    first.acquire()
    first._stop.set()   # its renewals stop, as when the process is frozen
    first._thread.join()
    second = StoreLock(s3_url, "s/d-stall", lease_seconds=30, poll_seconds=0.1)
    second.acquire(timeout=60)
    first._stop.clear()
    first._renew_once()
    assert first.lost
    first.release()   # must not delete the new holder's lock
    assert second._current() is not None and not second.lost
    second.release()
    assert second._current() is None


def test_an_unsupported_store_says_so(tmp_path):
    with pytest.raises(StoreError, match="nosuch"):
        open_store("nosuch://bucket/x")
    with pytest.raises(StoreError, match="conditional writes"):
        StoreLock((tmp_path / "s").as_uri(), "a/b")
    with store_lock((tmp_path / "s").as_uri(), "a/b"):
        assert (tmp_path / "s" / "a" / ".b.lock").exists()
