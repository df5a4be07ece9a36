"""Ctrl-C and SIGTERM to `nanopipe run`: the running stage stops, the summary is written, the command exits
130 / 143 within seconds, and nothing it started (stage processes, its temporary Prefect server) survives."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow   # each case starts a Prefect server and trains a tokenizer: ~40 s


def processes_in_session(sid: int) -> list[str]:
    """Command lines of live processes (not zombies) of a session, or that carry the run's home in their env."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] != "Z" and int(stat[3]) == sid:   # field 6 of /proc/pid/stat: the session id
            found.append(f"{entry}: {cmdline}")
    return found


def processes_with_env(needle: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle.encode() in environ and state != "Z":
            found.append(entry)
    return found


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_run_stops_everything_and_reports(tmp_path, sig, code):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--preset=demo-cpu", f"--home={home}", "--stop_after=base_train", "--resources.nproc_per_node=1",
            "--resources.retries=0", "--tok_train.max_chars=200000", "--tok_train.vocab_size=512",
            "--base_train.num_iterations=100000", "--base_train.save_every=none", "--base_train.eval_every=none",
            f"--data.data_dir={tmp_path / 'builtin'}"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # wait until base_train is training (its launch marker is in some process's environment)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "step 00001" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "step 00001" in log.read_text(), "base_train never started"
        os.killpg(proc.pid, sig)   # what a terminal's Ctrl-C (or a supervisor's SIGTERM) does: the whole group
        signalled = time.monotonic()
        returncode = proc.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert returncode == code, text[-3000:]
    assert "| base_train | Interrupted" in text or "| base_train | Crashed" in text, text[-3000:]
    # the command waited for its stage and its server: within a few seconds on an idle machine (allow load)
    assert took < 60, took
    time.sleep(1)
    assert processes_in_session(proc.pid) == []
    assert processes_with_env(str(home)) == []
