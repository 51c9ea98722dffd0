"""The DuckDB catalog: schema, short-lived connections, and the inserts of one ingest / plan.

Connections are opened per operation and closed at once, so another process can take the
file between calls. Every SELECT is materialised (``fetchall`` / ``fetchnumpy`` / arrow) before
the connection closes. Values always travel as ``?`` parameters or registered Arrow tables.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa

from continual_kd.errors import CkdError
from continual_kd.stream.segments import SegmentRecord

CATALOG_FILE = "catalog.duckdb"
SCHEMA_VERSION = "1"
ID_TABLES = {"user": "users", "item": "items"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS users (dense_id INTEGER PRIMARY KEY, external_id VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS items (dense_id INTEGER PRIMARY KEY, external_id VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS segments (
    segment_id INTEGER PRIMARY KEY, path VARCHAR NOT NULL, content_hash VARCHAR NOT NULL,
    source VARCHAR NOT NULL, rows BIGINT NOT NULL, first_offset BIGINT NOT NULL,
    ts_min BIGINT NOT NULL, ts_max BIGINT NOT NULL, created_at TIMESTAMP NOT NULL,
    file_bytes BIGINT, file_sha256 VARCHAR);
ALTER TABLE segments ADD COLUMN IF NOT EXISTS file_bytes BIGINT;
ALTER TABLE segments ADD COLUMN IF NOT EXISTS file_sha256 VARCHAR;
CREATE TABLE IF NOT EXISTS ingests (
    ingest_id INTEGER PRIMARY KEY, content_hash VARCHAR NOT NULL UNIQUE, source VARCHAR NOT NULL,
    rows_read BIGINT NOT NULL, rows_taken BIGINT NOT NULL, rows_quarantined BIGINT NOT NULL,
    new_users BIGINT NOT NULL, new_items BIGINT NOT NULL, segment_id INTEGER,
    created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    ingest_id INTEGER NOT NULL, source VARCHAR NOT NULL, row_number BIGINT NOT NULL,
    reason VARCHAR NOT NULL, raw VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS plans (
    plan_id VARCHAR PRIMARY KEY, base_fraction DOUBLE NOT NULL, incremental INTEGER NOT NULL,
    split_train DOUBLE NOT NULL, split_valid DOUBLE NOT NULL, split_test DOUBLE NOT NULL,
    seed BIGINT NOT NULL, total_rows BIGINT NOT NULL, segment_hashes VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS plan_blocks (
    plan_id VARCHAR NOT NULL, block INTEGER NOT NULL, rows BIGINT NOT NULL,
    ts_start BIGINT NOT NULL, ts_end BIGINT NOT NULL, num_users BIGINT NOT NULL,
    num_items BIGINT NOT NULL, new_users BIGINT NOT NULL, new_items BIGINT NOT NULL,
    PRIMARY KEY (plan_id, block));
ALTER TABLE plans ADD COLUMN IF NOT EXISTS policy VARCHAR;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS split_holdout DOUBLE;
ALTER TABLE plan_blocks ADD COLUMN IF NOT EXISTS late BIGINT;
ALTER TABLE plan_blocks ADD COLUMN IF NOT EXISTS bound_start BIGINT;
ALTER TABLE plan_blocks ADD COLUMN IF NOT EXISTS bound_end BIGINT;
CREATE TABLE IF NOT EXISTS plan_rows (
    plan_id VARCHAR NOT NULL, "offset" BIGINT NOT NULL, block INTEGER NOT NULL, split TINYINT NOT NULL);
CREATE TABLE IF NOT EXISTS commits (
    commit_id INTEGER PRIMARY KEY, job VARCHAR NOT NULL, lineage VARCHAR NOT NULL,
    plan_id VARCHAR NOT NULL, block INTEGER NOT NULL, rows_covered BIGINT NOT NULL,
    snapshot VARCHAR NOT NULL, snapshot_digest VARCHAR NOT NULL, committed_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP, revoked_reason VARCHAR);
CREATE TABLE IF NOT EXISTS block_results (
    commit_id INTEGER NOT NULL, job VARCHAR NOT NULL, lineage VARCHAR NOT NULL, block INTEGER NOT NULL,
    model VARCHAR NOT NULL, metric VARCHAR NOT NULL, value DOUBLE);
CREATE TABLE IF NOT EXISTS block_digests (
    plan_id VARCHAR NOT NULL, block INTEGER NOT NULL, rows BIGINT NOT NULL, digest VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS kg_relations (relation_id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS kg_entities (
    entity_id INTEGER PRIMARY KEY, external_id VARCHAR NOT NULL UNIQUE, name VARCHAR);
CREATE TABLE IF NOT EXISTS kg_triples (
    head INTEGER NOT NULL, relation_id INTEGER NOT NULL, tail INTEGER NOT NULL, ingest_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS item_entities (item VARCHAR PRIMARY KEY, entity_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS item_attributes (item VARCHAR PRIMARY KEY, title VARCHAR, "year" INTEGER, genres VARCHAR);
CREATE TABLE IF NOT EXISTS kg_ingests (
    ingest_id INTEGER PRIMARY KEY, content_hash VARCHAR NOT NULL UNIQUE, source VARCHAR NOT NULL,
    rows_read BIGINT NOT NULL, rows_taken BIGINT NOT NULL, rows_quarantined BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS kg_quarantine (
    ingest_id INTEGER NOT NULL, source VARCHAR NOT NULL, row_number BIGINT NOT NULL,
    reason VARCHAR NOT NULL, raw VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS live_state (
    plan_id VARCHAR NOT NULL, blocks INTEGER NOT NULL, total_rows BIGINT NOT NULL, offset_end BIGINT NOT NULL,
    user_prefix BIGINT NOT NULL, item_prefix BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS live_ids (plan_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, dense_id BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS live_segments (
    plan_id VARCHAR NOT NULL, segment_id INTEGER NOT NULL, first_offset BIGINT NOT NULL, rows BIGINT NOT NULL,
    unplanned BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS segment_hours (
    segment_id INTEGER NOT NULL, first_offset BIGINT NOT NULL, rows BIGINT NOT NULL, hour BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS labelled_ingests (
    ingest_id INTEGER PRIMARY KEY, content_hash VARCHAR NOT NULL UNIQUE, source VARCHAR NOT NULL,
    rows_read BIGINT NOT NULL, rows_taken BIGINT NOT NULL, created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS labelled (
    ingest_id INTEGER NOT NULL, "user" VARCHAR NOT NULL, item VARCHAR NOT NULL, label DOUBLE NOT NULL,
    ts BIGINT NOT NULL);
CREATE VIEW IF NOT EXISTS results AS
    SELECT r.job, r.lineage, r.block, r.model, r.metric, r.value FROM block_results r
    JOIN commits c ON c.commit_id = r.commit_id WHERE c.revoked_at IS NULL;
"""
# kg_*: item knowledge (stream/kg.py): triples over stable entity / relation ids, items linked to entities by
# their external id (so knowledge may arrive before the item's first interaction), item titles / years / genres.
# plans.policy: NULL for the research protocol (a fixed plan), else a live policy (stream/live.py) whose
# blocks are appended as data arrive; plan_blocks.late: rows that arrived after their window was cut,
# bound_start/bound_end: the block's time bounds (a window, or the base block's end).
# block_results: every committed block's numbers per model (a NaN / undefined metric is NULL), kept
# with revoked commits for the record; the view `results` shows those of active commits only. No primary key:
# its index was most of the catalog's growth per block (~13 KB for ~120 rows); rows come once per commit id.
# block_digests: an order-independent digest of each committed block's rows (stream/compact.py), recorded
# at commit (or by `ckd compact` for older commits); compaction and `ckd status --verify` check it.
# live_state / live_ids / live_segments: what a live plan keeps between cuts so a cut reads only the segments
# with rows in no block yet (stream/live_state.py); no primary keys: rows are replaced by DELETE + INSERT.
# segment_hours: per segment (as recorded: id, first offset, rows) the hours (ts // 3600) of its rows, so an
# ingest's duplicate check reads only the segments sharing an hour with its rows (stream/segment_hours.py).
# block columns are INTEGER (SMALLINT before: at most 32,767 blocks, ~3.7 years of hourly windows); older
# catalogs are widened on open (``widen_block_columns``).
# Fixed order, used by the fingerprint.
TABLES = ("meta", "users", "items", "segments", "ingests", "quarantine", "plans", "plan_blocks", "plan_rows",
          "commits", "block_results", "kg_relations", "kg_entities", "kg_triples", "item_entities", "item_attributes",
          "kg_ingests", "kg_quarantine", "block_digests", "live_state", "live_ids", "live_segments",
          "segment_hours", "labelled_ingests", "labelled")
