"""The stream store: an append-only directory of immutable Parquet segments plus a DuckDB catalog.

    ROOT/segments/seg-<id>-<hash>.parquet   offset int64, user int32, item int32, ts int64, weight float32
    ROOT/catalog.duckdb                     ids, segments, ingests, quarantine, block plans

A segment becomes visible only when the catalog records it, which happens after the file is
complete on disk (tmp file, fsync, rename) and in the same transaction as everything else the
ingest changes; files in segments/ that the catalog does not name are ignored by readers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from continual_kd.errors import CkdError
from continual_kd.stream import catalog
from continual_kd.stream.ingest import (
    OK, REASONS, STORED_DUPLICATE, ColumnMap, ValidatedRows, check_input_file, file_content_hash,
    raw_strings, read_input_file, resolve_columns, table_content_hash, validate_rows,
)
from continual_kd.stream.plan import BlockInfo, BlockPlan, compute_plan, plan_id_for, validate_plan_args
from continual_kd.types import Interactions

SEGMENTS_DIR = "segments"
SEGMENT_SCHEMA = pa.schema([("offset", pa.int64()), ("user", pa.int32()), ("item", pa.int32()),
                            ("ts", pa.int64()), ("weight", pa.float32())])


@dataclass
class IngestReport:
    source: str
    content_hash: str
    rows_read: int
    rows_taken: int
    rows_quarantined: int
    reasons: dict[str, int]  # reason -> count, for quarantined rows
    segment_id: int | None  # None when nothing was written
    already_ingested: bool  # True: same content seen before, store unchanged (no-op)
    new_users: int
    new_items: int


class StreamStore:
    """Open with ``StreamStore.open(root)``; every method opens and closes its own connection."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.lock_wait_s = catalog.LOCK_WAIT_S  # how long to wait for another process's lock

    def __repr__(self) -> str:
        return f"StreamStore({str(self.root)!r})"

    @classmethod
    def open(cls, root: str | Path, create: bool = False) -> "StreamStore":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise CkdError(f"{root} is a file, not a stream store directory; choose another path.")
        store = cls(root)
        if not (root / catalog.CATALOG_FILE).exists():
            if not create:
                raise CkdError(f"{root} is not a stream store (no {catalog.CATALOG_FILE}); "
                               f"run `ckd ingest` or `ckd data ...` first to create it.")
            (root / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
            with store._connect(write=True) as con:
                catalog.create_schema(con)
        return store

    def _connect(self, write: bool):
        return catalog.connect(self.root, write, self.lock_wait_s)

    def _upgrade_schema(self) -> None:
        """Stores made by an older version lack newer tables (CREATE ... IF NOT EXISTS)."""
        with self._connect(write=False) as con:
            tables = {t for (t,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
        if not set(catalog.TABLES) <= tables:
            with self._connect(write=True) as con:
                catalog.create_schema(con)

    # --- the commit log: which block of which job lineage is consumed -----------------------

    def commit_block(self, job: str, lineage: str, plan_id: str, block: int, rows_covered: int,
                     snapshot: str, snapshot_digest: str) -> None:
        """Record that ``block`` of the job's lineage is consumed (its snapshot is complete).

        Blocks are committed in order, exactly once: the block must be the next after the last
        active commit. Anything else would skip or double-count data, so it is refused.
        """
        self._upgrade_schema()
        with self._connect(write=True) as con:
            last = catalog.scalar(con, "SELECT max(block) FROM commits WHERE job = ? AND lineage = ? "
                                       "AND revoked_at IS NULL", [job, lineage])
            expected = 0 if last is None else int(last) + 1
            if block != expected:
                raise RuntimeError(f"commit of block {block} for job {job!r} out of order: the next "
                                   f"block to commit is {expected}")
            next_id = int(catalog.scalar(con, "SELECT coalesce(max(commit_id), 0) + 1 FROM commits"))
            con.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                        [next_id, job, lineage, plan_id, block, rows_covered, snapshot, snapshot_digest,
                         catalog.now_utc()])

    def committed_blocks(self, job: str, lineage: str | None = None, include_revoked: bool = False) -> list[dict]:
        """The job's commits in order (active ones unless ``include_revoked``)."""
        self._upgrade_schema()
        query = ("SELECT commit_id, job, lineage, plan_id, block, rows_covered, snapshot, snapshot_digest, "
                 "committed_at, revoked_at, revoked_reason FROM commits WHERE job = ?")
        params: list = [job]
        if lineage is not None:
            query += " AND lineage = ?"
            params.append(lineage)
        if not include_revoked:
            query += " AND revoked_at IS NULL"
        with self._connect(write=False) as con:
            rows = con.sql(query + " ORDER BY commit_id", params=params).fetchall()
        keys = ("commit_id", "job", "lineage", "plan_id", "block", "rows_covered", "snapshot", "snapshot_digest",
                "committed_at", "revoked_at", "revoked_reason")
        return [dict(zip(keys, r)) for r in rows]

    def commit_summary(self) -> list[dict]:
        """Per job and lineage: active committed blocks (in order) and how many commits were revoked."""
        self._upgrade_schema()
        with self._connect(write=False) as con:
            rows = con.sql("SELECT job, lineage, list(block ORDER BY block) FILTER (WHERE revoked_at IS NULL), "
                           "count(*) FILTER (WHERE revoked_at IS NOT NULL), max(committed_at) FROM commits "
                           "GROUP BY job, lineage ORDER BY max(committed_at)").fetchall()
        return [{"job": j, "lineage": lin, "blocks": list(b or []), "revoked": int(r), "last_commit": str(t)}
                for j, lin, b, r, t in rows]

    def revoke_commits(self, job: str, lineage: str | None, from_block: int, reason: str) -> int:
        """Mark the job's active commits of blocks ≥ from_block as revoked (kept for the record)."""
        self._upgrade_schema()
        query = "UPDATE commits SET revoked_at = ?, revoked_reason = ? WHERE job = ? AND block >= ? AND revoked_at IS NULL"
        params: list = [catalog.now_utc(), reason, job, from_block]
        if lineage is not None:
            query += " AND lineage = ?"
            params.append(lineage)
        with self._connect(write=True) as con:
            n = con.execute(query + " RETURNING commit_id", params).fetchall()
        return len(n)

    # --- ingest ----------------------------------------------------------------------------

    def ingest_file(self, path: str | Path, columns: ColumnMap = ColumnMap()) -> IngestReport:
        path = Path(path)
        fmt = check_input_file(path)
        content_hash = file_content_hash(path)
        prior = self._find_ingest(content_hash)
        if prior is not None:
            return _already_ingested(str(path), content_hash, prior)
        return self._ingest(read_input_file(path, fmt), str(path), content_hash, columns)

    def ingest_table(self, table: pa.Table, source: str, columns: ColumnMap = ColumnMap()) -> IngestReport:
        if not isinstance(table, pa.Table):
            raise TypeError(f"ingest_table expects a pyarrow.Table, got {type(table).__name__}")
        if table.num_rows == 0:
            raise CkdError(f"Cannot ingest {source}: the table has no rows.")
        content_hash = table_content_hash(table)
        prior = self._find_ingest(content_hash)
        if prior is not None:
            return _already_ingested(source, content_hash, prior)
        return self._ingest(table, source, content_hash, columns)

    def _find_ingest(self, content_hash: str) -> dict | None:
        with self._connect(write=False) as con:
            return catalog.find_ingest(con, content_hash)

    def _ingest(self, table: pa.Table, source: str, content_hash: str, columns: ColumnMap) -> IngestReport:
        cols = resolve_columns(table.column_names, columns, source)
        rows = validate_rows(table, cols, source)
        with self._connect(write=True) as con:
            prior = catalog.find_ingest(con, content_hash)  # again, now under the write lock
            if prior is not None:
                return _already_ingested(source, content_hash, prior)
            self._remove_unrecorded_segments(con)

            user_dense = _dense_per_row(rows.user_codes, catalog.lookup_dense(con, "user", rows.user_values))
            item_dense = _dense_per_row(rows.item_codes, catalog.lookup_dense(con, "item", rows.item_values))
            self._mark_stored_duplicates(con, rows, user_dense, item_dense)
            taken = np.flatnonzero(rows.reason == OK)
            quarantined = np.flatnonzero(rows.reason != OK)

            first_user, first_item = catalog.count_ids(con, "user"), catalog.count_ids(con, "item")
            # new ids in order of first appearance in time, so each block's id space is a prefix
            by_time = taken[np.argsort(rows.ts[taken], kind="stable")]
            new_user_ids, user_dense = _assign_new_ids(rows.user_codes, rows.user_values, user_dense, by_time, first_user)
            new_item_ids, item_dense = _assign_new_ids(rows.item_codes, rows.item_values, item_dense, by_time, first_item)
            reasons = pa.array(REASONS, pa.string()).take(pa.array(rows.reason[quarantined].astype(np.int64)))
            raw = raw_strings(table, cols, quarantined)

            segment_id, first_offset = catalog.next_segment(con)
            segment = None
            if len(taken):
                segment = {
                    "segment_id": segment_id, "content_hash": content_hash, "source": source,
                    "rows": len(taken), "first_offset": first_offset,
                    "ts_min": int(rows.ts[taken].min()), "ts_max": int(rows.ts[taken].max()),
                    "created_at": catalog.now_utc(),
                    "path": f"{SEGMENTS_DIR}/seg-{segment_id:06d}-{content_hash[:12]}.parquet",
                }
                self._write_segment(segment["path"], pa.table([
                    pa.array(np.arange(first_offset, first_offset + len(taken), dtype=np.int64)),
                    pa.array(user_dense[taken].astype(np.int32)),
                    pa.array(item_dense[taken].astype(np.int32)),
                    pa.array(rows.ts[taken]),
                    pa.array(rows.weight[taken]),
                ], schema=SEGMENT_SCHEMA))
            try:
                con.execute("BEGIN")
                catalog.insert_ids(con, "user", first_user, new_user_ids)
                catalog.insert_ids(con, "item", first_item, new_item_ids)
                if segment is not None:
                    catalog.insert_segment(con, segment)
                ingest_id = catalog.insert_ingest(con, {
                    "content_hash": content_hash, "source": source, "rows_read": len(rows),
                    "rows_taken": len(taken), "rows_quarantined": len(quarantined),
                    "new_users": len(new_user_ids), "new_items": len(new_item_ids),
                    "segment_id": segment_id if segment else None, "created_at": catalog.now_utc(),
                })
                catalog.insert_quarantine(con, ingest_id, source, quarantined + 1, reasons, raw)
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                if segment is not None:
                    (self.root / segment["path"]).unlink(missing_ok=True)
                raise
        return IngestReport(
            source=source, content_hash=content_hash, rows_read=len(rows), rows_taken=len(taken),
            rows_quarantined=len(quarantined), reasons=rows.reason_counts(),
            segment_id=segment_id if segment else None, already_ingested=False,
            new_users=len(new_user_ids), new_items=len(new_item_ids),
        )

    def _mark_stored_duplicates(self, con: duckdb.DuckDBPyConnection, rows: ValidatedRows,
                                user_dense: np.ndarray, item_dense: np.ndarray) -> None:
        """Valid rows equal to a stored row -> STORED_DUPLICATE (only rows with known ids can be)."""
        candidates = np.flatnonzero((rows.reason == OK) & (user_dense >= 0) & (item_dense >= 0))
        paths = catalog.segment_paths(con, self.root)
        if len(candidates) == 0 or not paths:
            return
        table = pa.table({
            "pos": pa.array(candidates, pa.int64()),
            "u": pa.array(user_dense[candidates].astype(np.int32)),
            "i": pa.array(item_dense[candidates].astype(np.int32)),
            "ts": pa.array(rows.ts[candidates]),
            "w": pa.array(rows.weight[candidates]),
        })
        with catalog.registered(con, "_ckd_candidates", table):
            hits = con.sql(
                'SELECT DISTINCT c.pos FROM _ckd_candidates c JOIN read_parquet(?) s '
                'ON s."user" = c.u AND s.item = c.i AND s.ts = c.ts AND s.weight = c.w',
                params=[paths],
            ).fetchnumpy()["pos"]
        rows.reason[np.asarray(hits, dtype=np.int64)] = REASONS.index(STORED_DUPLICATE)

    def _write_segment(self, relative: str, table: pa.Table) -> None:
        """Write to a hidden tmp file, fsync, then rename: the final name never holds a partial file."""
        directory = self.root / SEGMENTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-{uuid.uuid4().hex}.parquet"
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.root / relative)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)

    def _remove_unrecorded_segments(self, con: duckdb.DuckDBPyConnection) -> None:
        """Leftovers of a writer that died before its commit; safe to delete under the write lock."""
        directory = self.root / SEGMENTS_DIR
        if not directory.is_dir():
            return
        recorded = {Path(p).name for (p,) in con.sql("SELECT path FROM segments").fetchall()}
        for f in directory.iterdir():
            if f.is_file() and f.name not in recorded and (f.name.startswith(".tmp-") or f.name.startswith("seg-")):
                f.unlink(missing_ok=True)

    # --- ids -------------------------------------------------------------------------------

    @property
    def num_users(self) -> int:
        with self._connect(write=False) as con:
            return catalog.count_ids(con, "user")

    @property
    def num_items(self) -> int:
        with self._connect(write=False) as con:
            return catalog.count_ids(con, "item")

    def external_ids(self, kind: str, dense: np.ndarray) -> list[str]:
        table_name = catalog.id_table(kind)
        dense = np.asarray(dense, dtype=np.int64).ravel()
        with self._connect(write=False) as con:
            n = catalog.count_ids(con, kind)
            bad = (dense < 0) | (dense >= n)
            if bad.any():
                raise CkdError(f"Unknown dense {kind} id {int(dense[bad][0])}: the stream store {self.root} "
                               f"has {n} {kind}s (dense ids 0..{n - 1}).")
            query = pa.table({"pos": pa.array(np.arange(len(dense)), pa.int64()),
                              "dense_id": pa.array(dense.astype(np.int32))})
            with catalog.registered(con, "_ckd_dense", query):
                found = con.sql(
                    f"SELECT t.external_id FROM _ckd_dense q JOIN {table_name} t "
                    f"ON t.dense_id = q.dense_id ORDER BY q.pos"
                ).to_arrow_table()
        return found.column("external_id").to_pylist()

    def dense_ids(self, kind: str, external: list[str]) -> np.ndarray:
        catalog.id_table(kind)
        values = pa.array([str(e).strip() for e in external], pa.string())
        with self._connect(write=False) as con:
            dense = catalog.lookup_dense(con, kind, values)
        unknown = np.flatnonzero(dense < 0)
        if len(unknown):
            raise CkdError(f"Unknown {kind} id '{external[int(unknown[0])]}': it is not in the stream store "
                           f"{self.root}{f' ({len(unknown)} unknown ids in all)' if len(unknown) > 1 else ''}.")
        return dense

    # --- block plans -----------------------------------------------------------------------

    def ensure_plan(self, base_fraction: float = 0.5, incremental: int = 5,
                    split: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> BlockPlan:
        validate_plan_args(base_fraction, incremental, split, seed)
        base_fraction, incremental, seed = float(base_fraction), int(incremental), int(seed)
        split = tuple(float(s) for s in split)
        with self._connect(write=True) as con:
            hashes = [h for (h,) in con.sql("SELECT content_hash FROM segments ORDER BY content_hash").fetchall()]
            if not hashes:
                raise CkdError(f"The stream store {self.root} has no interactions yet; "
                               f"run `ckd ingest` or `ckd data ...` first.")
            plan_id = plan_id_for(base_fraction, incremental, split, seed, hashes)
            stored = _load_plan(con, plan_id)
            if stored is not None:
                return stored
            data = con.sql(
                'SELECT "offset", ts, "user", item FROM read_parquet(?) ORDER BY ts, "offset"',
                params=[catalog.segment_paths(con, self.root)],
            ).fetchnumpy()
            offsets, ts = np.asarray(data["offset"]), np.asarray(data["ts"])
            blocks, block, row_split = compute_plan(ts, np.asarray(data["user"]), np.asarray(data["item"]),
                                                    base_fraction, incremental, split, seed)
            plan = BlockPlan(plan_id=plan_id, base_fraction=base_fraction, incremental=incremental,
                             split=split, seed=seed, total_rows=len(ts), blocks=tuple(blocks))
            block_table = pa.Table.from_pylist([dataclasses.asdict(b) for b in blocks]).rename_columns(
                ["block", "rows", "ts_start", "ts_end", "num_users", "num_items", "new_users", "new_items"])
            row_table = pa.table({"offset": offsets, "block": block, "split": row_split})
            try:
                con.execute("BEGIN")
                catalog.insert_plan(con, {
                    "plan_id": plan_id, "base_fraction": base_fraction, "incremental": incremental,
                    "split": split, "seed": seed, "total_rows": len(ts),
                    "segment_hashes": ",".join(hashes), "created_at": catalog.now_utc(),
                }, block_table, row_table)
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
        return plan

    def get_plan(self, plan_id: str) -> BlockPlan:
        with self._connect(write=False) as con:
            return self._require_plan(con, plan_id)

    def _require_plan(self, con: duckdb.DuckDBPyConnection, plan_id: str) -> BlockPlan:
        plan = _load_plan(con, plan_id)
        if plan is None:
            known = [p for (p,) in con.sql("SELECT plan_id FROM plans ORDER BY plan_id").fetchall()]
            raise CkdError(f"Unknown block plan '{plan_id}' in the stream store {self.root} "
                           f"(known: {', '.join(known) or 'none'}); create it with ensure_plan, "
                           f"or run `ckd status` to list the plans.")
        return plan

    def read_block(self, plan_id: str, k: int) -> Interactions:
        """The rows of block k, all splits, in (ts, offset) order."""
        return self._read_blocks(plan_id, k, k)

    def read_blocks(self, plan_id: str, upto: int) -> Interactions:
        """The rows of blocks 0..upto, all splits, in (ts, offset) order."""
        return self._read_blocks(plan_id, 0, upto)

    def _read_blocks(self, plan_id: str, first: int, last: int) -> Interactions:
        with self._connect(write=False) as con:
            plan = self._require_plan(con, plan_id)
            if not 0 <= last < plan.num_blocks:
                raise CkdError(f"Block {last} does not exist: plan '{plan_id}' has blocks 0..{plan.num_blocks - 1}.")
            data = con.sql(
                'SELECT s."user", s.item, s.ts, s.weight, p.block, p.split '
                'FROM plan_rows p JOIN read_parquet(?) s ON s."offset" = p."offset" '
                'WHERE p.plan_id = ? AND p.block BETWEEN ? AND ? ORDER BY s.ts, s."offset"',
                params=[catalog.segment_paths(con, self.root), plan_id, first, last],
            ).fetchnumpy()
        info = plan.blocks[last]
        return Interactions(
            users=np.asarray(data["user"], dtype=np.int64), items=np.asarray(data["item"], dtype=np.int64),
            ts=np.asarray(data["ts"], dtype=np.int64), weight=np.asarray(data["weight"], dtype=np.float32),
            block=np.asarray(data["block"], dtype=np.int16), split=np.asarray(data["split"], dtype=np.int8),
            num_users=info.num_users, num_items=info.num_items,
            meta={"plan_id": plan_id, "blocks": (first, last)},
        )

    # --- inspection ------------------------------------------------------------------------

    def status(self) -> dict:
        with self._connect(write=False) as con:
            segments = [
                dict(zip(("id", "source", "rows", "ts_min", "ts_max", "content_hash"), r))
                for r in con.sql("SELECT segment_id, source, rows, ts_min, ts_max, content_hash "
                                 "FROM segments ORDER BY segment_id").fetchall()
            ]
            by_reason = dict(con.sql("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())
            plan_ids = [p for (p,) in con.sql("SELECT plan_id FROM plans ORDER BY created_at, plan_id").fetchall()]
            plans = [_load_plan(con, p) for p in plan_ids]
            users, items = catalog.count_ids(con, "user"), catalog.count_ids(con, "item")
            ingests = int(catalog.scalar(con, "SELECT count(*) FROM ingests"))
        return {
            "root": str(self.root),
            "segments": segments,
            "users": users,
            "items": items,
            "rows": sum(s["rows"] for s in segments),
            "ingests": ingests,
            "quarantine": {r: int(by_reason[r]) for r in REASONS if r in by_reason},
            "plans": [dict(dataclasses.asdict(p), num_blocks=p.num_blocks) for p in plans],
        }

    def quarantine(self, limit: int = 100) -> list[dict]:
        with self._connect(write=False) as con:
            rows = con.sql("SELECT ingest_id, source, row_number, reason, raw FROM quarantine "
                           "ORDER BY ingest_id, row_number LIMIT ?", params=[int(limit)]).fetchall()
        return [dict(zip(("ingest_id", "source", "row_number", "reason", "raw"), r)) for r in rows]

    def fingerprint(self) -> str:
        """sha256 of every catalog table (sorted rows) and every file under segments/ (name + bytes)."""
        digest = hashlib.sha256()
        with self._connect(write=False) as con:
            for name in catalog.TABLES:
                table = con.sql(f"SELECT * FROM {name} ORDER BY ALL").to_arrow_table()
                sink = pa.BufferOutputStream()
                pacsv.write_csv(table, sink)
                digest.update(name.encode() + b"\0" + sink.getvalue().to_pybytes())
        directory = self.root / SEGMENTS_DIR
        for f in sorted(directory.iterdir()) if directory.is_dir() else []:
            digest.update(f.name.encode() + b"\0" + file_content_hash(f).encode())
        return digest.hexdigest()


# --- helpers -------------------------------------------------------------------------------

def _already_ingested(source: str, content_hash: str, prior: dict) -> IngestReport:
    return IngestReport(source=source, content_hash=content_hash, rows_read=int(prior["rows_read"]),
                        rows_taken=0, rows_quarantined=0, reasons={}, segment_id=None,
                        already_ingested=True, new_users=0, new_items=0)


def _dense_per_row(codes: np.ndarray, dense_of_code: np.ndarray) -> np.ndarray:
    """(n,) dense id per row, -1 where the id is missing or not yet known."""
    if len(dense_of_code) == 0:
        return np.full(len(codes), -1, dtype=np.int64)
    return np.where(codes >= 0, dense_of_code[np.maximum(codes, 0)], -1)


def _assign_new_ids(codes: np.ndarray, values: pa.Array, dense: np.ndarray, taken: np.ndarray,
                    first_dense: int) -> tuple[pa.Array, np.ndarray]:
    """New dense ids, in order of first appearance among the taken rows (in the order given), for ids not yet known.

    Returns (external ids to insert, dense id per row)."""
    unknown_rows = taken[dense[taken] < 0]
    codes_new, first_row = np.unique(codes[unknown_rows], return_index=True)
    codes_new = codes_new[np.argsort(first_row, kind="stable")]
    dense_of_code = np.full(len(values), -1, dtype=np.int64)
    dense_of_code[codes_new] = first_dense + np.arange(len(codes_new))
    dense = dense.copy()
    dense[unknown_rows] = dense_of_code[codes[unknown_rows]]
    return values.take(pa.array(codes_new, pa.int64())), dense


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # the transaction was never opened or is already gone


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_plan(con: duckdb.DuckDBPyConnection, plan_id: str) -> BlockPlan | None:
    rows = con.sql("SELECT base_fraction, incremental, split_train, split_valid, split_test, seed, total_rows "
                   "FROM plans WHERE plan_id = ?", params=[plan_id]).fetchall()
    if not rows:
        return None
    base_fraction, incremental, train, valid, test, seed, total_rows = rows[0]
    blocks = con.sql("SELECT block, rows, ts_start, ts_end, num_users, num_items, new_users, new_items "
                     "FROM plan_blocks WHERE plan_id = ? ORDER BY block", params=[plan_id]).fetchall()
    return BlockPlan(plan_id=plan_id, base_fraction=float(base_fraction), incremental=int(incremental),
                     split=(float(train), float(valid), float(test)), seed=int(seed), total_rows=int(total_rows),
                     blocks=tuple(BlockInfo(*(int(v) for v in b)) for b in blocks))
