"""What is left of an embedded local Ray when its driver dies without stopping it (SIGKILL, the OOM killer).

Ray's GCS and raylet go with the driver, but its DashboardAgent and RuntimeEnvAgent stay: they report the raylet's
death to the dead GCS and wait on it (both still ran 56 s after a SIGKILL here; gone within 3 minutes).
`watch_local_ray` starts a small process beside the embedded Ray that holds the read end of a pipe whose write end
only the driver holds. While the driver lives, the watcher notes every process under the Ray processes the driver
started (GCS, raylet, dashboard, monitors: the agents and workers are the raylet's children), because once the
raylet is gone its orphans no longer say whose they were. However the driver ends, the pipe closes; the watcher
gives a normal shutdown `GRACE_S` to finish, then kills every noted process still running. After a clean exit there
is nothing left to kill, and the watcher exits too.

Why not the `RAY_NODE_ID` Ray puts in each agent's environment: the agents rename themselves (setproctitle), which
overwrites `/proc/PID/environ`; whether the variable survives there depends on the environment's size.

    python -m mapray.reaper PID [PID ...]   (what `watch_local_ray` runs; stdin is the driver's pipe)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 3.0
# the agents start within seconds of the raylet (a driver killed sooner leaves them unnoted), so the watcher looks
# often at first; later only now and then, for a process the raylet starts late (a /proc scan costs ~1 ms/100 pids)
NOTE_EVERY_S, NOTE_FIRST_S, NOTE_LATER_EVERY_S = 1.0, 30.0, 30.0
_WATCHERS: list[subprocess.Popen] = []  # the driver's end of each watcher's pipe, open while the driver lives


def watch_local_ray() -> None:
    """In the driver, right after it started an embedded local Ray: the watcher for the processes it started."""
    node = getattr(getattr(sys.modules.get("ray._private.worker"), "_global_node", None), "all_processes", None)
    roots = [str(info.process.pid) for infos in (node or {}).values() for info in infos]
    if not roots:  # a Ray that does not say which processes it started: nothing to watch
        return
    watcher = subprocess.Popen([sys.executable, "-m", "mapray.reaper", *roots], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _WATCHERS.append(watcher)


def start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot), or None once it is gone: a pid alone may be reused."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(roots: set[int]) -> dict[int, str]:
    """`roots` and every running process under them, each with its start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, list(roots)
    while todo:
        pid = todo.pop()
        started = start_time(pid)
        if pid in found or pid == os.getpid() or started is None:
            continue
        found[pid] = started
        todo.extend(children.get(pid, ()))
    return found


def main(roots: list[int]) -> None:
    noted: dict[int, str] = {}
    began = time.monotonic()
    while True:  # until the driver's end of the pipe closes: its exit, clean or not
        noted.update(descendants(set(roots) | set(noted)))
        if not any(start_time(pid) == started for pid, started in noted.items()):
            return  # the driver stopped its Ray (ray.shutdown) and lives on: nothing left to watch
        every = NOTE_EVERY_S if time.monotonic() - began < NOTE_FIRST_S else NOTE_LATER_EVERY_S
        readable, _, _ = select.select([sys.stdin], [], [], every)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
    time.sleep(GRACE_S)
    for pid, started in noted.items():
        if start_time(pid) == started:  # still that process, not a new one given its pid
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main([int(pid) for pid in sys.argv[1:]])