# tables with a block column (SMALLINT in catalogs made before it was widened)
BLOCK_TABLES = ("plan_blocks", "plan_rows", "commits", "block_results", "block_digests")

LOCK_WAIT_S = 5.0


class StoreBusyError(CkdError):
    """Another process held the catalog's lock for longer than the wait: try again later (not a data problem)."""


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@contextmanager
def connect(root: Path, write: bool, lock_wait_s: float = LOCK_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """One connection for one operation; waits up to ``lock_wait_s`` for another process's lock."""
    path = root / CATALOG_FILE
    deadline = time.monotonic() + lock_wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=not write)
            break
        except duckdb.Error as e:
            if _damaged(e):
                raise _damaged_catalog(root, path, e) from None
            if not isinstance(e, duckdb.IOException):
                raise
            if "lock" not in str(e).lower():
                reason = str(e).splitlines()[0]
                raise CkdError(f"Cannot open the catalog of the stream store {root}: {reason}.") from None
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    f"The stream store {root} is in use by another process (catalog.duckdb is locked); "
                    f"wait for it to finish or stop it, then retry."
                ) from None
            time.sleep(0.1)
    try:
        yield con
    except duckdb.OutOfMemoryException as e:
        raise CkdError(f"The stream store {root}: DuckDB ran out of the memory it may use ({_first_line(e)}); raise "
                       f"CKD_INGEST_MEMORY (an ingest's budget, default 128MB) or free memory or disk space for its "
                       f"spill files, then run the command again (a write that failed changed nothing).") from None
    except duckdb.Error as e:
        if _damaged(e):  # a checksum mismatch, a file shorter than its blocks: the catalog itself, not the disk
            raise _damaged_catalog(root, path, e) from None
        if not isinstance(e, duckdb.IOException):
            raise
        # a full disk, a read-only folder
        raise CkdError(f"Reading or writing the stream store {root} failed ({_first_line(e)}); free space or make "
                       f"it writable, then run the command again (a write that failed changed nothing).") from None
    finally:
        con.close()


