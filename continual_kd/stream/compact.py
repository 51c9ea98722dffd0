"""Retention for a store that lives for months: block digests, segment compaction, a lean catalog.

A block digest is an order-independent fingerprint of a block's rows: per row (offset, user, item, ts,
weight bits, split) two 64-bit mixes, summed modulo 2^64, plus the row count. It is pure numpy over
Arrow batches (no DuckDB hash, whose values may change between versions), so a digest recorded at
commit time can be checked years later. Equal multisets of rows give equal digests.

``compact_store`` merges runs of consecutive small segments into larger ones:

1. (compaction lock ``ROOT/.compact.lock``; no catalog lock) every committed block without a digest gets
   one; the run's segment files are checked (size, rows, sha256) and streamed into one new file under
   ``ROOT/.compact/``, which keeps every row's offset; the digest of the old rows must equal the new file's.
2. (catalog write lock, milliseconds) the new files are renamed into ``segments/`` and, in one transaction,
   each run's rows in ``segments`` become one row (the last member's id), its ingests point at it and its
   ``segment_hours`` (what an ingest's duplicate check reads, stream/segment_hours.py) are the new file's;
   after the commit the old files are deleted (no reader can be mid-read: readers hold the catalog lock).
3. every committed block's digest is recomputed from the catalog and must equal the recorded one.

A crash in 1 leaves the store untouched (the work folder is cleared by the next run); in 2 before the
commit, the renamed files are unrecorded and removed by the next compaction or ingest; after it, the old
files are unrecorded and removed likewise. A re-run finishes the work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from continual_kd.checksums import fsync_dir
from continual_kd.errors import CkdError
from continual_kd.stream import catalog, segment_hours
from continual_kd.stream.segments import check_segments, write_segment

DIGEST_VERSION = "r1"
COMPACT_DIR = ".compact"
COMPACT_LOCK = ".compact.lock"
TARGET_ROWS = 1_000_000  # rows of a compacted segment (≈ 8-12 MB of Parquet)
COMPACTED = "compacted:"  # prefix of a compacted segment's source

_SEEDS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on every element (uint64 arithmetic wraps)."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


class RowDigest:
    """Order-independent digest of rows fed in Arrow batches (columns offset, user, item, ts, weight[, split])."""

    def __init__(self) -> None:
        self.rows = 0
        self.sums = [0, 0]

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        n = batch.num_rows
        if not n:
            return
        col = batch.column
        fields = [np.asarray(col("offset"), np.int64).view(np.uint64),
                  np.asarray(col("user"), np.int64).view(np.uint64),
                  np.asarray(col("item"), np.int64).view(np.uint64),
                  np.asarray(col("ts"), np.int64).view(np.uint64),
                  np.asarray(col("weight"), np.float32).view(np.uint32).astype(np.uint64)]
        if "split" in batch.schema.names:
            fields.append(np.asarray(col("split"), np.int64).view(np.uint64))
        for lane, seed in enumerate(_SEEDS):
            h = np.full(n, seed, np.uint64)
            for f in fields:
                h = _mix(h ^ f)
            self.sums[lane] = (self.sums[lane] + int(h.sum(dtype=np.uint64))) % (1 << 64)
        self.rows += n

    @property
    def text(self) -> str:
        return f"{DIGEST_VERSION}:{self.rows}:{self.sums[0]:016x}{self.sums[1]:016x}"


# --- block digests -------------------------------------------------------------------------

def block_digest(con, root: Path, plan_id: str, block: int) -> RowDigest:
    """The digest of block ``block`` of ``plan_id`` as ``read_block`` reads it (rows, splits), from the
    segments the catalog names now; only the segments holding the block's offsets are read."""
    records = catalog.segments_holding(con, catalog.plan_offsets(con, plan_id, blocks=(block, block)))
    digest = RowDigest()
    if not records:
        return digest
    reader = con.sql(
        'SELECT s."offset", s."user", s.item, s.ts, s.weight, p.split FROM plan_rows p '
        'JOIN read_parquet(?) s ON s."offset" = p."offset" WHERE p.plan_id = ? AND p.block = ?',
        params=[check_segments(root, records), plan_id, block]).to_arrow_reader(1 << 17)
    for batch in reader:
        digest.add(batch)
    return digest


