"""Which stored segments an ingest must read to find copies of its rows: the hours each segment covers.

A new row is a duplicate of a stored row only if user, item, ts and weight are all equal, so the stored row
has the new row's hour (``ts // 3600``). The catalog keeps per segment the hours of its rows
(``segment_hours``: segment_id, first_offset, rows, hour), so an ingest reads only the segments that share an
hour with its valid rows — for a stream that arrives in time order, the last few — and the check itself is
the exact row-by-row join it always was (``store._classify``) over those segments: same outcome, a cost that
follows the new rows, not the history.

The rows are written in the same transaction that records a segment (ingest) or merges segments (``ckd
compact``: the merged file's hours, computed as it is written). A segment's hours count only while they were
recorded for it as it is now (same id, first offset and rows); a segment without them — a store made before
they were kept, or one an older version compacted — gets them once, derived from its file, under the write
lock before the check (``ensure``).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from continual_kd.stream import catalog
from continual_kd.stream.segments import SegmentRecord, check_segments

HOUR_S = 3600

# segments whose recorded hours describe them as they are now
_MATCHED = ("FROM segments s JOIN segment_hours h ON h.segment_id = s.segment_id "
            "AND h.first_offset = s.first_offset AND h.rows = s.rows")


def hours_of(ts: np.ndarray) -> np.ndarray:
    """The distinct hours of epoch-second timestamps (int64, sorted)."""
    return np.unique(np.asarray(ts, np.int64) // HOUR_S)


def missing(con: duckdb.DuckDBPyConnection, below: int | None = None) -> list[catalog.PlacedSegment]:
    """Segments (with id < ``below`` if given) that have no hours recorded for them as they are now."""
    ids = {int(i) for (i,) in con.sql(
        "SELECT s.segment_id FROM segments s WHERE NOT EXISTS (SELECT 1 FROM segment_hours h WHERE "
        "h.segment_id = s.segment_id AND h.first_offset = s.first_offset AND h.rows = s.rows)"
        + (" AND s.segment_id < ?" if below is not None else ""), params=[below] if below is not None else []
    ).fetchall()}
    return [p for p in catalog.placed_segments(con) if p.segment.segment_id in ids] if ids else []


def ensure(con: duckdb.DuckDBPyConnection, root: Path, below: int | None = None) -> int:
    """Derive and record the hours of every segment (id < ``below``) that lacks them, reading only those files
    (once: an older store, or a segment an older version compacted); drop rows of segments no longer stored as
    they were recorded. Its own transaction, under the caller's write lock. → segments derived."""
    lacking = missing(con, below)
    if not lacking:
        return 0
    paths = check_segments(root, [p.segment for p in lacking])  # a damaged one is named and refused, as before
    found = con.sql(f"SELECT DISTINCT filename, ts // {HOUR_S} AS hour FROM read_parquet(?, filename = true)",
                    params=[paths]).fetchnumpy()
    files, hours = np.asarray(found["filename"]).astype(str), np.asarray(found["hour"], np.int64)
    parts = [_rows(p.segment.segment_id, p.first_offset, p.segment.rows, np.sort(hours[files == path]))
             for p, path in zip(lacking, paths)]  # a loop over the segments lacking hours (once per store)
    if any(part.num_rows == 0 for part in parts):
        raise RuntimeError(f"segment hours of {root}: a segment file gave no timestamps")
    with catalog.transaction(con):
        con.execute("DELETE FROM segment_hours h WHERE NOT EXISTS (SELECT 1 FROM segments s WHERE "
                    "s.segment_id = h.segment_id AND s.first_offset = h.first_offset AND s.rows = h.rows)")
        insert(con, pa.concat_tables(parts))
    return len(lacking)


def candidates(con: duckdb.DuckDBPyConnection, hours: np.ndarray, below: int | None = None) -> list[SegmentRecord]:
    """The segments (id < ``below`` if given) with rows in any of ``hours``, in id order: the only ones that can
    hold a copy of a row with such a timestamp (every segment must have its hours: call ``ensure`` first)."""
    if not len(hours):
        return []
    wanted = pa.table({"hour": pa.array(np.asarray(hours, np.int64), pa.int64())})
    with catalog.registered(con, "_ckd_hours", wanted):
        ids = {int(i) for (i,) in con.sql(
            f"SELECT DISTINCT s.segment_id {_MATCHED} WHERE h.hour IN (SELECT hour FROM _ckd_hours)"
            + (" AND s.segment_id < ?" if below is not None else ""), params=[below] if below is not None else []
        ).fetchall()}
    return [s for s in catalog.segment_records(con, below) if s.segment_id in ids]


def record_from_parquet(con: duckdb.DuckDBPyConnection, segment_id: int, first_offset: int, rows: int,
                        query: str, params: list) -> None:
    """Record the hours of a new segment from ``query`` (selecting its rows' ``ts``; inside the caller's
    transaction, the one that records the segment)."""
    con.execute(f"INSERT INTO segment_hours SELECT DISTINCT ?, ?, ?, ts // {HOUR_S} FROM ({query})",
                [segment_id, first_offset, rows, *params])


def replace(con: duckdb.DuckDBPyConnection, old_ids: list[int], segment_id: int, first_offset: int, rows: int,
            hours: np.ndarray) -> None:
    """The hours of a merged segment in place of its members' (inside the compaction's transaction)."""
    con.execute("DELETE FROM segment_hours WHERE segment_id IN (SELECT unnest(?::INTEGER[]))", [list(old_ids)])
    insert(con, _rows(segment_id, first_offset, rows, hours))


def insert(con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    if table.num_rows:
        with catalog.registered(con, "_ckd_segment_hours", table):
            con.execute("INSERT INTO segment_hours SELECT segment_id, first_offset, rows, hour FROM _ckd_segment_hours")


def _rows(segment_id: int, first_offset: int, rows: int, hours: np.ndarray) -> pa.Table:
    n = len(hours)
    return pa.table({"segment_id": pa.array(np.full(n, segment_id, np.int32)),
                     "first_offset": pa.array(np.full(n, first_offset, np.int64)),
                     "rows": pa.array(np.full(n, rows, np.int64)), "hour": pa.array(np.asarray(hours, np.int64))})