def _damaged(e: duckdb.Error) -> bool:
    """Whether DuckDB's error says the database file is damaged (a checksum that does not match, a block past the
    file's end) rather than that the disk or the folder refused."""
    text = str(e).lower()
    return "corrupt" in text or "checksum" in text or "could not read enough bytes" in text


def _damaged_catalog(root: Path, path: Path, e: duckdb.Error) -> CkdError:
    return CkdError(f"The catalog of the stream store {root} is damaged ({_first_line(e)}); restore {path} from a "
                    f"backup, or ingest the source files again into a new --store (nothing was written).")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("BEGIN")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", [SCHEMA_VERSION])
        widen_block_columns(con)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """ROLLBACK, quietly when the transaction was never opened or is already gone."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN … COMMIT, rolled back on any error (the error is raised again)."""
    con.execute("BEGIN")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[str]:
    con.register(name, table)
    try:
        yield name
    finally:
        con.unregister(name)


def scalar(con: duckdb.DuckDBPyConnection, query: str, params: list | None = None):
    return con.sql(query, params=params or []).fetchall()[0][0]


# --- reads ---------------------------------------------------------------------------------

def id_table(kind: str) -> str:
    if kind not in ID_TABLES:
        raise ValueError(f"kind must be 'user' or 'item', got {kind!r}")
    return ID_TABLES[kind]


def count_ids(con: duckdb.DuckDBPyConnection, kind: str) -> int:
    return int(scalar(con, f"SELECT count(*) FROM {id_table(kind)}"))


