"""``ckd ingest --watch DIR``: take each new file that appears in a folder, exactly once.

A file is taken when it is whole: its modification time is at least ``settle_s`` old (a file moved in
with ``mv`` keeps its old time and is taken at once; one written in place is taken once it has not
changed for ``settle_s``). Names starting with '.' or ending in .tmp / .part / .partial / .crdownload are
left alone, so a writer can fill ``x.csv.part`` and rename it. After its ingest a file moves to
``DIR/ingested/``; a file that cannot be ingested (unreadable, no data rows, a missing column, ...) moves
to ``DIR/refused/`` beside ``<name>.reason.txt`` and the next file is taken. A problem of the store, not of
the file (busy, full disk, damaged segment), leaves the file where it is for the next look.

Exactly once: the store refuses content it already holds (a no-op by content hash), so a watcher that dies
between an ingest and the move takes the file again at its next start without adding a row.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from continual_kd.errors import CkdError
from continual_kd.stopping import Stop, StopFlag, nap_until
from continual_kd.stream.ingest import ColumnMap
from continual_kd.stream.store import IngestReport, StreamStore

INGESTED, REFUSED = "ingested", "refused"
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "taken" | "refused" | "retry"
    path: Path  # where the file is now
    report: IngestReport | None = None
    reason: str | None = None


def ready_files(folder: Path, settle_s: float, now: float | None = None) -> list[Path]:
    """Files in ``folder`` (not its subfolders) that look whole, oldest first."""
    now = time.time() if now is None else now
    found = []
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(".") or name.endswith(PARTIAL_SUFFIXES) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # moved away meanwhile
        if settle_s <= 0 or now - mtime >= settle_s:  # 0: every file, even one whose time is ahead of the clock
            found.append((mtime, name))
    return [folder / name for _, name in sorted(found)]


def _file_at_fault(e: CkdError, path: Path) -> bool:
    """The ingest refused the file itself (not the store, the disk or a lock)."""
    text = str(e)
    return text.startswith(f"Cannot ingest {path}") and "free space" not in text and "writable" not in text


def _move(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` under its name (``stem-2.ext``, ... when the name is taken)."""
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        n += 1
        target = folder / f"{path.stem}-{n}{path.suffix}"
    os.replace(path, target)
    return target


def take_file(store: StreamStore, path: Path, columns: ColumnMap) -> WatchEvent:
    """Ingest one file of the watched folder and move it to ``ingested/`` or ``refused/``."""
    try:
        report = store.ingest_file(path, columns)
    except CkdError as e:
        if not _file_at_fault(e, path):
            return WatchEvent("retry", path, reason=str(e))
        target = _move(path, path.parent / REFUSED)
        target.with_name(target.name + ".reason.txt").write_text(str(e) + "\n", encoding="utf-8")
        return WatchEvent("refused", target, reason=str(e))
    return WatchEvent("taken", _move(path, path.parent / INGESTED), report=report)


def watch_folder(store: StreamStore, folder: Path, columns: ColumnMap = ColumnMap(), poll_s: float = 2.0,
                 settle_s: float = 2.0, once: bool = False, stop: Stop | None = None,
                 on_event: Callable[[WatchEvent], None] = lambda e: None) -> int:
    """Take the folder's files as they appear until ``stop`` is set (``once``: one look). → files taken."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CkdError(f"--watch {folder}: no such folder; create it, or name the folder new files are put in")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CkdError(f"--watch {folder}: the folder is not writable; taken files are moved to {folder}/{INGESTED}/ "
                       f"(refused ones to {folder}/{REFUSED}/), so make it writable")
    stop = stop if stop is not None else StopFlag()
    taken = 0
    while not stop.is_set():
        for path in ready_files(folder, settle_s):
            if stop.is_set():
                break
            event = take_file(store, path, columns)
            taken += event.kind == "taken"
            on_event(event)
        if once:
            break
        nap_until(stop, poll_s, nap=0.2)
    return taken
