"""Runtime helpers: atomic writes never leave half files, progress lines round-trip, base dir; the distributed
runtime ends cleanly (background threads first, then the process group, its threads joined)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nanopipe import common
from nanopipe.common import (atomic_directory, atomic_path, atomic_write_json, atomic_write_text, compute_cleanup,
                             get_base_dir, on_cleanup, parse_progress, report_progress)

REPO = Path(__file__).resolve().parents[1]


def test_atomic_directory_has_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_failed_atomic_directory_leaves_nothing_and_keeps_old(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as d:
            (d / "f").write_text("new")
            raise RuntimeError("crash mid-write")
    assert (target / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass


def test_failed_atomic_file_write_keeps_old_content(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_progress_lines_round_trip(capsys):
    report_progress(step=3, total=10, loss=2.5)
    line = capsys.readouterr().out.strip()
    assert parse_progress(line) == {"step": 3, "total": 10, "loss": 2.5}
    assert parse_progress("step 3 | loss 2.5") is None


def test_progress_lines_are_strict_json_without_nan(capsys):
    import json

    import torch

    report_progress(step=1, val_loss=float("nan"), bpb=float("inf"), reward=torch.tensor(0.5), passes=[0.5, float("nan")])
    line = capsys.readouterr().out.strip()
    payload = line.split(" ", 1)[1]
    assert "NaN" not in payload and "Infinity" not in payload
    json.loads(payload, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert parse_progress(line) == {"step": 1, "val_loss": None, "bpb": None, "reward": 0.5, "passes": [0.5, None]}


def test_base_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path / "home"))
    assert get_base_dir() == tmp_path / "home" and (tmp_path / "home").is_dir()


# -----------------------------------------------------------------------------
# Ending the distributed runtime

def test_compute_cleanup_stops_threads_before_destroying_the_group(monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(common, "_CLEANUP_HOOKS", [])
    on_cleanup(lambda: calls.append("stop threads"))
    on_cleanup(lambda: 1 / 0)  # a failing hook is logged; the group is still destroyed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    compute_cleanup()
    assert calls == ["stop threads", "destroy"]
    calls.clear()
    with pytest.raises(RuntimeError, match="this rank failed"):
        try:
            raise RuntimeError("this rank failed")
        finally:
            compute_cleanup()  # the error path: no collective that would wait for the other ranks
    assert calls == ["stop threads", "destroy"]


# One rank that imports torch.distributed.nn.functional after compute_init, as torch._dynamo does (and the first
# operation on a meta tensor, e.g. building a GPT, imports torch._dynamo). Until compute_init imported it first,
# its `group=group.WORLD` default arguments kept the destroyed group alive, and with it the gloo threads, which
# then ran into interpreter shutdown and could abort a rank at exit ("terminate called without an active
# exception").
LATE_IMPORT_RANK = """
import json, os
import torch, torch.distributed as dist
from nanopipe.common import compute_cleanup, compute_init
compute_init("cpu")
import torch.distributed.nn.functional
try:
    dist.all_reduce(torch.ones(2))
finally:
    compute_cleanup()
names = [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]
print(json.dumps({"threads": names, "initialized": dist.is_initialized()}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_compute_cleanup_joins_the_process_group_threads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", LATE_IMPORT_RANK], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["initialized"] is False
    assert not [name for name in result["threads"] if "gloo" in name or "tcpstore" in name], result["threads"]
    assert "still referenced" not in proc.stderr