def lookup_dense(con: duckdb.DuckDBPyConnection, kind: str, values: pa.Array) -> np.ndarray:
    """Dense id of each external id in ``values`` (-1 where unknown)."""
    dense = np.full(len(values), -1, dtype=np.int64)
    if len(values) == 0:
        return dense
    query = pa.table({"pos": pa.array(np.arange(len(values)), pa.int64()), "ext": values})
    with registered(con, "_ckd_lookup", query):
        found = con.sql(
            f"SELECT q.pos, t.dense_id FROM _ckd_lookup q JOIN {id_table(kind)} t ON t.external_id = q.ext"
        ).fetchnumpy()
    dense[found["pos"]] = found["dense_id"]
    return dense


def segment_records(con: duckdb.DuckDBPyConnection, below: int | None = None) -> list[SegmentRecord]:
    """What the catalog recorded for each segment (those with id < ``below`` if given), in id order."""
    query = "SELECT segment_id, path, source, rows, file_bytes, file_sha256 FROM segments"
    rows = con.sql(query + (" WHERE segment_id < ?" if below is not None else "") + " ORDER BY segment_id",
                   params=[below] if below is not None else []).fetchall()
    return [SegmentRecord(int(i), p, src, int(n), None if b is None else int(b), h) for i, p, src, n, b, h in rows]


@dataclass(frozen=True)
class PlacedSegment:
    """A segment with its first offset and, for a live plan, its rows in no block yet as last counted (None:
    never counted as it is now)."""

    segment: SegmentRecord
    first_offset: int
    unplanned: int | None = None


def placed_segments(con: duckdb.DuckDBPyConnection, live_plan: str | None = None) -> list[PlacedSegment]:
    """Every segment in offset order; with ``live_plan`` only those that may hold rows in none of its blocks:
    counted with unplanned rows, or never counted with their present id, first offset and rows."""
    query = ("SELECT s.segment_id, s.path, s.source, s.rows, s.file_bytes, s.file_sha256, s.first_offset, "
             "l.unplanned FROM segments s ")
    params: list = []
    if live_plan is not None:
        query += ("LEFT JOIN live_segments l ON l.plan_id = ? AND l.segment_id = s.segment_id "
                  "AND l.first_offset = s.first_offset AND l.rows = s.rows WHERE coalesce(l.unplanned, 1) > 0 ")
        params.append(live_plan)
    else:
        query = query.replace("l.unplanned", "NULL")
    rows = con.sql(query + "ORDER BY s.first_offset", params=params).fetchall()
    return [PlacedSegment(SegmentRecord(int(i), p, src, int(n), None if b is None else int(b), h), int(first),
                          None if left is None else int(left)) for i, p, src, n, b, h, first, left in rows]


def segments_holding(con: duckdb.DuckDBPyConnection, offsets: np.ndarray) -> list[SegmentRecord]:
    """The segments whose offsets include any of ``offsets``, in offset order (a block's, to read only them)."""
    placed = placed_segments(con)
    if not placed or not len(offsets):
        return []
    first = np.array([p.first_offset for p in placed], np.int64)
    held = np.unique(np.searchsorted(first, np.asarray(offsets, np.int64), side="right") - 1)
    return [placed[int(i)].segment for i in held if i >= 0]


def offset_end(con: duckdb.DuckDBPyConnection) -> int:
    """The offset the next segment starts at (0 for an empty store)."""
    return int(scalar(con, "SELECT coalesce(max(first_offset + rows), 0) FROM segments"))


def plan_offsets(con: duckdb.DuckDBPyConnection, plan_id: str, lo: int | None = None, hi: int | None = None,
                 blocks: tuple[int, int] | None = None) -> np.ndarray:
    """Offsets of the plan's rows (those in [lo, hi), or in blocks first..last): plan_rows is appended block by
    block, so DuckDB's zone maps skip the row groups outside the range (a short read, not the whole table)."""
    query, params = 'SELECT "offset" FROM plan_rows WHERE plan_id = ?', [plan_id]
    if lo is not None:
        query, params = query + ' AND "offset" >= ? AND "offset" < ?', [*params, int(lo), int(hi)]
    if blocks is not None:
        query, params = query + " AND block BETWEEN ? AND ?", [*params, int(blocks[0]), int(blocks[1])]
    return np.asarray(con.sql(query, params=params).fetchnumpy()["offset"], np.int64)


