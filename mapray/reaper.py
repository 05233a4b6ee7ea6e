"""What is left of an embedded local Ray when its driver dies without stopping it (SIGKILL, the OOM killer).

Ray's GCS and raylet go with the driver, but its DashboardAgent and RuntimeEnvAgent stay: they report the raylet's
death to the dead GCS and wait on it (both still ran 56 s after a SIGKILL here; gone within 3 minutes).
`watch_local_ray` starts a small process beside the embedded Ray that holds the read end of a pipe whose write end
only the driver holds. However the driver ends, the pipe closes; the watcher gives a normal shutdown `GRACE_S` to
finish, then kills every process still running with that Ray node's id in its environment (Ray sets
`RAY_NODE_ID` in each process it starts). After a clean exit there is nothing left to kill, and the watcher exits
too.

    python -m mapray.reaper NODE_ID     (what `watch_local_ray` runs; stdin is the driver's pipe)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 3.0
_WATCHERS: list[subprocess.Popen] = []  # the driver's end of each watcher's pipe, open while the driver lives


def watch_local_ray(node_id: str) -> None:
    """In the driver, right after it started an embedded local Ray: the watcher for that node."""
    watcher = subprocess.Popen([sys.executable, "-m", "mapray.reaper", node_id], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _WATCHERS.append(watcher)


def processes_of(node_id: str) -> list[int]:
    """This user's processes that Ray started for `node_id` (by the `RAY_NODE_ID` in their environment)."""
    wanted = f"RAY_NODE_ID={node_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def main(node_id: str) -> None:
    sys.stdin.buffer.read()  # returns when the driver's end closes: its exit, clean or not
    time.sleep(GRACE_S)
    for pid in processes_of(node_id):
        with contextlib.suppress(OSError):  # gone already
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1])
