"""Segment files that prove themselves: written whole with their size and checksum, checked on every read.

At commit the catalog records each segment's row count, size in bytes and sha256. Every read checks
the cheap two (size from ``stat``, rows from the Parquet footer); ``ckd status --verify`` also checks
the checksum. A segment that differs is named and refused, never read in part.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from continual_kd.checksums import file_sha256, fsync_dir
from continual_kd.errors import CkdError

SEGMENT_SCHEMA = pa.schema([("offset", pa.int64()), ("user", pa.int32()), ("item", pa.int32()),
                            ("ts", pa.int64()), ("weight", pa.float32())])
ROW_GROUP_ROWS = 1 << 17  # fixed row groups: the same rows always give the same bytes (repair compares them)


@dataclass(frozen=True)
class SegmentRecord:
    """What the catalog recorded for one segment (``file_bytes`` / ``file_sha256`` are None in stores
    made before they were recorded)."""

    segment_id: int
    path: str  # relative to the store root
    source: str
    rows: int
    file_bytes: int | None
    file_sha256: str | None


@dataclass(frozen=True)
class WrittenSegment:
    rows: int
    file_bytes: int
    file_sha256: str
    ts_min: int
    ts_max: int


def segment_problem(root: Path, seg: SegmentRecord, checksum: bool = False) -> str | None:
    """What is wrong with the segment file, in words, or None if it matches the catalog.

    Always: present, recorded size, readable footer with the recorded row count; ``checksum``: sha256.
    """
    path = root / seg.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "the file is missing"
    except OSError as e:
        return f"the file cannot be read ({e.strerror or e})"
    if seg.file_bytes is not None and size != seg.file_bytes:
        return f"the file has {size:,} bytes, the catalog recorded {seg.file_bytes:,}"
    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as e:
        return f"it is not a readable Parquet file ({str(e).strip().splitlines()[0] if str(e).strip() else e})"
    if rows != seg.rows:
        return f"it holds {rows:,} rows, the catalog recorded {seg.rows:,}"
    if checksum and seg.file_sha256 is not None and file_sha256(path) != seg.file_sha256:
        return "its sha256 checksum differs from the one recorded when it was written (same size and rows)"
    return None


def damaged_error(root: Path, path: str, source: str, problem: str, others: int = 0) -> CkdError:
    """The one sentence for a damaged segment: which file, what differs, and how to rewrite it."""
    if source.startswith("compacted:"):  # made by `ckd compact` from several ingests: no one input rebuilds it
        fix = "it was merged by `ckd compact` from several ingests, so no single input rewrites it"
    elif Path(source).is_file():
        fix = f"re-ingest its source file with `ckd ingest {source} --store {root}`, which rewrites it"
    else:
        fix = (f"re-ingest its source {source!r} (the same `ckd ingest FILE` or `ckd data {source}` "
               f"command that made it, with --store {root}), which rewrites it")
    more = f" ({others} more damaged segment{'s' if others > 1 else ''}: `ckd status --verify` lists them)" if others else ""
    return CkdError(f"Segment {path} of the stream store {root} is damaged: {problem}; nothing was read from "
                    f"it{more}; {fix}, or restore the store from a backup.")


@dataclass
class SegmentReads:
    """How many segment files (and the rows they hold) were checked to be read, in this process: what a
    cut or a block read costs in files (tests and bench/live_cut.py read it; ``reset`` between steps)."""

    files: int = 0
    rows: int = 0

    def reset(self) -> None:
        self.files = self.rows = 0


READS = SegmentReads()


def check_segments(root: Path, segments: Iterable[SegmentRecord], checksum: bool = False) -> list[str]:
    """Absolute paths of the segments, after checking each; the first damaged one raises ``damaged_error``."""
    segments = list(segments)
    problems = [(seg, p) for seg in segments if (p := segment_problem(root, seg, checksum)) is not None]
    if problems:
        seg, problem = problems[0]
        raise damaged_error(root, seg.path, seg.source, problem, len(problems) - 1)
    READS.files += len(segments)
    READS.rows += sum(seg.rows for seg in segments)
    return [str(root / seg.path) for seg in segments]


def write_segment(directory: Path, final: Path, batches: Iterable[pa.RecordBatch], first_offset: int) -> WrittenSegment:
    """Write the rows (``user``, ``item``, ``ts``, ``weight`` batches, in offset order) as a segment at
    ``final``: a hidden tmp file in ``directory``, fixed row groups, fsync, then rename. → size, checksum, …

    A full disk or a folder that cannot be written ends in one CkdError naming the file; the tmp file is
    removed and ``final`` never holds a partial file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{uuid.uuid4().hex}.parquet"
    rows, ts_min, ts_max = 0, None, None
    try:
        with pq.ParquetWriter(tmp, SEGMENT_SCHEMA, compression="zstd") as writer:
            for chunk in _fixed_chunks(batches, ROW_GROUP_ROWS):
                ts = chunk.column("ts").to_numpy()
                ts_min = int(ts.min()) if ts_min is None else min(ts_min, int(ts.min()))
                ts_max = int(ts.max()) if ts_max is None else max(ts_max, int(ts.max()))
                offsets = pa.array(np.arange(first_offset + rows, first_offset + rows + chunk.num_rows, dtype=np.int64))
                writer.write_table(pa.Table.from_arrays(
                    [offsets, *(chunk.column(c).cast(SEGMENT_SCHEMA.field(c).type) for c in ("user", "item", "ts", "weight"))],
                    schema=SEGMENT_SCHEMA), row_group_size=ROW_GROUP_ROWS)
                rows += chunk.num_rows
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        written = WrittenSegment(rows, tmp.stat().st_size, file_sha256(tmp), ts_min or 0, ts_max or 0)
        os.replace(tmp, final)
    except OSError as e:
        _unlink_quietly(tmp)
        raise CkdError(f"Cannot write the segment {final}: {e.strerror or e}; free space or make the folder "
                       f"writable, then ingest again (nothing was added to the store).") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory)
    return written


def _fixed_chunks(batches: Iterable[pa.RecordBatch], size: int):
    """Re-chunk a stream of record batches into tables of exactly ``size`` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - held, batch.num_rows)
            pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == size:
                yield pa.Table.from_batches(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