def live_state_row(con: duckdb.DuckDBPyConnection, plan_id: str) -> dict | None:
    rows = con.sql("SELECT blocks, total_rows, offset_end, user_prefix, item_prefix FROM live_state WHERE plan_id = ?",
                   params=[plan_id]).fetchall()
    if not rows:
        return None
    return dict(zip(("blocks", "total_rows", "offset_end", "user_prefix", "item_prefix"), (int(v) for v in rows[0])))


def live_extra_ids(con: duckdb.DuckDBPyConnection, plan_id: str) -> dict[str, np.ndarray]:
    """The known ids of a live plan above its prefixes, per kind, sorted."""
    data = con.sql("SELECT kind, dense_id FROM live_ids WHERE plan_id = ? ORDER BY kind, dense_id",
                   params=[plan_id]).fetchnumpy()
    kind, dense = np.asarray(data["kind"]).astype(str), np.asarray(data["dense_id"], np.int64)
    return {k: dense[kind == k] for k in ID_TABLES}


def write_live_state(con: duckdb.DuckDBPyConnection, plan_id: str, state: dict, extra: dict[str, np.ndarray],
                     counts: pa.Table) -> None:
    """Replace a live plan's kept state (inside the caller's transaction): the state row, the ids above its
    prefixes, and the counts of the segments in ``counts``; counts of segments no longer stored as counted go."""
    con.execute("DELETE FROM live_state WHERE plan_id = ?", [plan_id])
    con.execute("INSERT INTO live_state VALUES (?, ?, ?, ?, ?, ?)",
                [plan_id, state["blocks"], state["total_rows"], state["offset_end"], state["user_prefix"],
                 state["item_prefix"]])
    con.execute("DELETE FROM live_ids WHERE plan_id = ?", [plan_id])
    ids = pa.table({"kind": pa.array([k for k in ID_TABLES for _ in range(len(extra[k]))], pa.string()),
                    "dense_id": pa.array(np.concatenate([np.asarray(extra[k], np.int64) for k in ID_TABLES]), pa.int64())})
    if ids.num_rows:
        with registered(con, "_ckd_live_ids", ids):
            con.execute("INSERT INTO live_ids SELECT ?, kind, dense_id FROM _ckd_live_ids", [plan_id])
    with registered(con, "_ckd_live_counts", counts):
        con.execute("DELETE FROM live_segments WHERE plan_id = ? AND segment_id IN "
                    "(SELECT segment_id FROM _ckd_live_counts)", [plan_id])
        con.execute("INSERT INTO live_segments SELECT ?, segment_id, first_offset, rows, unplanned "
                    "FROM _ckd_live_counts", [plan_id])
    con.execute("DELETE FROM live_segments l WHERE plan_id = ? AND NOT EXISTS (SELECT 1 FROM segments s WHERE "
                "s.segment_id = l.segment_id AND s.first_offset = l.first_offset AND s.rows = l.rows)", [plan_id])


PLAN_COLUMNS = (("plan_blocks", "bound_end"), ("plans", "split_holdout"))  # the newest of the ALTERs above


def has_plan_columns(con: duckdb.DuckDBPyConnection) -> bool:
    """False for a catalog made before live block policies (plans.policy, plan_blocks.late, …) or before held-out
    shares (plans.split_holdout): the ALTERs of the schema add them."""
    return all(scalar(con, "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
                      [table, column]) for table, column in PLAN_COLUMNS)


