"""Fault injection for tests and the GPU check, for real: SIGKILL a Ray worker process mid-run, catch a task in
flight on a node (by the title Ray gives the worker running it) so the node can be lost under it, and wait for
the moment a fault should land."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def kill_with_its_local_ray(driver) -> None:
    """SIGKILL a driver (a `subprocess.Popen`) and every process under it at once, as a machine that dies would,
    and wait until they are gone. Ray's workers sit in process groups of their own: killing the driver's group
    alone leaves them to notice their raylet's death a moment later, time enough for a write in flight to commit
    its rows."""
    import psutil

    parent = psutil.Process(driver.pid)
    processes = [parent, *parent.children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    driver.wait()
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive, alive


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


def wait_until(check: Callable[[], T], what: str, timeout_s: float = 300.0, poll_s: float = 0.1) -> T:
    """Polls `check` until it returns something truthy and returns that; TimeoutError naming `what` if not."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(poll_s)


AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # a raylet's own helpers, not workers


def worker_titles(raylet_pid: int) -> dict[int, str]:
    """The connected workers of a raylet (its children, less its agents) and their titles: Ray calls a worker
    `ray::IDLE`, an actor `ray::<Class>`, and a worker at work `ray::<task>` (`ray::ListFiles`,
    `ray::<Class>.<method>`) while it runs that task. A worker still starting up has no `ray::` title yet."""
    titles = {}
    for children in Path(f"/proc/{raylet_pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in map(int, children.read_text().split()):
                with contextlib.suppress(OSError):
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    if title.startswith("ray::") and not title.startswith(AGENTS):
                        titles[pid] = title
    return titles


def catch_task(raylets: dict[str, int], match: Callable[[str], bool], stop: Callable[[], bool],
               timeout_s: float = 300.0) -> tuple[str, int, str] | None:
    """Watches the workers of these raylets (node id -> raylet pid) until one runs a task whose title `match`es,
    and SIGSTOPs that worker: the task stays in flight there until the caller kills its node (and then the
    worker, which, stopped, would never notice its raylet is gone). Returns (node id, pid, title); None once
    `stop()` is true first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop():
        for node_id, raylet_pid in raylets.items():
            for pid, title in worker_titles(raylet_pid).items():
                if match(title):
                    os.kill(pid, signal.SIGSTOP)
                    if match(worker_titles(raylet_pid).get(pid, "")):  # still that task: caught in flight
                        return node_id, pid, title
                    os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    return None
