"""Retention (issue 10, item 5): `ckd compact` merges small segments without changing a committed block's
rows (its digest proves it), survives a crash at any point, respects the locks, and keeps the catalog lean.

One store is built once (12 small ingests, a live plan of 60-row blocks advanced and committed after each
ingest, and a research plan) and copied for each test. Real DuckDB catalogs and Parquet files throughout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from continual_kd.stream import StreamStore
from continual_kd.stream.compact import RowDigest, _Segment, compact_store, plan_runs
from continual_kd.stream.ingest import STORED_DUPLICATE
from continual_kd.stream.live import LivePolicy

INGESTS, ROWS = 12, 25  # 12 segments of 25 rows
POLICY = LivePolicy(None, 60, None, None, (0.8, 0.1, 0.1), 0)
T0 = 1_600_000_000
RESULTS = {"student": {"ndcg@20": 0.25, "recall@20": None}, "teacher:mf": {"ndcg@20": 0.5}}


def _rows(i: int) -> pa.Table:
    rng = np.random.default_rng(i)
    return pa.table({"user": [f"u{x}" for x in rng.integers(0, 15, ROWS)],
                     "item": [f"i{x}" for x in rng.integers(0, 20, ROWS)],
                     "timestamp": T0 + i * 1000 + np.sort(rng.integers(0, 1000, ROWS)),
                     "rating": rng.integers(1, 6, ROWS).astype(np.float32)})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compaction") / "store"
    store = StreamStore.open(root, create=True)
    committed = 0
    for i in range(INGESTS):
        store.ingest_table(_rows(i), f"hour-{i}")
        plan, _ = store.advance_live_plan(POLICY)
        for k in range(committed, plan.num_blocks):
            store.commit_block("live", "lineage", plan.plan_id, k, 0, f"runs/live/block-{k:04d}", "d" * 64, RESULTS)
        committed = plan.num_blocks
    research = store.ensure_plan(0.5, 2, seed=3)
    for k in range(research.num_blocks):
        store.commit_block("research", "lin2", research.plan_id, k, 0, f"runs/r/block-{k:04d}", "e" * 64)
    assert committed == INGESTS * ROWS // 60  # 5 blocks of 60 rows; 0 pending
    return root


@pytest.fixture
def store_dir(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "store")
    return tmp_path / "store"


def _blocks(store: StreamStore) -> dict:
    """Every block of every plan, as read_block returns it."""
    out = {}
    for p in store.status()["plans"]:
        for b in range(p["num_blocks"]):
            x = store.read_block(p["plan_id"], b)
            out[(p["plan_id"], b)] = (x.users, x.items, x.ts, x.weight, x.split, x.block)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(np.array_equal(u, v) for u, v in zip(a[k], b[k])) for k in a)


def _digests(root: Path) -> dict:
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        return {(p, b): d for p, b, d in con.sql("SELECT plan_id, block, digest FROM block_digests").fetchall()}


def _segment_files(root: Path) -> list[str]:
    return sorted(f.name for f in (root / "segments").iterdir())


def _ckd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "continual_kd.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=120)


# --- the digest ------------------------------------------------------------------------------

def _reference_digest(rows: list[tuple]) -> str:
    """The digest rule written out in plain Python, one row at a time (offset, user, item, ts, weight bits, split)."""
    mask = (1 << 64) - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    sums = [0, 0]
    for lane, seed in enumerate((0x9E3779B97F4A7C15, 0xD1B54A32D192ED03)):
        for row in rows:
            h = seed
            for v in row:
                h = mix(h ^ v)
            sums[lane] = (sums[lane] + h) & mask
    return f"r1:{len(rows)}:{sums[0]:016x}{sums[1]:016x}"


def test_block_digest_is_the_rule_order_free_and_sees_a_changed_value():
    table = pa.table({"offset": pa.array([7, 8, 9], pa.int64()), "user": pa.array([1, 2, 1], pa.int32()),
                      "item": pa.array([3, 3, 4], pa.int32()), "ts": pa.array([100, 101, 102], pa.int64()),
                      "weight": pa.array([1.0, 2.5, 1.0], pa.float32()), "split": pa.array([0, 1, 2], pa.int8())})
    bits = {1.0: 0x3F800000, 2.5: 0x40200000}  # IEEE-754 float32
    expected = _reference_digest([(7, 1, 3, 100, bits[1.0], 0), (8, 2, 3, 101, bits[2.5], 1), (9, 1, 4, 102, bits[1.0], 2)])
    d = RowDigest()
    d.add(table)
    assert d.text == expected
    shuffled = RowDigest()
    shuffled.add(table.take([2, 0]))
    shuffled.add(table.take([1]))
    assert shuffled.text == expected
    changed = RowDigest()
    changed.add(table.set_column(4, "weight", pa.array([1.0, 2.5, 1.5], pa.float32())))
    assert changed.text != expected and changed.text.startswith("r1:3:")


def test_runs_are_consecutive_small_segments_within_the_target():
    segs = [_Segment(i, f"s{i}", "h", "src", n, off, 0, 0, 1, "x")
            for i, (n, off) in enumerate([(10, 0), (10, 10), (10, 20), (50, 30), (10, 80), (10, 90), (10, 105)], 1)]
    runs = plan_runs(segs, 40)
    # 1-3 merge (30 rows), 4 is half the target or more, 5-6 merge, 7 does not follow 6 (offset gap)
    assert [[s.segment_id for s in r] for r in runs] == [[1, 2, 3], [5, 6]]
    assert [[s.segment_id for s in r] for r in plan_runs(segs, 25)] == [[1, 2], [5, 6]]


# --- compaction --------------------------------------------------------------------------------

def test_compaction_keeps_every_block_and_its_digest_and_merges_segments(store_dir, cli):
    store = StreamStore.open(store_dir)
    before, digests = _blocks(store), _digests(store_dir)
    plan_ids = [p["plan_id"] for p in store.status()["plans"]]
    assert len(digests) == 5 + 3  # every committed block got its digest at commit time
    assert len(_segment_files(store_dir)) == INGESTS

    r = cli("compact", "--store", store_dir, "--target-rows", 200)
    assert r.exit_code == 0, r.output
    # 12 × 25 rows, target 200: segments 1-8 (200 rows, kept as id 8) and 9-12 (100 rows, id 12)
    assert "12 → 2 segments" in r.output and "verified 8 committed blocks" in r.output, r.output
    store = StreamStore.open(store_dir)
    segs = store.status()["segments"]
    assert [(s["id"], s["rows"]) for s in segs] == [(8, 200), (12, 100)]
    assert len(_segment_files(store_dir)) == 2 and not (store_dir / ".compact").exists()
    assert _same(before, _blocks(store)) and _digests(store_dir) == digests
    assert store.verify_segments() == 2
    # the research plan keeps its id (plans name the ingests, not the segments)
    assert store.ensure_plan(0.5, 2, seed=3).plan_id in plan_ids and len(store.status()["plans"]) == 2
    # the store goes on: a stored row is still a duplicate, new rows get the next offsets and a new block
    again = store.ingest_table(pa.concat_tables([_rows(3).slice(0, 1), _rows(20)]), "late-file")
    assert again.reasons == {STORED_DUPLICATE: 1} and again.rows_taken == ROWS
    plan, _ = store.advance_live_plan(POLICY, flush=True)
    assert plan.num_blocks == 6 and store.read_block(plan.plan_id, 5).users.size == ROWS
    with duckdb.connect(str(store_dir / "catalog.duckdb"), read_only=True) as con:
        assert con.sql('SELECT min("offset"), max("offset") FROM read_parquet(?)',
                       params=[str(store_dir / segs[0]["path"])]).fetchall() == [(0, 199)]
    r = cli("status", "--store", store_dir, "--verify", "--runs", store_dir / "none")
    assert r.exit_code == 0 and "verified 8 committed blocks" in r.output, r.output
    with duckdb.connect(str(store_dir / "catalog.duckdb"), read_only=True) as con:  # every table's every row read
        tables = [t for (t,) in con.sql("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_type = 'BASE TABLE'").fetchall()]
        total = sum(con.sql(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables)
    assert f"verified the catalog: {total:,} rows read" in r.output
    # the new ingest took id 13 (never a merged-away id); a larger target merges all three
    report = compact_store(StreamStore.open(store_dir), 1000)
    assert (report.segments_before, report.segments_after, report.rows) == (3, 1, 325)
    assert [r["segments"] for r in report.runs] == [[8, 12, 13]] and report.blocks_verified == 8
    assert _same({k: v for k, v in _blocks(store).items() if k in before}, before)


@pytest.mark.parametrize("point", ["compact:written", "compact:renamed", "compact:committed"])
def test_a_crash_mid_compaction_loses_nothing_and_a_rerun_finishes(store_dir, point, cli):
    before = _blocks(StreamStore.open(store_dir))
    crashed = _ckd("compact", "--store", store_dir, "--target-rows", 200, env={"CKD_FAILPOINT": point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    store = StreamStore.open(store_dir)
    assert _same(before, _blocks(store))  # readers see whole segments, old or new
    assert store.verify_segments() == (2 if point == "compact:committed" else INGESTS)
    assert len(_segment_files(store_dir)) == {"compact:written": 12, "compact:renamed": 14, "compact:committed": 14}[point]
    done = cli("compact", "--store", store_dir, "--target-rows", 200)
    assert done.exit_code == 0 and "verified 8 committed blocks" in done.output, done.output
    assert _segment_files(store_dir) == sorted(Path(s["path"]).name for s in store.status()["segments"])
    assert len(_segment_files(store_dir)) == 2 and _same(before, _blocks(store))
    assert not (store_dir / ".compact").exists()


def test_a_compaction_waits_for_the_catalog_lock_and_refuses_a_second_compaction(store_dir, cli):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, sys, time\n"
        f"con = duckdb.connect({str(store_dir / 'catalog.duckdb')!r})\n"
        "print('held', flush=True); time.sleep(2); con.close(); print('released', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        r = cli("compact", "--store", store_dir, "--target-rows", 200, "--wait", "30s")
        assert r.exit_code == 0 and "12 → 2 segments" in r.output, r.output
        assert time.monotonic() - start > 1.0  # it waited for the ingest-like holder
    finally:
        holder.kill()
        holder.wait()
    lock = store_dir / ".compact.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'{\"pid\": %d, \"host\": \"h\", \"since\": \"now\"}' % os.getpid())\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("compact", "--store", store_dir)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert f"process pid {holder.pid}" in r.output and "run `ckd compact` again" in r.output
    finally:
        holder.kill()
        holder.wait()


def test_compact_finds_the_store_of_a_job_file_and_refuses_both_or_neither(store_dir, tmp_path, cli):
    job = tmp_path / "job.yaml"
    job.write_text(f"name: j\nsource: {{dataset: store, store: {store_dir}}}\n")
    r = cli("compact", job, "--target-rows", 100000)
    assert r.exit_code == 0 and "12 → 1 segments" in r.output, r.output
    for args in ((), (job, "--store", store_dir)):
        r = cli("compact", *args)
        assert r.exit_code == 2 and "one of the two" in r.output, r.output


# --- the catalog stays small -------------------------------------------------------------------

def test_results_keep_no_index_and_an_older_catalogs_index_is_dropped(store_dir, cli):
    catalog_file = str(store_dir / "catalog.duckdb")
    with duckdb.connect(catalog_file) as con:  # an older store: block_results with its primary key
        keys = "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'block_results' AND constraint_type = 'PRIMARY KEY'"
        assert con.sql(keys).fetchall() == [(0,)]
        con.execute("CREATE TABLE old AS SELECT * FROM block_results; DROP VIEW results; DROP TABLE block_results")
        con.execute("CREATE TABLE block_results (commit_id INTEGER NOT NULL, job VARCHAR NOT NULL, lineage VARCHAR NOT NULL, "
                    "block SMALLINT NOT NULL, model VARCHAR NOT NULL, metric VARCHAR NOT NULL, value DOUBLE, "
                    "PRIMARY KEY (commit_id, model, metric)); INSERT INTO block_results SELECT * FROM old; DROP TABLE old")
        con.execute("CREATE VIEW results AS SELECT r.job, r.lineage, r.block, r.model, r.metric, r.value FROM "
                    "block_results r JOIN commits c ON c.commit_id = r.commit_id WHERE c.revoked_at IS NULL")
        assert con.sql(keys).fetchall() == [(1,)]
    results = StreamStore.open(store_dir).results()
    assert len(results) == 5 * 3  # 5 live blocks × 3 (model, metric) rows; the research commits have none
    r = cli("compact", "--store", store_dir, "--json", store_dir.parent / "c.json")
    assert r.exit_code == 0 and "block_results index" in r.output, r.output
    with duckdb.connect(catalog_file, read_only=True) as con:
        assert con.sql(keys).fetchall() == [(0,)]
    assert StreamStore.open(store_dir).results() == results
    import json

    assert json.loads((store_dir.parent / "c.json").read_text())["results_index_dropped"] is True


def test_status_verify_names_a_block_that_no_longer_reads_its_committed_rows(store_dir, cli):
    with duckdb.connect(str(store_dir / "catalog.duckdb")) as con:
        plan_id = con.sql("SELECT plan_id FROM commits WHERE job = 'live' LIMIT 1").fetchall()[0][0]
        con.execute("UPDATE block_digests SET digest = 'r1:60:0' WHERE plan_id = ? AND block = 2", [plan_id])
    r = cli("status", "--store", store_dir, "--verify", "--runs", store_dir / "none")
    assert r.exit_code == 2 and f"Block 2 of plan {plan_id}" in r.output and "recorded r1:60:0" in r.output, r.output
    r = cli("compact", "--store", store_dir)  # compaction refuses to go on from a store that already differs
    assert r.exit_code == 2 and f"Block 2 of plan {plan_id}" in r.output, r.output