def narrow_block_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The tables whose block column is still SMALLINT (a catalog made before it was widened)."""
    return [t for (t,) in con.sql(
        "SELECT table_name FROM information_schema.columns WHERE column_name = 'block' AND data_type = 'SMALLINT' "
        "AND table_name IN (SELECT unnest(?::VARCHAR[])) ORDER BY table_name", params=[list(BLOCK_TABLES)]).fetchall()]


def widen_block_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Make every block column INTEGER (inside the caller's transaction). plan_blocks' block is part of its
    primary key, which DuckDB cannot retype: that table is rebuilt; the view over block_results is recreated.
    → the tables widened."""
    narrow = narrow_block_tables(con)
    for table in narrow:
        if table == "plan_blocks":
            con.execute("CREATE TABLE plan_blocks_wide (plan_id VARCHAR NOT NULL, block INTEGER NOT NULL, "
                        "rows BIGINT NOT NULL, ts_start BIGINT NOT NULL, ts_end BIGINT NOT NULL, num_users BIGINT NOT "
                        "NULL, num_items BIGINT NOT NULL, new_users BIGINT NOT NULL, new_items BIGINT NOT NULL, late "
                        "BIGINT, bound_start BIGINT, bound_end BIGINT, PRIMARY KEY (plan_id, block))")
            con.execute("INSERT INTO plan_blocks_wide SELECT plan_id, block, rows, ts_start, ts_end, num_users, "
                        "num_items, new_users, new_items, late, bound_start, bound_end FROM plan_blocks ORDER BY ALL")
            con.execute("DROP TABLE plan_blocks")
            con.execute("ALTER TABLE plan_blocks_wide RENAME TO plan_blocks")
        else:
            con.execute(f"ALTER TABLE {table} ALTER COLUMN block TYPE INTEGER")
    if "block_results" in narrow:  # the view binds the old type: recreate it
        con.execute("DROP VIEW IF EXISTS results")
        con.execute("CREATE VIEW results AS SELECT r.job, r.lineage, r.block, r.model, r.metric, r.value FROM "
                    "block_results r JOIN commits c ON c.commit_id = r.commit_id WHERE c.revoked_at IS NULL")
    return narrow


def has_segment_checksums(con: duckdb.DuckDBPyConnection) -> bool:
    """False for a catalog made before segments recorded their size and checksum (it needs the ALTERs)."""
    return bool(scalar(con, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'segments' "
                            "AND column_name = 'file_sha256'"))


def find_ingest(con: duckdb.DuckDBPyConnection, content_hash: str) -> dict | None:
    rows = con.sql(
        "SELECT ingest_id, source, rows_read, segment_id FROM ingests WHERE content_hash = ?", params=[content_hash]
    ).fetchall()
    if not rows:
        return None
    ingest_id, source, rows_read, segment_id = rows[0]
    return {"ingest_id": ingest_id, "source": source, "rows_read": rows_read, "segment_id": segment_id}


def next_segment(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """(next segment id, first offset of the next segment)."""
    seg, offset = con.sql(
        "SELECT coalesce(max(segment_id), 0) + 1, coalesce(max(first_offset + rows), 0) FROM segments"
    ).fetchall()[0]
    return int(seg), int(offset)


# --- writes (called inside one transaction by the store) -----------------------------------

def insert_ids(con: duckdb.DuckDBPyConnection, kind: str, first_dense: int, external: pa.Array) -> None:
    if len(external) == 0:
        return
    dense = pa.array(np.arange(first_dense, first_dense + len(external)), pa.int32())
    with registered(con, "_ckd_new_ids", pa.table({"dense_id": dense, "external_id": external})):
        con.execute(f"INSERT INTO {id_table(kind)} SELECT dense_id, external_id FROM _ckd_new_ids")


def insert_segment(con: duckdb.DuckDBPyConnection, segment: dict) -> None:
    con.execute(
        "INSERT INTO segments (segment_id, path, content_hash, source, rows, first_offset, ts_min, ts_max, "
        "created_at, file_bytes, file_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [segment["segment_id"], segment["path"], segment["content_hash"], segment["source"], segment["rows"],
         segment["first_offset"], segment["ts_min"], segment["ts_max"], segment["created_at"],
         segment["file_bytes"], segment["file_sha256"]],
    )


def insert_ingest(con: duckdb.DuckDBPyConnection, ingest: dict) -> int:
    ingest_id = int(scalar(con, "SELECT coalesce(max(ingest_id), 0) + 1 FROM ingests"))
    con.execute(
        "INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [ingest_id, ingest["content_hash"], ingest["source"], ingest["rows_read"], ingest["rows_taken"],
         ingest["rows_quarantined"], ingest["new_users"], ingest["new_items"], ingest["segment_id"],
         ingest["created_at"]],
    )
    return ingest_id


