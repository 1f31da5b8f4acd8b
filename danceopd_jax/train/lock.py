"""One job per workdir: `<workdir>/lock`, held by process 0 of the run that trains in it.

The lock file is created with O_CREAT | O_EXCL, which is atomic on local disks and on the
shared filesystems a multi-node run uses (NFS v3+, Lustre, GPFS). It holds the holder's host,
pid and start time; its mtime is a heartbeat that the holder refreshes every HEARTBEAT_S
seconds. Another job refuses to start while the lock is live, naming the holder. The lock is
stale, and is taken over with a log line, when its holder ran on this host and that pid is
gone (a crash, a SIGKILL), or when its heartbeat is older than STALE_S (a holder on another host
that died, or a pid reused since). Two jobs that find one stale lock at the same moment can both
take it over; that needs a crash and two starts within the same second.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np

from danceopd_jax.core.errors import DataError

log = logging.getLogger(__name__)
LOCK_FILE = "lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats


class WorkdirLocked(DataError):
    """Another live job holds the workdir."""


class WorkdirLock:
    """The lock of one workdir: acquire() or raise WorkdirLocked; release() when done."""

    def __init__(self, workdir: str | Path, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.path = Path(workdir).absolute() / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "start": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        if not self._create():
            held = self._read()
            why = self._stale(held)
            if why is None:
                raise WorkdirLocked(
                    f"{self.path.parent} is in use by another job: pid {held.get('pid')} on "
                    f"{held.get('host')}, started {held.get('start')} (lock file {self.path}, "
                    f"heartbeat {self._age():.0f}s ago). Wait for it to finish or stop it, or "
                    "use another --workdir. If that job is dead, delete the lock file.")
            log.warning("%s: taking over the stale lock of pid %s on %s (started %s): %s",
                        self.path.parent, held.get("pid"), held.get("host"), held.get("start"),
                        why)
            self.path.unlink(missing_ok=True)
            if not self._create():
                raise WorkdirLocked(f"{self.path.parent}: another job took the stale lock "
                                    f"{self.path} at the same time: {self._read()}.")
        self._beat = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self._read() == self.holder:  # never remove a lock another job took over
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder, f)
        return True

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # gone, or caught between create and write
            return {}

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _stale(self, held: dict) -> str | None:
        """Why the lock `held` is stale, or None while its holder may be alive."""
        if held.get("host") == self.holder["host"] and not _alive(int(held.get("pid", -1))):
            return "that process is gone"
        if self._age() > self.stale_s:
            return f"no heartbeat for {self._age():.0f}s (> {self.stale_s:.0f}s)"
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError as e:  # the run goes on; another job may now take the workdir
                log.warning("cannot refresh the workdir lock %s: %s", self.path, e)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def hold_workdir(workdir: Path) -> Iterator[None]:
    """Hold the workdir's lock for the block. Process 0 takes it; in a multi-process run every
    process learns whether it did, so that all of them stop together if not."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLocked as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not taken and error is None:
            error = WorkdirLocked(f"{workdir} is in use by another job (process 0 of this run "
                                  "names it).")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
