"""What a live plan keeps between cuts, so that cutting a new block costs what the new data costs.

Without it a cut would read every segment (to find the rows in no block yet and the users and items the
plan already knows), so the work of each new block would grow with the whole store. Per live plan the
catalog keeps, written in the same transaction that appends the blocks (``catalog.save_live_state``):

- ``live_state``: the blocks and rows it describes (it is used only while they equal the plan's; else — a
  store made before it was kept, or a plan an older version advanced — it is derived again from the plan's
  rows, once), ``offset_end``: the end of the offsets the last cut saw, and per kind the prefix of dense
  ids all known to the plan (ids are given in order of first appearance, so the known ids are nearly a prefix);
- ``live_ids``: the known ids above that prefix (ids after one whose rows are still pending: few);
- ``live_segments``: per segment, as it was counted (id, first offset, rows), its rows in no block yet.

A cut reads only the segments that may hold unplanned rows: those counted with some, those never counted
(a new ingest — at or past ``offset_end``, none of its rows planned — or a compacted segment, whose planned
rows ``plan_rows`` names by offset), never a counted full one. The rows it reads are checked against the
catalog's aggregates (stored rows − rows in the plan); a mismatch derives the state again before cutting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from continual_kd.stream import catalog
from continual_kd.stream.segments import check_segments


@dataclass(frozen=True, eq=False)
class KnownIds:
    """A set of dense ids as every id below ``prefix`` plus the sorted ids ``extra`` (all ≥ prefix)."""

    prefix: int = 0
    extra: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @staticmethod
    def of(ids: np.ndarray) -> "KnownIds":
        return KnownIds().add(ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return (ids < self.prefix) | np.isin(ids, self.extra)

    def add(self, ids: np.ndarray) -> "KnownIds":
        ids = np.asarray(ids, np.int64)
        above = np.union1d(self.extra, ids[ids >= self.prefix])
        gaps = np.flatnonzero(above != self.prefix + np.arange(len(above)))
        run = int(gaps[0]) if len(gaps) else len(above)  # ids prefix, prefix+1, … now all known
        return KnownIds(self.prefix + run, above[run:])


@dataclass(frozen=True)
class LiveState:
    blocks: int
    total_rows: int
    offset_end: int  # every segment below this offset was counted by the cut that wrote the state
    users: KnownIds
    items: KnownIds


@dataclass(frozen=True, eq=False)
class Pending:
    """The rows of a live plan in no block yet, sorted by (ts, offset), and the segments they were read from."""

    offsets: np.ndarray
    ts: np.ndarray
    users: np.ndarray
    items: np.ndarray
    segments: pa.Table  # segment_id, first_offset, rows of every segment read (by first_offset)
    offset_end: int  # the end of the offsets of every stored segment when they were read

    def counts_after(self, taken: int) -> pa.Table:
        """(segment_id, first_offset, rows, unplanned) of the segments read, once the first ``taken`` pending
        rows are in blocks (a cut takes a prefix of them)."""
        first = self.segments.column("first_offset").to_numpy()
        where = np.searchsorted(first, self.offsets[taken:], side="right") - 1
        left = np.bincount(where, minlength=len(first)).astype(np.int64)
        return self.segments.append_column("unplanned", pa.array(left, pa.int64()))


def load(con: duckdb.DuckDBPyConnection, plan_id: str, blocks: int, total_rows: int) -> LiveState | None:
    """The kept state of the plan, or None when it is missing or describes other blocks than the plan's."""
    row = catalog.live_state_row(con, plan_id)
    if row is None or (row["blocks"], row["total_rows"]) != (blocks, total_rows):
        return None
    extra = catalog.live_extra_ids(con, plan_id)
    return LiveState(blocks, total_rows, row["offset_end"], KnownIds(row["user_prefix"], extra["user"]),
                     KnownIds(row["item_prefix"], extra["item"]))