def insert_quarantine(con: duckdb.DuckDBPyConnection, ingest_id: int, source: str, classified: str, staging: str,
                      reasons: tuple[str, ...]) -> None:
    """The quarantined rows of one ingest, from its Parquet files of classified (row, reason code) and staged
    rows (raw text); row numbers are 1-based. Runs in DuckDB, out of core."""
    table = pa.table({"code": pa.array(range(len(reasons)), pa.int8()), "reason": pa.array(reasons, pa.string())})
    with registered(con, "_ckd_reasons", table):
        con.execute(
            "INSERT INTO quarantine SELECT ?, ?, c.rn + 1, r.reason, s.raw FROM read_parquet(?) c "
            "JOIN read_parquet(?) s ON s.rn = c.rn JOIN _ckd_reasons r ON r.code = c.reason WHERE c.reason >= 0",
            [ingest_id, source, classified, staging],
        )


def insert_results(con: duckdb.DuckDBPyConnection, commit_id: int, job: str, lineage: str, block: int,
                   results: dict[str, dict[str, float | None]]) -> None:
    """One row per (model, metric) of a committed block; NaN, None and non-numbers become NULL."""
    models, metrics, values = [], [], []
    for model, row in results.items():
        for metric, value in row.items():
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            models.append(str(model))
            metrics.append(str(metric))
            values.append(None if number is None or number != number else number)
    if not models:
        return
    table = pa.table({"model": pa.array(models, pa.string()), "metric": pa.array(metrics, pa.string()),
                      "value": pa.array(values, pa.float64())})
    with registered(con, "_ckd_results", table):
        con.execute("INSERT INTO block_results SELECT ?, ?, ?, ?, model, metric, value FROM _ckd_results",
                    [commit_id, job, lineage, block])


def split_columns(split) -> list[float]:
    """A plan's shares as the plans table holds them: train, valid, test, held out (0 when none)."""
    return [float(s) for s in split[:3]] + [float(split[3]) if len(split) > 3 else 0.0]


def split_of(train, valid, test, holdout) -> tuple[float, ...]:
    """A plan's shares from the plans table: three, or four where a share is held out."""
    split = (float(train), float(valid), float(test))
    return split + (float(holdout),) if holdout else split


def insert_plan(con: duckdb.DuckDBPyConnection, plan: dict, blocks: pa.Table, rows: pa.Table) -> None:
    con.execute(
        "INSERT INTO plans (plan_id, base_fraction, incremental, split_train, split_valid, split_test, split_holdout, "
        "seed, total_rows, segment_hashes, created_at, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [plan["plan_id"], plan["base_fraction"], plan["incremental"], *split_columns(plan["split"]), plan["seed"],
         plan["total_rows"], plan["segment_hashes"], plan["created_at"], plan.get("policy")],
    )
    insert_plan_blocks(con, plan["plan_id"], blocks, rows)


def insert_plan_blocks(con: duckdb.DuckDBPyConnection, plan_id: str, blocks: pa.Table, rows: pa.Table) -> None:
    """Blocks (block, rows, ts_start, ts_end, num_users, num_items, new_users, new_items[, late, bound_start,
    bound_end]) and their rows (offset, block, split) of a plan."""
    live = [c for c in ("late", "bound_start", "bound_end") if c in blocks.column_names]
    with registered(con, "_ckd_plan_blocks", blocks):
        con.execute(
            "INSERT INTO plan_blocks (plan_id, block, rows, ts_start, ts_end, num_users, num_items, new_users, "
            f"new_items{''.join(', ' + c for c in live)}) SELECT ?, block, rows, ts_start, ts_end, num_users, "
            f"num_items, new_users, new_items{''.join(', ' + c for c in live)} FROM _ckd_plan_blocks", [plan_id],
        )
    with registered(con, "_ckd_plan_rows", rows):
        con.execute('INSERT INTO plan_rows SELECT ?, "offset", block, split FROM _ckd_plan_rows', [plan_id])
