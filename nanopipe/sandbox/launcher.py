"""
The sandbox's launcher (`entry.py --sandbox-child`): reads the program, drops privileges and enters the
namespaces (kernel.py), then forks the init of the new PID namespace, which runs the program (program.py);
it tells the parent on its own pipe which protections hold (or refuses), kills the init at the deadline and
says how it ended. Where no PID namespace can be made, the program runs in the launcher itself.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import sys

from . import REQUIRED_PROTECTIONS
from .guards import preload
from .kernel import drop_privileges, enter_namespaces, setup_init
from .program import run_program


def _send(fd: int, **fields) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def _run_init(run, status_fd: int, program_fds: list[int], work_dir: str, protections: list[str],
              require_isolation: bool, deadline_s: float):
    """Fork the PID namespace's init, which sets itself up and calls `run`; tell the parent which protections
    hold (or refuse), kill the init at the deadline, report how it ended; never returns."""
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the init: process 1 of the new PID namespace
        os.close(status_fd)  # the launcher's channel to the parent never reaches the program
        os.close(setup_r)
        made, error = setup_init(work_dir)
        _send(setup_w, made=made, error=error)
        os.close(setup_w)
        if require_isolation and any(name not in protections + made for name in REQUIRED_PROTECTIONS):
            os._exit(0)  # the launcher refuses on our behalf: the program is never run
        run(in_namespace=True)
    os.close(setup_w)
    for fd in program_fds:  # only the init holds the program's pipes: the judge sees EOF when it ends
        os.close(fd)
    setup = json.loads(_read_all(setup_r) or b'{"made": [], "error": "the init died during setup"}')
    os.close(setup_r)
    protections = protections + setup["made"]
    missing = [name for name in REQUIRED_PROTECTIONS if name not in protections]
    if missing and require_isolation:
        _send(status_fd, refused=f"could not set up {', '.join(missing)}: {setup['error']}")
    else:
        _send(status_fd, protections=protections, error=setup["error"])
    pidfd = os.pidfd_open(pid)
    killed = not select.select([pidfd], [], [], deadline_s)[0]
    if killed:  # the kernel then kills everything else in its namespace
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    _send(status_fd, killed_at_deadline=killed, returncode=os.waitstatus_to_exitcode(wait_status))
    os._exit(0)


def child_main(argv: list[str]) -> None:
    """The launcher, given its arguments (descriptors, limits, flags) and the program on stdin; never returns."""
    report_fd, status_fd, calls_fd = int(argv[0]), int(argv[1]), int(argv[2])
    timeout, deadline_s, max_memory_bytes = float(argv[3]), float(argv[4]), int(argv[5])
    drop_to_nobody, require_isolation = argv[6] == "1", argv[7] == "1"
    header, _, program = sys.stdin.buffer.read().decode("utf-8", errors="surrogatepass").partition("\n")
    header = json.loads(header)
    sys.stdin = open(os.devnull)  # the program gets an empty stdin
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=False)
    work_dir = os.path.realpath(os.getcwd())
    preload()

    protections = ["nobody"] if drop_to_nobody and drop_privileges() else []
    protections += enter_namespaces()
    run = functools.partial(run_program, header, program, report_fd, calls_fd, work_dir, timeout, max_memory_bytes)
    if "pid-namespace" in protections:
        _run_init(run, status_fd, [fd for fd in (report_fd, calls_fd) if fd >= 0], work_dir, protections,
                  require_isolation, deadline_s)
    missing = [name for name in REQUIRED_PROTECTIONS if name not in protections]
    if missing and require_isolation:
        _send(status_fd, refused=f"could not set up {', '.join(missing)}")
        os._exit(0)
    _send(status_fd, protections=protections, error=None)
    os.close(status_fd)  # the program runs in this process: it must not reach the launcher's channel
    run(in_namespace="user-namespace" in protections)