def plan_digests(con, root: Path, plan_id: str, blocks: list[int]) -> dict[int, RowDigest]:
    """The digests of several blocks of one plan in one pass over its rows (what ``block_digest`` gives each)."""
    digests = {int(b): RowDigest() for b in blocks}
    if not digests:
        return digests
    wanted = pa.table({"block": pa.array(sorted(digests), pa.int32())})
    with catalog.registered(con, "_ckd_digest_blocks", wanted):
        reader = con.sql(
            'SELECT p.block, s."offset", s."user", s.item, s.ts, s.weight, p.split FROM plan_rows p '
            'JOIN read_parquet(?) s ON s."offset" = p."offset" WHERE p.plan_id = ? '
            'AND p.block IN (SELECT block FROM _ckd_digest_blocks)',
            params=[check_segments(root, catalog.segment_records(con)), plan_id]).to_arrow_reader(1 << 17)
        for batch in reader:
            block = np.asarray(batch.column("block"))
            for b in np.unique(block):  # a loop over the blocks in the batch, not over rows
                digests[int(b)].add(batch.filter(pa.array(block == b)))
    return digests


def _digests_by_plan(con, root: Path, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], RowDigest]:
    by_plan: dict[str, list[int]] = {}
    for p, b in pairs:
        by_plan.setdefault(p, []).append(b)
    return {(p, b): d for p, blocks in by_plan.items() for b, d in plan_digests(con, root, p, blocks).items()}


def committed_without_digest(con) -> list[tuple[str, int]]:
    """(plan, block) of active commits whose block has no recorded digest."""
    return [(p, int(b)) for p, b in con.sql(
        "SELECT DISTINCT c.plan_id, c.block FROM commits c WHERE c.revoked_at IS NULL AND NOT EXISTS "
        "(SELECT 1 FROM block_digests d WHERE d.plan_id = c.plan_id AND d.block = c.block) "
        "ORDER BY c.plan_id, c.block").fetchall()]


def record_digest(con, plan_id: str, block: int, digest: RowDigest) -> None:
    """Insert the digest unless one is recorded (call inside the writer's transaction)."""
    if digest.rows:
        con.execute("INSERT INTO block_digests SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM block_digests "
                    "WHERE plan_id = ? AND block = ?)",
                    [plan_id, block, digest.rows, digest.text, catalog.now_utc(), plan_id, block])


def record_missing_digests(store) -> int:
    """Digests for the committed blocks that have none (commits made before digests existed). → how many."""
    with store._connect(write=False) as con:
        missing = committed_without_digest(con)
        digests = [(p, b, d) for (p, b), d in _digests_by_plan(con, store.root, missing).items()]
    if digests:
        with store._connect(write=True) as con:
            con.execute("BEGIN")
            try:
                for p, b, d in digests:
                    record_digest(con, p, b, d)
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
    return len(digests)