def derive(con: duckdb.DuckDBPyConnection, root: Path, plan_id: str, blocks: int,
           total_rows: int) -> tuple[LiveState, pa.Table]:
    """The state from the plan's rows (reads every segment holding them: once, for a store without it)
    → (state, counts of every segment: segment_id, first_offset, rows, unplanned)."""
    planned = np.sort(catalog.plan_offsets(con, plan_id))
    placed = catalog.placed_segments(con)
    first = np.array([p.first_offset for p in placed], np.int64)
    rows = np.array([p.segment.rows for p in placed], np.int64)
    held = np.bincount(np.searchsorted(first, planned, side="right") - 1, minlength=len(first)) \
        if len(planned) else np.zeros(len(first), np.int64)
    counts = _counts(placed, rows - held)
    known = {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64)}
    holding = [p.segment for p, h in zip(placed, held) if h]
    if holding:
        paths = check_segments(root, holding)
        for kind in known:
            data = con.sql(f'SELECT DISTINCT s."{kind}" FROM plan_rows p JOIN read_parquet(?) s '
                           f'ON s."offset" = p."offset" WHERE p.plan_id = ?', params=[paths, plan_id]).fetchnumpy()
            known[kind] = np.asarray(data[kind], np.int64)
    end = int((first + rows).max()) if len(first) else 0
    return LiveState(blocks, total_rows, end, KnownIds.of(known["user"]), KnownIds.of(known["item"])), counts


def save(con: duckdb.DuckDBPyConnection, plan_id: str, state: LiveState, counts: pa.Table) -> None:
    """Write the state and the segments' counts (inside the caller's transaction; ``counts`` replace the rows
    of the same segments, and rows of segments no longer stored as counted are dropped)."""
    catalog.write_live_state(con, plan_id, {
        "blocks": state.blocks, "total_rows": state.total_rows, "offset_end": state.offset_end,
        "user_prefix": state.users.prefix, "item_prefix": state.items.prefix,
    }, {"user": state.users.extra, "item": state.items.extra}, counts)


def _counts(placed: list[catalog.PlacedSegment], unplanned: np.ndarray) -> pa.Table:
    return pa.table({"segment_id": pa.array([p.segment.segment_id for p in placed], pa.int32()),
                     "first_offset": pa.array([p.first_offset for p in placed], pa.int64()),
                     "rows": pa.array([p.segment.rows for p in placed], pa.int64()),
                     "unplanned": pa.array(np.asarray(unplanned, np.int64), pa.int64())})


def read_pending(con: duckdb.DuckDBPyConnection, root: Path, plan_id: str, state: LiveState) -> Pending:
    """The plan's rows in no block yet, read from the segments that may hold some (see the module doc)."""
    placed = catalog.placed_segments(con, live_plan=plan_id)  # open ones only: unplanned rows or never counted
    end = catalog.offset_end(con)
    empty = np.zeros(0, np.int64)
    segments = _counts(placed, np.zeros(len(placed))).drop_columns(["unplanned"])
    if not placed:
        return Pending(empty, empty, empty, empty, segments, end)
    data = con.sql('SELECT "offset", ts, "user", item FROM read_parquet(?) ORDER BY ts, "offset"',
                   params=[check_segments(root, [p.segment for p in placed])]).fetchnumpy()
    offsets = np.asarray(data["offset"], np.int64)
    # where some rows may be in blocks already: counted segments with fewer unplanned rows than rows, and
    # segments never counted below offset_end (made by `ckd compact` from counted ones); plan_rows names them
    ranges: list[list[int]] = []
    for p in placed:
        if (p.unplanned is None and p.first_offset < state.offset_end) or \
                (p.unplanned is not None and p.unplanned < p.segment.rows):
            if ranges and ranges[-1][1] == p.first_offset:  # contiguous: one range query
                ranges[-1][1] += p.segment.rows
            else:
                ranges.append([p.first_offset, p.first_offset + p.segment.rows])
    planned = [catalog.plan_offsets(con, plan_id, lo, hi) for lo, hi in ranges]
    keep = ~np.isin(offsets, np.concatenate(planned)) if planned else np.ones(len(offsets), bool)
    return Pending(offsets[keep], np.asarray(data["ts"], np.int64)[keep], np.asarray(data["user"], np.int64)[keep],
                   np.asarray(data["item"], np.int64)[keep], segments, end)
