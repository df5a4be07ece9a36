"""Live processes found through /proc, for the tests that check that nothing outlives a stage or a run."""

import os
from pathlib import Path


def pids_with_cmdline(needle: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains `needle`."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):   # it ended meanwhile
            continue
        if needle.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found
