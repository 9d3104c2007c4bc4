"""One run per output directory: an advisory lock file naming its holder.

``RunLock(directory).acquire()`` creates ``<directory>/.polytron.lock``, takes an
exclusive ``flock`` on it and writes who holds it (host, pid, SLURM job, start time).
The kernel drops the ``flock`` when the holder dies, however it dies (kill -9
included), so a lock left by a dead process is simply taken over. While the holder
lives, a second run in the same directory stops with one line naming it.

``flock`` is coherent on local file systems, NFSv4 and Lustre (mounted with
``flock``); on a mount where it is a silent no-op (NFS with ``nolock``) two runs on
different nodes would both get the lock, so keep run directories off such mounts.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from polytron.model.errors import PolytronError

LOCK_NAME = ".polytron.lock"


class RunLockError(PolytronError, RuntimeError):
    """Another live process holds the directory's run lock (or it cannot be created)."""


def _holder_text(info: dict) -> str:
    job = f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else ""
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{job}, "
            f"started {info.get('started', '?')}")


class RunLock:
    """The run-directory lock; hold it for the life of the run."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[dict]:
        """Take the lock; returns the previous (dead) holder's record when one was taken over."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockError(f"cannot create the run lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = _read(fd)
            os.close(fd)
            raise RunLockError(f"run directory {self.directory} is in use by {_holder_text(info)} "
                               f"(lock file {self.path})") from None
        previous = _read(fd)
        self._fd = fd
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                    "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return previous or None

    def release(self) -> None:
        """Clear the holder record and drop the lock (also done by the kernel at exit)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        info = json.loads(raw) if raw.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def retire_run_dir(directory: str, reason: str = "superseded") -> Optional[str]:
    """Rename a run directory that a new conversion made obsolete to
    ``<directory>.<reason>-<time>`` (kept, never resumed) and return the new path; None
    when there is no such directory. A run that still holds its lock is never moved:
    :class:`RunLockError` names it."""
    if not os.path.isdir(directory):
        return None
    if os.path.isfile(os.path.join(directory, LOCK_NAME)):
        lock = RunLock(directory)
        lock.acquire()          # raises while a live run holds it
        lock.release()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{directory.rstrip(os.sep)}.{reason}-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{directory.rstrip(os.sep)}.{reason}-{stamp}-{n}"
    os.rename(directory, target)
    return target
