"""Fault injection for tests and the GPU check: SIGKILL a Ray worker process mid-run, for real."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def find_processes(pattern: str) -> list[int]:
    """PIDs whose command line contains `pattern` (Ray names actor processes `ray::ClassName...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmdline:
            pids.append(int(entry.name))
    return pids


class ActorKiller(threading.Thread):
    """Waits until a process matching `pattern` has lived `after_s` seconds, then SIGKILLs it once."""

    def __init__(self, pattern: str, after_s: float, timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.pattern, self.after_s, self.timeout_s = pattern, after_s, timeout_s
        self.killed: int | None = None
        self.killed_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        first_seen: dict[int, float] = {}
        while time.monotonic() < deadline:
            now = time.monotonic()
            for pid in find_processes(self.pattern):
                first_seen.setdefault(pid, now)
                if now - first_seen[pid] >= self.after_s:
                    os.kill(pid, signal.SIGKILL)
                    self.killed, self.killed_at = pid, time.time()
                    return
            time.sleep(0.1)
