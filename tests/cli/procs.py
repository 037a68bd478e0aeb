"""Process checks for the supervisor tests: is a pid alive, did a set of pids go away, who is in a group."""

from __future__ import annotations

import os
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids, timeout: float) -> list[int]:
    """The pids still alive after `timeout` seconds (empty when all went away)."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if p]
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        if left:
            time.sleep(0.05)
    return [p for p in left if alive(p)]


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (a supervised child and anything it forked)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members
