"""What a mapray command prints on the terminal: one progress line per stage (rows done, rows/s, ETA), the summary
last, and nothing of Ray's that a user cannot act on.

- Ray's and Ray Data's INFO logging (cluster start, every execution's plan, the non-interactive progress dump) is
  turned down to warnings, and Ray Data's progress bars are off; `--verbose` keeps all of it.
- Known lines of Ray's own making that say nothing about the run (`KNOWN_NOISE`, each with its reason) are taken
  out of the process's stderr at the file-descriptor level: Ray core's C++ logs write there directly, below
  Python's logging. Everything else passes through unchanged.
- `stage(name, total)` prints a stage's progress every `PROGRESS_EVERY_S` while its Ray Data executions run (from
  the executor's operator metrics, read by an execution callback as the run watchdog reads them) and one line
  when it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import time

import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

PROGRESS_EVERY_S = 15.0
_STAGE_KEY = "mapray.stage"  # a DataContext key: which of `_STAGES` an execution belongs to
_STAGES: dict[int, dict] = {}  # the stages running in this driver: name, total rows, rows seen, start

KNOWN_NOISE = (
    # Ray Data hands every actor pool's constructor an object reference and asks for max_restarts=-1; Ray core logs
    # an error for that combination at each actor start, with no large argument involved (ray-project/ray#57733,
    # open). A lost model actor is restarted all the same: the fault tests kill one mid-pass.
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
    # at the end of a pass Ray Data kills its idle actors; on a loaded machine the GCS's kill RPC can find one gone
    # already and logs it
    re.compile(rb"Failed to kill actor .*KillActor RPC failed"),
    # vLLM's CPU backend, at each sampler's or scorer's engine start: the CPU torch wheel ships Triton, which vLLM
    # then says it will not use, and its worker binds memory to its cores' NUMA node, which torch's C++ logs as a
    # warning. Neither is the user's to act on (vLLM's own errors and warnings pass).
    re.compile(rb"Triton is installed, but doesn't include CPU backend\. Disabling Triton\."),
    re.compile(rb"Warning: NUMA binding: Using MEMBIND policy for memory allocation"),
)


def setup(verbose: bool = False, whole_process: bool = True) -> None:
    """The command line's console: mapray's own logging at INFO, every other library's (Ray's too) at WARNING,
    known noise filtered out of the process's stderr when the command owns the `whole_process`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    # other libraries' INFO lines are theirs, not the user's (botocore's "Found credentials in environment
    # variables" at each s3 read): only mapray's own loggers keep INFO
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("mapray").setLevel(logging.INFO)
    # the embedded Ray's start (`mapray.runtime`) takes this level for Ray's logger; Ray Data's has its own
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a new local Ray turns on token authentication, its default, and warns that it did so (RAY_AUTH_MODE unset):
    # the embedded Ray is the default a user did not choose, and the warning is not theirs to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # one progress display per stage, mapray's (`stage`): Ray Data's bars, a bar per operator of each execution
    # with its resources, wrap at a terminal's width and break up around those lines, and into a log (a job's,
    # CI's) tqdm writes every redraw of them; `--verbose` keeps them
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # taken here: Ray Data would warn that they are off
    if whole_process:
        _filter_stderr()


def _noise(line: bytes) -> bool:
    return any(pattern.search(line) for pattern in KNOWN_NOISE)


def _filter_stderr() -> None:
    """Routes file descriptor 2 through a pipe whose reader drops `KNOWN_NOISE` lines; undone at exit, after the
    reader has written out what is left."""
    if getattr(_filter_stderr, "installed", False):
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while True:
                chunk = source.read(65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not _noise(line))
                if out:
                    os.write(terminal, out)
        if pending and not _noise(pending):
            os.write(terminal, pending)

    reader = threading.Thread(target=pump, name="mapray-stderr", daemon=True)
    reader.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # this process's last hold on the pipe: its reader sees the end of it
        reader.join(timeout=2.0)  # a Ray process that inherited the pipe may still hold it open

    atexit.register(restore)
    _filter_stderr.installed = True


@contextlib.contextmanager
def stage(name: str, total: int | None = None, quiet: bool = False):
    """Progress of one stage of a run on stderr: its Ray Data executions' rows every `PROGRESS_EVERY_S`, and a
    last line with rows and time when the stage ends (`quiet`: no last line). `total`: the rows the stage will
    see, for the ETA; None when unknown."""
    ctx = ray.data.DataContext.get_current()
    started = time.monotonic()
    # `printed`: when the stage last printed, whichever of its executions did (several can run at once: one line
    # per interval for the stage, not one per execution)
    progress = {"name": name, "total": total, "rows": 0, "started": started, "printed": started}
    # a Dataset runs with a copy of the context it was made in: the copy holds the stage's key, the counters stay
    # here in the driver
    key = id(progress)
    _STAGES[key] = progress
    ctx.set_config(_STAGE_KEY, key)
    ctx.custom_execution_callback_classes.append(_StageProgress)
    try:
        yield progress
    finally:
        ctx.custom_execution_callback_classes.remove(_StageProgress)
        ctx.remove_config(_STAGE_KEY)
        del _STAGES[key]
    if not quiet:
        took = time.monotonic() - progress["started"]
        rows = f"{progress['rows']:,} rows in " if progress["rows"] else ""
        print(f"mapray: {name}: {rows}{took:.1f} s", file=sys.stderr, flush=True)


class _StageProgress(ExecutionCallback):
    """Ray Data calls it at each step of an execution's scheduling loop (the executor's operators are Ray Data
    internals that mapray pins to Ray 2.60, as the run watchdog does)."""

    def before_execution_starts(self, executor) -> None:
        self.progress = _STAGES.get(executor._data_context.get_config(_STAGE_KEY, None))

    def on_execution_step(self, executor) -> None:
        if not self.progress:
            return
        self._count(executor)
        now = time.monotonic()
        if now - self.progress["printed"] >= PROGRESS_EVERY_S and self.progress["rows"]:
            self.progress["printed"] = now
            print(progress_line(self.progress, now), file=sys.stderr, flush=True)

    def after_execution_succeeds(self, executor) -> None:
        if self.progress:
            self._count(executor)

    def _count(self, executor) -> None:
        # a stage's executions pass over the same rows (the global pass reads them twice): the most any saw
        self.progress["rows"] = max(self.progress["rows"], rows_done(executor._topology or {}))


def rows_done(topology) -> int:
    """Rows out of the execution's last operator that is not a write (a write's outputs are file listings)."""
    ops = [op for op in topology if "Write" not in op.name and op.name != "Input"]
    return int(ops[-1].metrics.rows_task_outputs_generated) if ops else 0


def progress_line(progress: dict, now: float) -> str:
    took = max(now - progress["started"], 1e-9)
    rows, total = progress["rows"], progress["total"]
    rate = rows / took
    line = f"mapray: {progress['name']}: {rows:,}{f'/{total:,}' if total else ''} rows, {rate:.1f} rows/s"
    if total and rate > 0 and rows < total:
        line += f", ETA {(total - rows) / rate:.0f} s"
    return line
