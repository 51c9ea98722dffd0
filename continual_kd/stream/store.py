"""The stream store: an append-only directory of immutable Parquet segments plus a DuckDB catalog.

    ROOT/segments/seg-<id>-<hash>.parquet   offset int64, user int32, item int32, ts int64, weight float32
    ROOT/catalog.duckdb                     ids, segments (rows, bytes, sha256), ingests, quarantine, plans
    ROOT/.staging/<uuid>/                   one running ingest's work files (flock'd; removed when it ends)

A segment becomes visible only when the catalog records it, which happens after the file is
complete on disk (tmp file, fsync, rename) and in the same transaction as everything else the
ingest changes; files in segments/ that the catalog does not name are ignored by readers.

An ingest streams its input in record batches (``stream/ingest.py``) into a staging file, then DuckDB
classifies the rows out of core (duplicates within the input and of stored rows, new ids) under a
memory limit, so peak memory is bounded by the batch, not the file. Every read checks each segment's
size and row count against the catalog (``stream/segments.py``); ``verify_segments`` also its checksum.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from continual_kd.errors import CkdError
from continual_kd.stream import catalog, live_state, segment_hours
from continual_kd.stream.ingest import (
    DUPLICATE, OK, REASONS, STORED_DUPLICATE, ColumnMap, check_input_file, file_content_hash, input_file_batches,
    stage_batches, table_batches, table_content_hash,
)
from continual_kd.stream.segments import (
    SegmentRecord, check_segments, fsync_dir, segment_problem, write_segment,
)
from continual_kd.stream.compact import block_digest, record_digest
from continual_kd.stream.kg import read_item_graph
from continual_kd.stream.labelled import read_labelled
from continual_kd.stream.rationale import read_item_rationales
from continual_kd.stream.plan import BlockInfo, BlockPlan, compute_plan, plan_id_for, validate_plan_args
from continual_kd.stream.live import Cursor, LivePolicy, block_split, cut_blocks, live_plan_id, next_window_end
from continual_kd.types import Interactions

SEGMENTS_DIR = "segments"
STAGING_DIR = ".staging"
# DuckDB's memory while an ingest classifies its rows; beyond it DuckDB spills to the ingest's work folder.
INGEST_MEMORY_LIMIT = os.environ.get("CKD_INGEST_MEMORY", "128MB")
# DuckDB's threads for that work: each thread holds its own buffers inside the one memory limit, so on a many-core
# machine (16 cores) a 10M-row ingest ran out of the 128 MB with one thread per core; 4 fit it (override here)
INGEST_THREADS = int(os.environ.get("CKD_INGEST_THREADS", "0")) or min(os.cpu_count() or 1, 4)


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
    repaired: bool = False  # True: the same content was ingested before and its damaged segment was rewritten


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
            try:
                (root / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CkdError(f"Cannot create the stream store {root}: {e.strerror or e} ({e.filename or root}); "
                               f"choose a writable folder with free space.") from None
            with store._connect(write=True) as con:
                catalog.create_schema(con)
        else:
            store._upgrade_schema()
        return store

    def _connect(self, write: bool):
        return catalog.connect(self.root, write, self.lock_wait_s)

    def _upgrade_schema(self) -> None:
        """Stores made by an older version lack newer tables (CREATE ... IF NOT EXISTS)."""
        with self._connect(write=False) as con:
            tables = {t for (t,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
            checksums = "segments" in tables and catalog.has_segment_checksums(con)
            live = "plan_blocks" in tables and catalog.has_plan_columns(con)
            narrow = catalog.narrow_block_tables(con)  # SMALLINT block columns: widened by create_schema
        if not set(catalog.TABLES) <= tables or not checksums or not live or narrow:
            with self._connect(write=True) as con:
                catalog.create_schema(con)

    # --- the commit log: which block of which job lineage is consumed -----------------------

    def commit_block(self, job: str, lineage: str, plan_id: str, block: int, rows_covered: int,
                     snapshot: str, snapshot_digest: str,
                     results: dict[str, dict[str, float | None]] | None = None) -> None:
        """Record that ``block`` of the job's lineage is consumed (its snapshot is complete), and its
        ``results`` (model → metric → value) as rows of ``block_results``, in one transaction.

        Blocks are committed in order, exactly once: the block must be the next after the last
        active commit. Anything else would skip or double-count data, so it is refused.
        """
        self._upgrade_schema()
        with self._connect(write=False) as con:  # the block's rows, fingerprinted (compaction proves it by this)
            digest = block_digest(con, self.root, plan_id, block)
        with self._connect(write=True) as con:
            last = catalog.scalar(con, "SELECT max(block) FROM commits WHERE job = ? AND lineage = ? "
                                       "AND revoked_at IS NULL", [job, lineage])
            expected = 0 if last is None else int(last) + 1
            if block != expected:
                raise RuntimeError(f"commit of block {block} for job {job!r} out of order: the next "
                                   f"block to commit is {expected}")
            next_id = int(catalog.scalar(con, "SELECT coalesce(max(commit_id), 0) + 1 FROM commits"))
            con.execute("BEGIN")
            try:
                con.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                            [next_id, job, lineage, plan_id, block, rows_covered, snapshot, snapshot_digest,
                             catalog.now_utc()])
                catalog.insert_results(con, next_id, job, lineage, block, results or {})
                record_digest(con, plan_id, block, digest)
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise

    def results(self, job: str | None = None) -> list[dict]:
        """Rows (job, lineage, block, model, metric, value) of the active commits, optionally of one job."""
        self._upgrade_schema()
        query = "SELECT job, lineage, block, model, metric, value FROM results"
        params: list = []
        if job is not None:
            query += " WHERE job = ?"
            params.append(job)
        with self._connect(write=False) as con:
            rows = con.sql(query + " ORDER BY job, lineage, block, model, metric", params=params).fetchall()
        return [dict(zip(("job", "lineage", "block", "model", "metric", "value"), r)) for r in rows]

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

    def relabel_lineage(self, job: str, old: str, new: str) -> int:
        """The job's commits (and their results) of lineage ``old`` become lineage ``new``, in one transaction
        (an upgrade that changed how the lineage is hashed, not the configuration) → how many commits."""
        self._upgrade_schema()
        with self._connect(write=True) as con:
            con.execute("BEGIN")
            try:
                n = con.execute("UPDATE commits SET lineage = ? WHERE job = ? AND lineage = ? RETURNING commit_id",
                                [new, job, old]).fetchall()
                con.execute("UPDATE block_results SET lineage = ? WHERE job = ? AND lineage = ?", [new, job, old])
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
        return len(n)

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
        return self._ingest(str(path), content_hash, lambda: input_file_batches(path, fmt, columns))

    def ingest_table(self, table: pa.Table, source: str, columns: ColumnMap = ColumnMap()) -> IngestReport:
        if not isinstance(table, pa.Table):
            raise TypeError(f"ingest_table expects a pyarrow.Table, got {type(table).__name__}")
        if table.num_rows == 0:
            raise CkdError(f"Cannot ingest {source}: the table has no rows.")
        content_hash = table_content_hash(table)
        return self._ingest(source, content_hash, lambda: table_batches(table, columns, source))

    def _ingest(self, source: str, content_hash: str, open_batches: Callable) -> IngestReport:
        """Stage the input (no lock held), then classify and commit it under the catalog's write lock.

        The same content again is a no-op, unless its segment is damaged: then it is rewritten from it."""
        prior = self._find_ingest(content_hash)
        if prior is not None:
            damaged = self._damaged_segment(prior["segment_id"])
            if damaged is None:
                return _already_ingested(source, content_hash, prior)
            return self._repair(source, content_hash, open_batches, damaged)
        cols, batches = open_batches()  # a missing column fails here, before anything is written
        with _work_folder(self.root) as work:
            staging = work / "rows.parquet"
            rows_read = _stage(batches, cols, source, staging)
            with self._connect(write=True) as con:
                prior = catalog.find_ingest(con, content_hash)  # again, now under the write lock
                if prior is not None:
                    return _already_ingested(source, content_hash, prior)
                self._remove_unrecorded_segments(con)
                return self._commit_staged(con, work, staging, source, content_hash, rows_read)

    def _commit_staged(self, con: duckdb.DuckDBPyConnection, work: Path, staging: Path, source: str,
                       content_hash: str, rows_read: int) -> IngestReport:
        _tune(con, work)
        # only the segments sharing an hour with the new rows can hold copies of them (stream/segment_hours.py);
        # those are checked (never compare against a damaged one) and read
        stored = check_segments(self.root, _duplicate_candidates(con, self.root, staging))
        classified = work / "classified.parquet"
        _classify(con, staging, classified, stored)
        counts = _reason_counts(con, classified)
        taken = counts.pop(OK, 0)
        segment_id, first_offset = catalog.next_segment(con)
        first_user, first_item = catalog.count_ids(con, "user"), catalog.count_ids(con, "item")
        final = None
        try:
            con.execute("BEGIN")
            # new ids in order of first appearance in time, so each block's id space is a prefix
            _insert_new_ids(con, "user", classified, first_user)
            _insert_new_ids(con, "item", classified, first_item)
            new_users = catalog.count_ids(con, "user") - first_user
            new_items = catalog.count_ids(con, "item") - first_item
            if taken:
                relative = f"{SEGMENTS_DIR}/seg-{segment_id:06d}-{content_hash[:12]}.parquet"
                final = self.root / relative
                written = write_segment(self.root / SEGMENTS_DIR, final, _segment_rows(con, classified), first_offset)
                catalog.insert_segment(con, {
                    "segment_id": segment_id, "content_hash": content_hash, "source": source, "rows": written.rows,
                    "first_offset": first_offset, "ts_min": written.ts_min, "ts_max": written.ts_max,
                    "created_at": catalog.now_utc(), "path": relative, "file_bytes": written.file_bytes,
                    "file_sha256": written.file_sha256,
                })
                segment_hours.record_from_parquet(con, segment_id, first_offset, written.rows,
                                                  f"SELECT ts FROM read_parquet(?) WHERE reason = {OK}", [str(classified)])
            ingest_id = catalog.insert_ingest(con, {
                "content_hash": content_hash, "source": source, "rows_read": rows_read, "rows_taken": taken,
                "rows_quarantined": rows_read - taken, "new_users": new_users, "new_items": new_items,
                "segment_id": segment_id if taken else None, "created_at": catalog.now_utc(),
            })
            catalog.insert_quarantine(con, ingest_id, source, str(classified), str(staging), REASONS)
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            if final is not None:
                final.unlink(missing_ok=True)
            raise
        return IngestReport(
            source=source, content_hash=content_hash, rows_read=rows_read, rows_taken=taken,
            rows_quarantined=rows_read - taken, reasons={REASONS[c]: n for c, n in sorted(counts.items())},
            segment_id=segment_id if taken else None, already_ingested=False,
            new_users=new_users, new_items=new_items,
        )

    def _damaged_segment(self, segment_id: int | None) -> SegmentRecord | None:
        """The record of segment ``segment_id`` if its file does not match it (checksum included), else None."""
        if segment_id is None:
            return None
        with self._connect(write=False) as con:
            seg = next((s for s in catalog.segment_records(con) if s.segment_id == segment_id), None)
        return seg if seg is not None and segment_problem(self.root, seg, checksum=True) is not None else None

    def _repair(self, source: str, content_hash: str, open_batches: Callable, damaged: SegmentRecord) -> IngestReport:
        """Rewrite a damaged segment from the input it was made of: the rows must come out byte-identical
        to what the catalog recorded (rows, size, checksum), else nothing changes."""
        cols, batches = open_batches()
        with _work_folder(self.root) as work:
            staging = work / "rows.parquet"
            rows_read = _stage(batches, cols, source, staging)
            with self._connect(write=True) as con:
                segments = catalog.segment_records(con)
                seg = next(s for s in segments if s.segment_id == damaged.segment_id)
                if segment_problem(self.root, seg, checksum=True) is None:  # repaired meanwhile
                    return _already_ingested(source, content_hash, catalog.find_ingest(con, content_hash))
                _tune(con, work)
                # as at its first ingest: duplicates of stored rows are those of the segments before it
                earlier = check_segments(self.root, _duplicate_candidates(con, self.root, staging, seg.segment_id))
                classified = work / "classified.parquet"
                _classify(con, staging, classified, earlier)
                counts = _reason_counts(con, classified)
                unknown = catalog.scalar(con, "SELECT count(*) FROM read_parquet(?) WHERE reason = ? AND "
                                              "(ud IS NULL OR iid IS NULL)", [str(classified), OK])
                first_offset = catalog.scalar(con, "SELECT first_offset FROM segments WHERE segment_id = ?",
                                              [seg.segment_id])
                rebuilt = work / "segment.parquet"
                written = write_segment(work, rebuilt, _segment_rows(con, classified), int(first_offset))
                recorded = (seg.rows, seg.file_bytes, seg.file_sha256)
                got = (written.rows, written.file_bytes, written.file_sha256)
                if unknown or any(r is not None and r != g for r, g in zip(recorded, got)):
                    raise CkdError(
                        f"Cannot rewrite segment {seg.path} from {source}: the rows it gives ({written.rows:,} "
                        f"rows, {written.file_bytes:,} bytes) do not match what the catalog recorded "
                        f"({seg.rows:,} rows, {seg.file_bytes if seg.file_bytes is not None else '?'} bytes, "
                        f"checksum); it is not the input that was ingested (or other --user-col/--item-col/"
                        f"--time-col/--weight-col options were used); restore the store from a backup.")
                os.replace(rebuilt, self.root / seg.path)
                fsync_dir(self.root / SEGMENTS_DIR)
        taken = counts.pop(OK, 0)
        return IngestReport(
            source=source, content_hash=content_hash, rows_read=rows_read, rows_taken=taken,
            rows_quarantined=rows_read - taken, reasons={REASONS[c]: n for c, n in sorted(counts.items())},
            segment_id=seg.segment_id, already_ingested=False, new_users=0, new_items=0, repaired=True,
        )

    def _find_ingest(self, content_hash: str) -> dict | None:
        with self._connect(write=False) as con:
            return catalog.find_ingest(con, content_hash)

    def _remove_unrecorded_segments(self, con: duckdb.DuckDBPyConnection) -> None:
        """Leftovers of a writer that died before its commit; safe to delete under the write lock."""
        directory = self.root / SEGMENTS_DIR
        if not directory.is_dir():
            return
        recorded = {Path(p).name for (p,) in con.sql("SELECT path FROM segments").fetchall()}
        for f in directory.iterdir():
            if f.is_file() and f.name not in recorded and (f.name.startswith(".tmp-") or f.name.startswith("seg-")):
                f.unlink(missing_ok=True)
        _remove_dead_work_folders(self.root)

    # --- segment integrity -----------------------------------------------------------------

    def segment_problems(self, checksum: bool = False) -> list[dict]:
        """Every segment with what is wrong with its file (``problem``: None when it matches the catalog):
        size and row count always, the sha256 checksum too with ``checksum``."""
        with self._connect(write=False) as con:
            segments = catalog.segment_records(con)
        return [{"id": s.segment_id, "path": s.path, "source": s.source, "rows": s.rows,
                 "problem": segment_problem(self.root, s, checksum),
                 "checksum_recorded": s.file_sha256 is not None} for s in segments]

    def verify_segments(self, checksum: bool = True) -> int:
        """Check every segment (checksums too unless ``checksum`` is False); the first damaged one raises a
        CkdError naming it, what differs and how to rewrite it. → number of segments checked."""
        with self._connect(write=False) as con:
            segments = catalog.segment_records(con)
        check_segments(self.root, segments, checksum)
        return len(segments)

    def verify_catalog(self) -> int:
        """Read every row of every catalog table, so that DuckDB checks every block's checksum (a damaged block
        raises the catalog's one-line CkdError). → rows read."""
        rows = 0
        with self._connect(write=False) as con:
            tables = [r[0] for r in con.sql("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_type = 'BASE TABLE' ORDER BY table_name").fetchall()]
            for name in tables:
                reader = con.sql(f'SELECT * FROM "{name}"').to_arrow_reader()
                rows += sum(batch.num_rows for batch in reader)
        return rows

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
                    split: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 0) -> BlockPlan:
        validate_plan_args(base_fraction, incremental, split, seed)
        base_fraction, incremental, seed = float(base_fraction), int(incremental), int(seed)
        split = tuple(float(s) for s in split)
        split = split[:3] if len(split) == 4 and not split[3] else split  # no held-out share: the 3-share plan
        with self._connect(write=True) as con:
            # the ingests that added rows (a compacted segment holds several: `ckd compact` keeps plan ids)
            hashes = [h for (h,) in con.sql("SELECT content_hash FROM ingests WHERE segment_id IS NOT NULL "
                                            "ORDER BY content_hash").fetchall()]
            if not hashes:
                raise CkdError(f"The stream store {self.root} has no interactions yet; "
                               f"run `ckd ingest` or `ckd data ...` first.")
            plan_id = plan_id_for(base_fraction, incremental, split, seed, hashes)
            stored = _load_plan(con, plan_id)
            if stored is not None:
                return stored
            data = con.sql(
                'SELECT "offset", ts, "user", item FROM read_parquet(?) ORDER BY ts, "offset"',
                params=[check_segments(self.root, catalog.segment_records(con))],
            ).fetchnumpy()
            offsets, ts = np.asarray(data["offset"]), np.asarray(data["ts"])
            blocks, block, row_split = compute_plan(ts, np.asarray(data["user"]), np.asarray(data["item"]),
                                                    base_fraction, incremental, split, seed)
            plan = BlockPlan(plan_id=plan_id, base_fraction=base_fraction, incremental=incremental,
                             split=split, seed=seed, total_rows=len(ts), blocks=tuple(blocks))
            block_table = pa.Table.from_pylist([dataclasses.asdict(b) for b in blocks]).select(
                ["index", "rows", "ts_start", "ts_end", "num_users", "num_items", "new_users", "new_items"]
            ).rename_columns(["block", "rows", "ts_start", "ts_end", "num_users", "num_items", "new_users", "new_items"])
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

    def ensure_fixed_plan(self, parts: list[tuple[str, int]]) -> BlockPlan:
        """One block whose rows are exactly the named ingests' rows, each ingest one split: ``parts`` is
        [(content hash, TRAIN | VALID | TEST)], e.g. a benchmark's train/valid/test files (no time cut, no
        random split). The store must hold those ingests and nothing else. Created once, like ``ensure_plan``."""
        key = json.dumps(["fixed", [[h, int(sp)] for h, sp in parts]])
        plan_id = "fixed-" + hashlib.sha256(key.encode()).hexdigest()[:10]
        with self._connect(write=True) as con:
            stored = _load_plan(con, plan_id)
            if stored is not None:
                return stored
            segments = {s.segment_id: s for s in catalog.segment_records(con)}
            chosen = [(catalog.find_ingest(con, h), sp) for h, sp in parts]
            if any(found is None or found["segment_id"] is None for found, _ in chosen):
                raise CkdError(f"The stream store {self.root} lacks the rows of one of the fixed split's files; "
                               f"ingest them first (or use a new store folder).")
            if set(segments) != {found["segment_id"] for found, _ in chosen}:
                raise CkdError(f"The stream store {self.root} holds other rows than the fixed split's files (e.g. "
                               f"an older version of a file); use a new, empty store folder for this split.")
            tables = []
            for found, sp in chosen:
                [path] = check_segments(self.root, [segments[found["segment_id"]]])
                t = con.sql('SELECT "offset", ts, "user", item FROM read_parquet(?)', params=[path]).to_arrow_table()
                tables.append(t.append_column("split", pa.array(np.full(t.num_rows, sp, np.int8))))
            data = pa.concat_tables(tables).sort_by([("ts", "ascending"), ("offset", "ascending")])
            users, items, ts = (data.column(c).to_numpy() for c in ("user", "item", "ts"))
            info = BlockInfo(index=0, rows=len(ts), ts_start=int(ts[0]), ts_end=int(ts[-1]),
                             num_users=int(users.max()) + 1, num_items=int(items.max()) + 1,
                             new_users=len(np.unique(users)), new_items=len(np.unique(items)))
            fractions = np.bincount(data.column("split").to_numpy(), minlength=3) / len(ts)
            plan = BlockPlan(plan_id=plan_id, base_fraction=1.0, incremental=0, split=tuple(map(float, fractions)),
                             seed=0, total_rows=len(ts), blocks=(info,))
            block_table = pa.table({"block": [0], **{k: [getattr(info, k)] for k in (
                "rows", "ts_start", "ts_end", "num_users", "num_items", "new_users", "new_items")}})
            row_table = pa.table({"offset": data.column("offset"), "block": pa.array(np.zeros(len(ts), np.int16)),
                                  "split": data.column("split")})
            try:
                con.execute("BEGIN")
                catalog.insert_plan(con, {
                    "plan_id": plan_id, "base_fraction": plan.base_fraction, "incremental": 0, "split": plan.split,
                    "seed": 0, "total_rows": len(ts), "segment_hashes": ",".join(h for h, _ in parts),
                    "created_at": catalog.now_utc(),
                }, block_table, row_table)
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
        return plan

    def advance_live_plan(self, policy: LivePolicy, flush: bool = False) -> tuple[BlockPlan, dict]:
        """Create the live plan of ``policy`` when missing and append every block that is complete now (with
        ``flush`` the incomplete rest too). Blocks already cut never change: late rows join the next block.

        → (plan, waiting): ``pending_rows`` stored but in no block yet, ``needs`` what completes the next one.
        """
        plan_id = live_plan_id(policy)
        with self._connect(write=True) as con:
            plan = _load_plan(con, plan_id)
            if plan is None:
                con.execute(
                    "INSERT INTO plans (plan_id, base_fraction, incremental, split_train, split_valid, split_test, "
                    "split_holdout, seed, total_rows, segment_hashes, created_at, policy) "
                    "VALUES (?, ?, 0, ?, ?, ?, ?, ?, 0, '', ?, ?)",
                    [plan_id, policy.base_fraction or 0.0, *catalog.split_columns(policy.split), policy.seed,
                     catalog.now_utc(),
                     policy.to_json()])
                plan = _load_plan(con, plan_id)
            stored, max_ts = con.sql("SELECT coalesce(sum(rows), 0), max(ts_max) FROM segments").fetchall()[0]
            pending = int(stored) - plan.total_rows
            cursor = _cursor(plan)
            end = next_window_end(policy, cursor)
            worth = pending > 0 and (flush or end is None or max_ts >= end) and (
                flush or policy.rows is None or cursor.blocks == 0 or pending >= policy.rows)
            if worth:
                plan = self._cut_live(con, plan, policy, cursor, int(max_ts), flush, int(stored))
                pending = int(stored) - plan.total_rows
        return plan, {"pending_rows": pending, "needs": _needs(policy, _cursor(plan), pending)}

    def _cut_live(self, con: duckdb.DuckDBPyConnection, plan: BlockPlan, policy: LivePolicy, cursor: Cursor,
                  max_ts: int, flush: bool, stored: int) -> BlockPlan:
        # what the plan keeps between cuts (stream/live_state.py): only segments with rows in no block are read
        kept = live_state.load(con, plan.plan_id, plan.num_blocks, plan.total_rows)
        if kept is not None:
            pending = live_state.read_pending(con, self.root, plan.plan_id, kept)
        if kept is None or len(pending.offsets) != stored - plan.total_rows:  # missing, or it disagrees: derive it
            kept, counts = live_state.derive(con, self.root, plan.plan_id, plan.num_blocks, plan.total_rows)
            self._write_live_state(con, plan.plan_id, kept, counts)  # it describes the plan as it is: keep it now
            pending = live_state.read_pending(con, self.root, plan.plan_id, kept)
            if len(pending.offsets) != stored - plan.total_rows:
                raise RuntimeError(f"live plan {plan.plan_id} of {self.root}: {len(pending.offsets)} rows in no block "
                                   f"found, the catalog counts {stored - plan.total_rows}")
        offsets, ts, users, items = pending.offsets, pending.ts, pending.users, pending.items
        cuts = cut_blocks(policy, cursor, ts, max_ts, flush)
        if not cuts:
            return plan
        known = {"user": kept.users, "item": kept.items}
        last = plan.blocks[-1] if plan.blocks else None
        num_users, num_items = (last.num_users, last.num_items) if last else (0, 0)
        block_rows, row_parts = [], []
        for j, cut in enumerate(cuts):
            k = cursor.blocks + j
            u, i, t = users[cut.take], items[cut.take], ts[cut.take]
            num_users, num_items = max(num_users, int(u.max()) + 1), max(num_items, int(i.max()) + 1)
            new_u = np.unique(u[~known["user"].contains(u)])
            new_i = np.unique(i[~known["item"].contains(i)])
            known = {"user": known["user"].add(new_u), "item": known["item"].add(new_i)}
            block_rows.append({"block": k, "rows": len(u), "ts_start": int(t.min()), "ts_end": int(t.max()),
                               "num_users": num_users, "num_items": num_items, "new_users": len(new_u),
                               "new_items": len(new_i), "late": cut.late, "bound_start": cut.bound_start,
                               "bound_end": cut.bound_end})
            row_parts.append(pa.table({"offset": offsets[cut.take], "block": np.full(len(u), k, np.int32),
                                       "split": block_split(u, policy.split, policy.seed, k)}))
        added = sum(b["rows"] for b in block_rows)
        after = live_state.LiveState(cursor.blocks + len(cuts), plan.total_rows + added, pending.offset_end,
                                     known["user"], known["item"])
        if not np.array_equal(np.concatenate([c.take for c in cuts]), np.arange(added)):
            raise RuntimeError("live cuts must take a prefix of the pending rows (the kept counts rely on it)")
        read = pending.counts_after(added)  # the cuts took the first `added` pending rows
        try:
            con.execute("BEGIN")
            catalog.insert_plan_blocks(con, plan.plan_id, pa.Table.from_pylist(block_rows), pa.concat_tables(row_parts))
            con.execute("UPDATE plans SET total_rows = total_rows + ? WHERE plan_id = ?", [added, plan.plan_id])
            live_state.save(con, plan.plan_id, after, read)  # in the same transaction: the state follows the plan
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return _load_plan(con, plan.plan_id)

    def _write_live_state(self, con: duckdb.DuckDBPyConnection, plan_id: str, state: "live_state.LiveState",
                          counts: pa.Table) -> None:
        try:
            con.execute("BEGIN")
            live_state.save(con, plan_id, state, counts)
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise

    def live_pending(self, plan: BlockPlan) -> int:
        """Rows stored but in no block of the (live) plan yet."""
        with self._connect(write=False) as con:
            stored = int(catalog.scalar(con, "SELECT coalesce(sum(rows), 0) FROM segments"))
        return stored - plan.total_rows

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
            # only the segments holding the blocks' rows are checked and read (a new block: its few new segments)
            held = catalog.segments_holding(con, catalog.plan_offsets(con, plan_id, blocks=(first, last)))
            data = {c: np.zeros(0) for c in ("user", "item", "ts", "weight", "block", "split")} if not held else con.sql(
                'SELECT s."user", s.item, s.ts, s.weight, p.block, p.split '
                'FROM plan_rows p JOIN read_parquet(?) s ON s."offset" = p."offset" '
                'WHERE p.plan_id = ? AND p.block BETWEEN ? AND ? ORDER BY s.ts, s."offset"',
                params=[check_segments(self.root, held), plan_id, first, last],
            ).fetchnumpy()
            info = plan.blocks[last]
            graph = read_item_graph(con, info.num_items)  # item knowledge, if any was ingested (stream/kg.py)
            rationales = read_item_rationales(con, info.num_items, graph)  # its texts per item (stream/rationale.py)
            # the missing-at-random labelled sample collected by the block's end, if any (stream/labelled.py)
            labelled = read_labelled(con, info.num_users, info.num_items, info.ts_end)
        return Interactions(
            users=np.asarray(data["user"], dtype=np.int64), items=np.asarray(data["item"], dtype=np.int64),
            ts=np.asarray(data["ts"], dtype=np.int64), weight=np.asarray(data["weight"], dtype=np.float32),
            block=np.asarray(data["block"], dtype=np.int32), split=np.asarray(data["split"], dtype=np.int8),
            num_users=info.num_users, num_items=info.num_items,
            meta={"plan_id": plan_id, "blocks": (first, last), **({"item_graph": graph} if graph is not None else {}),
                  **({"item_rationales": rationales} if rationales is not None else {}),
                  **({"labelled": labelled} if labelled is not None else {})},
        )

    # --- inspection ------------------------------------------------------------------------

    def status(self) -> dict:
        with self._connect(write=False) as con:
            segments = [
                dict(zip(("id", "source", "rows", "ts_min", "ts_max", "content_hash"), r))
                for r in con.sql("SELECT segment_id, source, rows, ts_min, ts_max, content_hash "
                                 "FROM segments ORDER BY segment_id").fetchall()
            ]
            records = catalog.segment_records(con)
            for seg, rec in zip(segments, records):  # the cheap checks (size, rows) on every status
                seg["path"], seg["problem"] = rec.path, segment_problem(self.root, rec)
            by_reason = dict(con.sql("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())
            plan_ids = [p for (p,) in con.sql("SELECT plan_id FROM plans ORDER BY created_at, plan_id").fetchall()]
            plans = [_load_plan(con, p) for p in plan_ids]
            users, items = catalog.count_ids(con, "user"), catalog.count_ids(con, "item")
            ingests = int(catalog.scalar(con, "SELECT count(*) FROM ingests"))
        s_rows = sum(s["rows"] for s in segments)
        return {
            "root": str(self.root),
            "segments": segments,
            "users": users,
            "items": items,
            "rows": sum(s["rows"] for s in segments),
            "ingests": ingests,
            "quarantine": {r: int(by_reason[r]) for r in REASONS if r in by_reason},
            "plans": [dict(dataclasses.asdict(p), num_blocks=p.num_blocks, late_rows=sum(b.late for b in p.blocks),
                           pending_rows=s_rows - p.total_rows if p.is_live else None) for p in plans],
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


@contextmanager
def _work_folder(root: Path) -> Iterator[Path]:
    """A private folder for one ingest's work files under ROOT/.staging/, flock'd while it is in use (so
    another ingest removes only folders whose owner died) and removed when the ingest ends."""
    folder = root / STAGING_DIR / uuid.uuid4().hex
    try:
        folder.mkdir(parents=True)
        lock = open(folder / "lock", "w")
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise CkdError(f"Cannot ingest into {root}: cannot create the work folder {folder.parent} "
                       f"({e.strerror or e}); free space or make the store writable.") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder
    finally:
        lock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _remove_dead_work_folders(root: Path) -> None:
    """Work folders of ingests that died (their flock is free); called under the catalog's write lock."""
    base = root / STAGING_DIR
    for folder in base.iterdir() if base.is_dir() else []:
        try:
            with open(folder / "lock", "r") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, FileNotFoundError, NotADirectoryError):
            continue  # in use, or being created / removed right now
        shutil.rmtree(folder, ignore_errors=True)


def _stage(batches, cols: dict[str, str], source: str, staging: Path) -> int:
    try:
        rows = stage_batches(batches, cols, source, staging)
    except OSError as e:
        raise CkdError(f"Cannot ingest {source}: writing its validated rows to {staging.parent} failed "
                       f"({e.strerror or e}); free space or make the store writable, then ingest again "
                       f"(nothing was added to the store).") from None
    if rows == 0:
        raise CkdError(f"Cannot ingest {source}: the file has a header but no data rows.")
    return rows


def _sql_path(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _tune(con: duckdb.DuckDBPyConnection, work: Path) -> None:
    """Bound DuckDB's memory for the ingest's joins and sorts; beyond it they spill to the work folder."""
    con.execute(f"SET memory_limit = '{INGEST_MEMORY_LIMIT}'")
    con.execute(f"SET threads = {INGEST_THREADS}")
    con.execute(f"SET temp_directory = {_sql_path(work / 'spill')}")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")


def _duplicate_candidates(con: duckdb.DuckDBPyConnection, root: Path, staging: Path,
                          below: int | None = None) -> list[SegmentRecord]:
    """The stored segments (id < ``below`` if given) that share an hour with the staged rows valid so far: the
    only ones that can hold a copy of one of them. Segments without recorded hours get them first (once)."""
    segment_hours.ensure(con, root, below)
    hours = con.sql(f"SELECT DISTINCT ts // {segment_hours.HOUR_S} AS hour FROM read_parquet(?) WHERE reason = {OK}",
                    params=[str(staging)]).fetchnumpy()["hour"]
    return segment_hours.candidates(con, np.asarray(hours, np.int64), below)


def _classify(con: duckdb.DuckDBPyConnection, staging: Path, classified: Path, stored: list[str]) -> None:
    """Write ``classified``: per staged row its final reason (row-local; else the second and later copies
    of a valid (user, item, ts, weight) are DUPLICATE; else a copy of a row in ``stored`` segments is
    STORED_DUPLICATE; else OK) and the dense ids already known (``ud`` / ``iid``, NULL for new ids)."""
    if stored:
        stored_sql = (f"SELECT DISTINCT k.rn FROM known k JOIN read_parquet([{', '.join(map(_sql_path, stored))}]) g "
                      f'ON g."user" = k.ud AND g.item = k.iid AND g.ts = k.ts AND g.weight = k.weight '
                      f"WHERE k.reason = {OK} AND k.copy = 1")
    else:
        stored_sql = "SELECT NULL::BIGINT AS rn WHERE false"
    # copy: 1 for the first of identical valid rows (in input order), 2, 3, … for the later ones
    con.execute(f"""
        COPY (
            WITH s AS (
                SELECT rn, "user", item, ts, weight, reason,
                       CASE WHEN reason = {OK} THEN row_number() OVER (
                           PARTITION BY reason, "user", item, ts, weight ORDER BY rn) END AS copy
                FROM read_parquet({_sql_path(staging)})),
            known AS (
                SELECT s.*, u.dense_id AS ud, i.dense_id AS iid FROM s
                LEFT JOIN users u ON u.external_id = s."user"
                LEFT JOIN items i ON i.external_id = s.item),
            stored AS ({stored_sql})
            SELECT k.rn, k."user", k.item, k.ts, k.weight, k.ud, k.iid,
                   CAST(CASE WHEN k.reason <> {OK} THEN k.reason
                             WHEN k.copy > 1 THEN {REASONS.index(DUPLICATE)}
                             WHEN st.rn IS NOT NULL THEN {REASONS.index(STORED_DUPLICATE)}
                             ELSE {OK} END AS TINYINT) AS reason
            FROM known k LEFT JOIN stored st ON st.rn = k.rn
        ) TO {_sql_path(classified)} (FORMAT parquet, COMPRESSION lz4, ROW_GROUP_SIZE 32768)""")


def _reason_counts(con: duckdb.DuckDBPyConnection, classified: Path) -> dict[int, int]:
    rows = con.sql("SELECT reason, count(*) FROM read_parquet(?) GROUP BY reason", params=[str(classified)]).fetchall()
    return {int(r): int(n) for r, n in rows}


def _insert_new_ids(con: duckdb.DuckDBPyConnection, kind: str, classified: Path, first_dense: int) -> None:
    """Dense ids for the taken rows' unknown ids, in order of first appearance in time (ts, then row)."""
    column, dense = ("user", "ud") if kind == "user" else ("item", "iid")
    con.execute(
        f'INSERT INTO {catalog.id_table(kind)} SELECT ? + row_number() OVER (ORDER BY first) - 1, "{column}" '
        f'FROM (SELECT "{column}", min((ts, rn)) AS first FROM read_parquet(?) WHERE reason = {OK} AND {dense} IS NULL '
        f'GROUP BY "{column}")', [first_dense, str(classified)])


def _segment_rows(con: duckdb.DuckDBPyConnection, classified: Path) -> Iterator[pa.RecordBatch]:
    """The taken rows in input order with dense ids (new ones included): what the segment stores."""
    reader = con.sql(
        'SELECT u.dense_id AS "user", i.dense_id AS item, c.ts, c.weight FROM read_parquet(?) c '
        'JOIN users u ON u.external_id = c."user" JOIN items i ON i.external_id = c.item '
        f'WHERE c.reason = {OK} ORDER BY c.rn', params=[str(classified)]).to_arrow_reader(1 << 16)
    yield from reader


_rollback = catalog.rollback  # ROLLBACK, quietly when no transaction is open


def _cursor(plan: BlockPlan) -> Cursor:
    last = plan.blocks[-1] if plan.blocks else None
    return Cursor(plan.num_blocks, None if last is None else last.bound_end)


def _needs(policy: LivePolicy, cursor: Cursor, pending: int) -> str:
    """What completes the next block of a live plan, in words."""
    end = next_window_end(policy, cursor)
    if end is not None:
        return f"data at or after {datetime.fromtimestamp(end, timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} UTC"
    if not pending:
        return "data"
    if policy.rows is not None and (cursor.blocks > 0 or policy.base_fraction is None):
        return f"{max(policy.rows - pending, 1):,} more rows"
    return "data past the first window"


def _load_plan(con: duckdb.DuckDBPyConnection, plan_id: str) -> BlockPlan | None:
    rows = con.sql("SELECT base_fraction, incremental, split_train, split_valid, split_test, split_holdout, seed, "
                   "total_rows, policy FROM plans WHERE plan_id = ?", params=[plan_id]).fetchall()
    if not rows:
        return None
    base_fraction, incremental, train, valid, test, holdout, seed, total_rows, policy = rows[0]
    blocks = con.sql("SELECT block, rows, ts_start, ts_end, num_users, num_items, new_users, new_items, "
                     "coalesce(late, 0), bound_start, bound_end "
                     "FROM plan_blocks WHERE plan_id = ? ORDER BY block", params=[plan_id]).fetchall()
    return BlockPlan(plan_id=plan_id, base_fraction=float(base_fraction), incremental=int(incremental),
                     split=catalog.split_of(train, valid, test, holdout), seed=int(seed), total_rows=int(total_rows),
                     blocks=tuple(BlockInfo(*(int(v) for v in b[:9]), *(None if v is None else int(v) for v in b[9:]))
                                  for b in blocks), policy=policy)