def verify_block_digests(store) -> int:
    """Recompute every active committed block's digest and compare it with the recorded one; the first that
    differs raises a CkdError naming it. → number of blocks verified."""
    with store._connect(write=False) as con:
        if "block_digests" not in {t for (t,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}:
            return 0
        recorded = con.sql("SELECT DISTINCT d.plan_id, d.block, d.digest FROM block_digests d JOIN commits c ON "
                           "c.plan_id = d.plan_id AND c.block = d.block AND c.revoked_at IS NULL "
                           "ORDER BY d.plan_id, d.block").fetchall()
        now_all = _digests_by_plan(con, store.root, [(p, int(b)) for p, b, _ in recorded])
        for plan_id, block, digest in recorded:
            now = now_all[(plan_id, int(block))].text
            if now != digest:
                raise CkdError(f"Block {block} of plan {plan_id} in the stream store {store.root} no longer reads the "
                               f"rows it was committed with (digest {now}, recorded {digest}); restore the store "
                               f"from a backup.")
    return len(recorded)


# --- segment compaction --------------------------------------------------------------------

@dataclass
class CompactionReport:
    root: str
    segments_before: int = 0
    segments_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rows: int = 0
    runs: list[dict] = field(default_factory=list)  # per merged run: ids, rows, new path, row digest
    digests_recorded: int = 0  # committed blocks that had none (commits made before digests existed)
    blocks_verified: int = 0  # committed blocks whose digest was recomputed after the swap and matched
    results_index_dropped: bool = False  # an older catalog's block_results primary key removed (catalog size)
    catalog_bytes_before: int = 0
    catalog_bytes_after: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Segment:
    segment_id: int
    path: str
    content_hash: str
    source: str
    rows: int
    first_offset: int
    ts_min: int
    ts_max: int
    file_bytes: int | None
    file_sha256: str | None


def plan_runs(segments: list[_Segment], target_rows: int) -> list[list[_Segment]]:
    """Runs of ≥ 2 consecutive segments (contiguous offsets) whose rows together stay within ``target_rows``;
    a segment already half the target or more stays as it is."""
    runs, run = [], []
    for seg in segments:
        small = seg.rows < target_rows // 2
        fits = run and sum(s.rows for s in run) + seg.rows <= target_rows \
            and run[-1].first_offset + run[-1].rows == seg.first_offset
        if small and fits:
            run.append(seg)
            continue
        if len(run) > 1:
            runs.append(run)
        run = [seg] if small else []
    if len(run) > 1:
        runs.append(run)
    return runs


def compact_store(store, target_rows: int = TARGET_ROWS) -> CompactionReport:
    """Merge small segments (see the module doc); → what it did. Every committed block reads the same rows
    before and after, proven by its digest."""
    from continual_kd.locks import store_lock  # noqa: PLC0415 (locks is a top-level module)
    from continual_kd.stream.store import SEGMENTS_DIR  # noqa: PLC0415 (store imports this module)

    if target_rows < 2:
        raise CkdError(f"--target-rows {target_rows}: a compacted segment needs at least 2 rows; give e.g. 1000000.")
    start = time.monotonic()
    root = store.root
    report = CompactionReport(root=str(root))
    report.catalog_bytes_before = _catalog_bytes(root)
    with store_lock(root, COMPACT_LOCK, f"A compaction of the stream store {root}", "run `ckd compact` again"):
        work = root / COMPACT_DIR
        shutil.rmtree(work, ignore_errors=True)  # a crashed compaction's files: never recorded anywhere
        work.mkdir()
        try:
            report.digests_recorded = record_missing_digests(store)
            with store._connect(write=False) as con:
                before = _segments(con)
            report.segments_before, report.rows = len(before), sum(s.rows for s in before)
            report.bytes_before = sum(s.file_bytes or 0 for s in before)
            runs = plan_runs(before, target_rows)
            merged = [_merge_run(root, work, run) for run in runs]
            _failpoint("compact:written")
            with store._connect(write=True) as con:
                _swap(store, con, root / SEGMENTS_DIR, work, runs, merged, report)
            with store._connect(write=False) as con:
                after = _segments(con)
            report.segments_after = len(after)
            report.bytes_after = sum(s.file_bytes or 0 for s in after)
            report.blocks_verified = verify_block_digests(store)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report.catalog_bytes_after = _catalog_bytes(root)
    report.seconds = time.monotonic() - start
    return report


def _merge_run(root: Path, work: Path, run: list[_Segment]) -> dict:
    """One new file in ``work`` holding the run's rows with their offsets; its rows' digest must equal the old
    files' (checked whole: size, rows, sha256, before anything is read)."""
    files = check_segments(root, [_record(s) for s in run], checksum=True)
    old = RowDigest()
    hours = [np.zeros(0, np.int64)]

    def batches():
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1 << 16):
                old.add(batch)
                hours.append(segment_hours.hours_of(np.asarray(batch.column("ts"))))
                yield batch

    key = hashlib.sha256(",".join(s.file_sha256 or s.path for s in run).encode()).hexdigest()
    name = f"seg-{run[-1].segment_id:06d}-c{key[:11]}.parquet"
    written = write_segment(work, work / name, batches(), run[0].first_offset)
    new = RowDigest()
    for batch in pq.ParquetFile(work / name).iter_batches(batch_size=1 << 16):
        new.add(batch)
    if new.text != old.text or written.rows != sum(s.rows for s in run):
        raise CkdError(f"Compacting segments {run[0].segment_id}-{run[-1].segment_id} of {root} gave other rows "
                       f"(digest {new.text}, expected {old.text}); nothing was changed; report this as a bug.")
    content = hashlib.sha256(",".join(s.content_hash for s in run).encode()).hexdigest()
    return {"ids": [s.segment_id for s in run], "name": name, "rows": written.rows, "ts_min": written.ts_min,
            "ts_max": written.ts_max, "file_bytes": written.file_bytes, "file_sha256": written.file_sha256,
            "content_hash": content, "digest": new.text, "hours": np.unique(np.concatenate(hours)),
            "source": f"{COMPACTED} segments {run[0].segment_id}-{run[-1].segment_id} ({len(run)} ingests)"}


