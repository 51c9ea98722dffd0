"""One running driver per job: an OS file lock in the job's snapshot folder.

    runs/<job>/.driver.lock     flock'd by the driver for its whole life; holds {pid, host, since}

``fcntl.flock`` is released by the kernel when the holder's file is closed, including when the
process is SIGKILLed, so a crashed driver never leaves a lock behind (the file may stay, stale,
and is taken over by the next driver). A second driver does not wait: it fails at once with one
line naming the one that runs.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import CkdError

LOCK_FILE = ".driver.lock"


@contextmanager
def driver_lock(folder: Path, what: str) -> Iterator[Path]:
    """Hold ``folder/.driver.lock`` exclusively while the block runs; CkdError if another process holds it.

    Folders this call had to create are removed again on release when they are still empty, so a
    driver that fails before writing anything leaves nothing behind.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    path = folder / LOCK_FILE
    try:
        fd = _acquire(path, what)
    except OSError as e:  # a read-only folder, no permission
        raise CkdError(f"Cannot create the driver lock {path} ({e.strerror or e}); make {folder} writable (it also "
                       f"holds the snapshots) or set snapshots.dir to a writable folder, then submit again") from None
    try:
        try:
            _write_owner(fd)
        except OSError:
            pass  # a full disk: the note on who holds the lock is missing, the flock still holds
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiter that opened the old file retries (_acquire)
        except OSError:
            pass
        os.close(fd)
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break


def single_driver(run):
    """Decorator for ``run(job, ...)``: the job's snapshot folder is locked while ``run`` runs."""

    @functools.wraps(run)
    def wrapper(job, *args, **kwargs):
        with driver_lock(job.snapshot_dir, f"job {job.name!r}"):
            return run(job, *args, **kwargs)

    return wrapper


def lock_owner(folder: Path, name: str = LOCK_FILE) -> dict | None:
    """What the lock file says about its (last) holder, or None when unreadable."""
    try:
        owner = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


@contextmanager
def store_lock(root: Path, name: str, what: str, then: str) -> Iterator[Path]:
    """Hold ``root/name`` exclusively while a store's maintenance (``ckd compact``) runs; CkdError at once,
    naming the holder, if another process holds it. Released by the kernel if the holder is killed."""
    path = Path(root) / name
    fd = _acquire(path, what, then, role="process")
    try:
        try:
            _write_owner(fd)
        except OSError:
            pass
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, what: str, then: str = "submit again", role: str = "driver") -> int:
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a releasing driver in between
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CkdError(f"{what} is already running: {_describe(lock_owner(path.parent, path.name), role)} holds "
                           f"{path}; wait for it to finish (or stop it), then {then}") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file we locked must still be the one at `path` (a releasing holder unlinks it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_owner(fd: int) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    data = json.dumps(owner).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _describe(owner: dict | None, role: str = "driver") -> str:
    if not owner:
        return f"another {role}"
    return f"{role} pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {owner.get('since', '?')})"
