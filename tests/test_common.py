"""Runtime helpers: atomic writes never leave half files, progress lines round-trip, base dir."""

import os

import pytest

from nanopipe.common import (atomic_directory, atomic_path, atomic_write_json, atomic_write_text, get_base_dir,
                             parse_progress, report_progress)


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


def test_base_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPIPE_HOME", str(tmp_path / "home"))
    assert get_base_dir() == tmp_path / "home" and (tmp_path / "home").is_dir()