def _swap(store, con, segments_dir: Path, work: Path, runs: list[list[_Segment]], merged: list[dict],
          report: CompactionReport) -> None:
    """Under the catalog's write lock: new files in place, one transaction, then the old files removed."""
    now = {s.segment_id: s for s in _segments(con)}
    if any(now.get(s.segment_id) != s for run in runs for s in run):
        raise CkdError(f"The segments of {store.root} changed while they were compacted; nothing was changed; "
                       f"run `ckd compact` again.")
    store._remove_unrecorded_segments(con)  # leftovers of a crashed writer (an earlier compaction's too)
    for m in merged:
        os.replace(work / m["name"], segments_dir / m["name"])
    fsync_dir(segments_dir)
    _failpoint("compact:renamed")
    con.execute("BEGIN")
    try:
        for run, m in zip(runs, merged):
            # the run's last id: ids keep the order of offsets and the next ingest's id (max + 1) is never reused
            keep, rest = run[-1].segment_id, [s.segment_id for s in run[:-1]]
            con.execute("UPDATE segments SET path = ?, content_hash = ?, source = ?, rows = ?, first_offset = ?, "
                        "ts_min = ?, ts_max = ?, created_at = ?, file_bytes = ?, file_sha256 = ? WHERE segment_id = ?",
                        [f"{segments_dir.name}/{m['name']}", m["content_hash"], m["source"], m["rows"],
                         run[0].first_offset, m["ts_min"], m["ts_max"], catalog.now_utc(), m["file_bytes"],
                         m["file_sha256"], keep])
            con.execute("DELETE FROM segments WHERE segment_id IN (SELECT unnest(?::INTEGER[]))", [rest])
            con.execute("UPDATE ingests SET segment_id = ? WHERE segment_id IN (SELECT unnest(?::INTEGER[]))",
                        [keep, rest])
            segment_hours.replace(con, [s.segment_id for s in run], keep, run[0].first_offset, m["rows"], m["hours"])
            report.runs.append({"segments": m["ids"], "rows": m["rows"], "path": f"{segments_dir.name}/{m['name']}",
                                "file_bytes": m["file_bytes"], "digest": m["digest"]})
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        for m in merged:
            (segments_dir / m["name"]).unlink(missing_ok=True)
        raise
    _failpoint("compact:committed")
    for run in runs:
        for s in run:
            (segments_dir.parent / s.path).unlink(missing_ok=True)
    fsync_dir(segments_dir)
    report.results_index_dropped = drop_results_index(con)


def drop_results_index(con) -> bool:
    """Rebuild an older catalog's ``block_results`` without its primary key (its index grew ~13 KB per block);
    one transaction. → whether there was one."""
    has_key = catalog.scalar(con, "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'block_results' "
                                  "AND constraint_type = 'PRIMARY KEY'")
    if not has_key:
        return False
    con.execute("BEGIN")
    try:
        con.execute("CREATE TABLE block_results_lean (commit_id INTEGER NOT NULL, job VARCHAR NOT NULL, "
                    "lineage VARCHAR NOT NULL, block INTEGER NOT NULL, model VARCHAR NOT NULL, metric VARCHAR NOT NULL, "
                    "value DOUBLE)")
        con.execute("INSERT INTO block_results_lean SELECT commit_id, job, lineage, block, model, metric, value "
                    "FROM block_results ORDER BY commit_id, model, metric")
        con.execute("DROP VIEW IF EXISTS results")
        con.execute("DROP TABLE block_results")
        con.execute("ALTER TABLE block_results_lean RENAME TO block_results")
        con.execute("CREATE VIEW results AS SELECT r.job, r.lineage, r.block, r.model, r.metric, r.value FROM "
                    "block_results r JOIN commits c ON c.commit_id = r.commit_id WHERE c.revoked_at IS NULL")
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise
    con.execute("CHECKPOINT")
    return True


def _segments(con) -> list[_Segment]:
    return [_Segment(int(i), p, h, src, int(n), int(f), int(a), int(b), None if fb is None else int(fb), sha)
            for i, p, h, src, n, f, a, b, fb, sha in con.sql(
                "SELECT segment_id, path, content_hash, source, rows, first_offset, ts_min, ts_max, file_bytes, "
                "file_sha256 FROM segments ORDER BY segment_id").fetchall()]


def _record(s: _Segment):
    from continual_kd.stream.segments import SegmentRecord

    return SegmentRecord(s.segment_id, s.path, s.source, s.rows, s.file_bytes, s.file_sha256)


def _catalog_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / catalog.CATALOG_FILE, root / (catalog.CATALOG_FILE + ".wal"))
               if p.exists())


def _failpoint(point: str) -> None:
    """Fault injection for tests: ``CKD_FAILPOINT=compact:written|compact:renamed|compact:committed`` SIGKILLs
    this process there (new files written / renamed into segments/, not committed / committed, old files kept)."""
    if os.environ.get("CKD_FAILPOINT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


_rollback = catalog.rollback  # ROLLBACK, quietly when no transaction is open
