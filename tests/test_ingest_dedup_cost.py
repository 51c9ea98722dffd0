"""An ingest's check for duplicates of stored rows costs what its rows cost (issues 10 and 12): it reads only the
segments sharing an hour with the new rows (stream/segment_hours.py), and refuses exactly what the old check —
every stored segment read — refused. Also: the catalog's block columns are INTEGER (older SMALLINT catalogs are
widened on open). Real DuckDB catalogs and Parquet segments throughout.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.stream import StreamStore, catalog, segment_hours
from continual_kd.stream.compact import compact_store
from continual_kd.stream.ingest import DUPLICATE, STORED_DUPLICATE
from continual_kd.stream.live import LivePolicy
from continual_kd.stream.segments import READS

DAY = 86400
T0 = 1_600_000_000 // DAY * DAY
DAYS = 30


def day_table(day: int, n: int = 20) -> pa.Table:
    """Day ``day``'s ``n`` rows plus 3 late rows of the day before (so each segment spans two days)."""
    rng = np.random.default_rng(day)
    late = 3 if day else 0
    ts = np.concatenate([T0 + day * DAY + rng.integers(0, DAY, n), T0 + (day - 1) * DAY + rng.integers(0, DAY, late)])
    return pa.table({"user": [f"u{x}" for x in rng.integers(0, 30, n + late)],
                     "item": [f"i{x}" for x in rng.integers(0, 25, n + late)],
                     "timestamp": ts, "rating": rng.integers(1, 6, n + late).astype(np.float32)})


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A store of DAYS daily ingests (one segment each); tests copy it."""
    root = tmp_path_factory.mktemp("dedup") / "store"
    store = StreamStore.open(root, create=True)
    for day in range(DAYS):
        assert store.ingest_table(day_table(day), f"day-{day}").segment_id == day + 1
    return root


@pytest.fixture
def store(history, tmp_path) -> StreamStore:
    import shutil

    shutil.copytree(history, tmp_path / "store")
    return StreamStore.open(tmp_path / "store")


def stored_rows(store: StreamStore) -> set[tuple]:
    """Every stored row as (external user, external item, ts, weight): what the old check compared with."""
    with store._connect(write=False) as con:
        rows = con.sql("SELECT u.external_id, i.external_id, s.ts, s.weight FROM read_parquet(?) s "
                       "JOIN users u ON u.dense_id = s.\"user\" JOIN items i ON i.dense_id = s.item",
                       params=[[str(store.root / p) for (p,) in con.sql("SELECT path FROM segments").fetchall()]]
                       ).fetchall()
    return set(rows)


def old_reasons(store: StreamStore, table: pa.Table) -> list[str | None]:
    """Per row of ``table`` the reason the old check gave (all rows valid here): a repeat of an earlier row of
    the file, else a copy of any stored row, else taken (None)."""
    stored, seen, out = stored_rows(store), set(), []
    for row in zip(*(table.column(c).to_pylist() for c in ("user", "item", "timestamp", "rating"))):
        row = (row[0], row[1], int(row[2]), float(np.float32(row[3])))
        out.append(DUPLICATE if row in seen else STORED_DUPLICATE if row in stored else None)
        seen.add(row)
    return out


def reasons_of(store: StreamStore, report, n: int) -> list[str | None]:
    got: list[str | None] = [None] * n
    for q in store.quarantine(limit=10_000):
        if q["source"] == report.source:
            got[q["row_number"] - 1] = q["reason"]
    return got


def must_read(store: StreamStore, table: pa.Table) -> tuple[int, int]:
    """(files, rows) of the stored segments holding a row in an hour of ``table``'s rows: the only ones that can
    hold a copy of one (read here straight from every file)."""
    hours = set((np.asarray(table.column("timestamp")) // 3600).tolist())
    with store._connect(write=False) as con:
        paths = [store.root / p for (p,) in con.sql("SELECT path FROM segments").fetchall()]
    held = [len(ts) for ts in (pq.read_table(p, columns=["ts"]).column("ts").to_numpy() for p in paths)
            if hours & set((ts // 3600).tolist())]
    return len(held), sum(held)


def ingest_counted(store: StreamStore, table: pa.Table, source: str):
    READS.reset()
    report = store.ingest_table(table, source)
    return report, (READS.files, READS.rows)


def test_a_new_day_reads_only_the_segment_it_overlaps_and_refuses_what_the_old_check_refused(store):
    new = day_table(DAYS)  # today + 3 late rows of yesterday
    old_day3, yesterday = day_table(3), day_table(DAYS - 1)
    copies = pa.table({
        "user": [old_day3["user"][4].as_py(), yesterday["user"][0].as_py(), "fresh", new["user"][1].as_py(),
                 old_day3["user"][4].as_py(), old_day3["user"][4].as_py()],
        "item": [old_day3["item"][4].as_py(), yesterday["item"][0].as_py(), "i1", new["item"][1].as_py(),
                 old_day3["item"][4].as_py(), old_day3["item"][4].as_py()],
        "timestamp": [old_day3["timestamp"][4].as_py(), yesterday["timestamp"][0].as_py(), T0 + DAYS * DAY + 5,
                      new["timestamp"][1].as_py(), old_day3["timestamp"][4].as_py() + 1,
                      old_day3["timestamp"][4].as_py()],
        "rating": pa.array([old_day3["rating"][4].as_py(), yesterday["rating"][0].as_py(), 1.0,
                            new["rating"][1].as_py(), old_day3["rating"][4].as_py(),
                            old_day3["rating"][4].as_py() + 1.0], pa.float32())})
    table = pa.concat_tables([new, copies])
    n = table.num_rows
    expected = old_reasons(store, table)
    # by hand: row 23 copies a day-3 row, 24 a row of yesterday, 26 repeats row 1 of this file; 25 is new,
    # 27 and 28 differ from the day-3 row in ts by a second / in the weight: taken
    assert [i for i, r in enumerate(expected) if r] == [23, 24, 26]
    assert (expected[23], expected[24], expected[26]) == (STORED_DUPLICATE, STORED_DUPLICATE, DUPLICATE)

    must = must_read(store, table)
    report, read = ingest_counted(store, table, "day-new")
    assert reasons_of(store, report, n) == expected
    assert report.rows_taken == n - 3 and report.reasons == {DUPLICATE: 1, STORED_DUPLICATE: 2}
    # read: yesterday's segment (its hours hold the late rows and that copy), day 3's (the copy of its row and
    # the rows one second / one weight off), maybe day 4's (late rows of day 3): never the other 27+ of 30
    assert read == must and 2 <= read[0] <= 3

    table = day_table(DAYS + 1)  # a plain next day: its late rows share hours with the segment just written
    must = must_read(store, table)
    report, read = ingest_counted(store, table, "day-next")
    assert report.rows_taken == 23 and read == must and read[0] <= 1


def test_random_copies_of_old_and_same_file_rows_match_the_old_check(store):
    rng = np.random.default_rng(7)
    for step in range(4):
        parts = [day_table(DAYS + step)]
        past = day_table(int(rng.integers(0, DAYS)))
        pick = rng.choice(past.num_rows, 4, replace=False)
        parts.append(past.take(pa.array(pick)))  # copies of stored rows from a random old day
        parts.append(parts[0].take(pa.array([0, 2])))  # repeats within the file
        table = pa.concat_tables(parts)
        expected = old_reasons(store, table)
        report = store.ingest_table(table, f"mixed-{step}")
        assert reasons_of(store, report, table.num_rows) == expected
        assert report.reasons == {DUPLICATE: 2, STORED_DUPLICATE: 4}


def test_cost_is_flat_in_history(store):
    """The 31st daily ingest reads at most the one segment its late rows' hours overlap, as the 10th did (the old
    check read every stored segment: 30 files)."""
    for day in (10, DAYS):
        shown = must_read(store, day_table(day)) if day == DAYS else None
        if day == 10:  # the 10th ingest's cost, replayed on a store of its first 10 days
            small = StreamStore.open(store.root.parent / "small", create=True)
            for d in range(10):
                small.ingest_table(day_table(d), f"day-{d}")
            shown = must_read(small, day_table(10))
            _, read = ingest_counted(small, day_table(10), "day-10")
        else:
            _, read = ingest_counted(store, day_table(day), f"day-{day}")
        assert read == shown and read[0] <= 1


def hours_table(store: StreamStore) -> list[tuple]:
    with store._connect(write=False) as con:
        return con.sql("SELECT * FROM segment_hours ORDER BY ALL").fetchall()


def test_an_older_store_gets_its_hours_once(store):
    recorded = hours_table(store)
    assert len({r[0] for r in recorded}) == DAYS  # every segment, in the transaction that recorded it
    with duckdb.connect(str(store.root / catalog.CATALOG_FILE)) as con:  # a store made before they were kept
        con.execute("DROP TABLE segment_hours")
    store = StreamStore.open(store.root)
    assert hours_table(store) == []
    table = pa.concat_tables([day_table(DAYS), day_table(5).slice(0, 1)])
    must = must_read(store, table)
    report, (files, _) = ingest_counted(store, table, "day-30")
    assert report.reasons == {STORED_DUPLICATE: 1}
    assert files == DAYS + must[0] and must[0] >= 1  # all once (to derive their hours), then those sharing an hour
    derived = hours_table(store)
    assert [r for r in derived if r[0] <= DAYS] == recorded  # derived = what the ingests recorded
    must = must_read(store, day_table(DAYS + 1))
    assert ingest_counted(store, day_table(DAYS + 1), "day-31")[1] == must and must[0] <= 1


def test_compaction_keeps_the_hours_and_duplicates_are_still_refused(store):
    compact_store(store, target_rows=200)  # runs of up to 8 segments of 23 rows
    with store._connect(write=False) as con:
        segments = con.sql("SELECT segment_id, first_offset, rows FROM segments ORDER BY segment_id").fetchall()
        assert len(segments) < DAYS
        assert segment_hours.missing(con) == []
    recorded = hours_table(store)
    with store._connect(write=True) as con:  # the same as hours derived from the merged files
        con.execute("DELETE FROM segment_hours")
        assert segment_hours.ensure(con, store.root) == len(segments)
    assert hours_table(store) == recorded
    table = pa.concat_tables([day_table(DAYS), day_table(4).slice(2, 1)])  # + a copy of a day-4 row
    merged = next(n for _, f, n in segments if f <= 4 * 23 < f + n)  # the compacted segment holding it
    must = must_read(store, table)
    report, read = ingest_counted(store, table, "after-compaction")
    assert report.reasons == {STORED_DUPLICATE: 1}
    # the merged segment holding day 4 and the one holding day 29 (today's late rows), not the rest
    assert read == must and must[0] <= 2 and merged <= must[1] < DAYS * 23 - 200


def test_a_failed_ingest_leaves_no_hours(store, monkeypatch):
    before = store.fingerprint()

    def boom(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(catalog, "insert_quarantine", boom)
    with pytest.raises(RuntimeError, match="disk gone"):
        store.ingest_table(day_table(DAYS), "day-30")
    assert store.fingerprint() == before  # no segment row, no hours, no file
    monkeypatch.undo()
    assert store.ingest_table(day_table(DAYS), "day-30").rows_taken == 23
    assert len(hours_table(store)) > len([r for r in hours_table(store) if r[0] <= DAYS])


# ------------------------------------------------------------------ block columns: SMALLINT -> INTEGER


def block_types(root) -> dict[str, str]:
    with duckdb.connect(str(root / catalog.CATALOG_FILE), read_only=True) as con:
        return dict(con.sql("SELECT table_name, data_type FROM information_schema.columns WHERE column_name = 'block' "
                            "ORDER BY table_name").fetchall())


def narrow(root) -> None:
    """Turn the catalog into one made before the widening: every block column SMALLINT."""
    with duckdb.connect(str(root / catalog.CATALOG_FILE)) as con:
        con.execute("CREATE TABLE pb AS SELECT * FROM plan_blocks")
        con.execute("DROP TABLE plan_blocks")
        con.execute("CREATE TABLE plan_blocks (plan_id VARCHAR NOT NULL, block SMALLINT NOT NULL, rows BIGINT NOT NULL, "
                    "ts_start BIGINT NOT NULL, ts_end BIGINT NOT NULL, num_users BIGINT NOT NULL, num_items BIGINT "
                    "NOT NULL, new_users BIGINT NOT NULL, new_items BIGINT NOT NULL, late BIGINT, bound_start BIGINT, "
                    "bound_end BIGINT, PRIMARY KEY (plan_id, block))")
        con.execute("INSERT INTO plan_blocks SELECT * FROM pb")
        con.execute("DROP TABLE pb")
        for t in ("plan_rows", "commits", "block_results", "block_digests"):
            con.execute(f"ALTER TABLE {t} ALTER COLUMN block TYPE SMALLINT")
        con.execute("DROP VIEW results")
        con.execute("CREATE VIEW results AS SELECT r.job, r.lineage, r.block, r.model, r.metric, r.value FROM "
                    "block_results r JOIN commits c ON c.commit_id = r.commit_id WHERE c.revoked_at IS NULL")


def test_block_columns_are_integer_and_older_catalogs_are_widened_on_open(store):
    wide = {t: "INTEGER" for t in ("block_digests", "block_results", "commits", "plan_blocks", "plan_rows", "results")}
    plan, _ = store.advance_live_plan(LivePolicy(DAY, None, None, None, (0.8, 0.1, 0.1), 0))
    for k in range(2):
        store.commit_block("job", "lin", plan.plan_id, k, 0, f"s{k}", "d" * 64, {"student": {"ndcg@20": 0.5}})
    assert block_types(store.root) == wide
    before = store.fingerprint()
    narrow(store.root)
    assert set(block_types(store.root).values()) == {"SMALLINT"}
    with duckdb.connect(str(store.root / catalog.CATALOG_FILE)) as con, pytest.raises(duckdb.ConversionException):
        con.execute("INSERT INTO plan_rows VALUES ('x', 0, 40000, 0)")  # what an old catalog could not hold
    store = StreamStore.open(store.root)
    assert block_types(store.root) == wide
    assert store.fingerprint() == before  # same rows, same constraints' effect
    with pytest.raises(duckdb.ConstraintException):  # the rebuilt plan_blocks keeps its primary key
        with store._connect(write=True) as con:
            con.execute("INSERT INTO plan_blocks SELECT * FROM plan_blocks LIMIT 1")
    assert [r["block"] for r in store.results("job")] == [0, 1]
    assert store.read_block(plan.plan_id, 1).block.dtype == np.int32


def test_a_live_plan_cuts_and_reads_blocks_past_32767(tmp_path):
    """Blocks 32,768 and 32,769 (past what SMALLINT held) cut, read and committed by the real code. One block per
    row; blocks 4..32,767 are written empty straight into the catalog (cutting 32k real blocks takes a minute)."""
    store = StreamStore.open(tmp_path / "s", create=True)
    rows = lambda lo, hi: pa.table({"user": [f"u{i}" for i in range(lo, hi)], "item": [f"i{i % 3}" for i in range(lo, hi)],
                                    "timestamp": T0 + np.arange(lo, hi)})
    policy = LivePolicy(None, 1, None, None, (1.0, 0.0, 0.0), 0)
    store.ingest_table(rows(0, 4), "first")
    plan, _ = store.advance_live_plan(policy, flush=True)
    assert plan.num_blocks == 4
    with store._connect(write=True) as con:
        con.execute("INSERT INTO plan_blocks SELECT plan_id, g.g, 0, ts_start, ts_end, num_users, num_items, 0, 0, 0, "
                    "bound_start, bound_end FROM plan_blocks, generate_series(4, 32767) g(g) WHERE block = 3")
    store.ingest_table(rows(4, 6), "second")
    plan, _ = store.advance_live_plan(policy, flush=True)
    assert plan.num_blocks == 32_770 and [b.rows for b in plan.blocks[-2:]] == [1, 1]
    last = store.read_block(plan.plan_id, 32_769)
    assert last.block.tolist() == [32_769] and last.ts.tolist() == [T0 + 5] and last.num_users == 6
    for k in range(4):
        store.commit_block("job", "lin", plan.plan_id, k, 1, f"s{k}", "d" * 64)
    with store._connect(write=True) as con:  # commits of the empty blocks, as a job would have made them
        con.execute("INSERT INTO commits SELECT g + 1, 'job', 'lin', ?, g, 0, 's', 'd', now(), NULL, NULL "
                    "FROM generate_series(4, 32767) g(g)", [plan.plan_id])
    store.commit_block("job", "lin", plan.plan_id, 32_768, 1, "s32768", "d" * 64, {"student": {"ndcg@20": 1.0}})
    assert [r["block"] for r in store.results("job")] == [32_768]
    with store._connect(write=False) as con:
        assert catalog.scalar(con, "SELECT max(block) FROM plan_rows") == 32_769
        assert catalog.scalar(con, "SELECT block FROM block_digests WHERE rows = 1 ORDER BY block DESC LIMIT 1") == 32_768


def test_an_ingest_bounds_duckdb_threads_as_well_as_memory(tmp_path):
    """On a many-core machine one DuckDB thread per core ran a 10M-row ingest out of the 128 MB budget (each
    thread buffers inside the one limit): the ingest's connection takes at most 4 threads."""
    from continual_kd.stream import store as store_module

    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    con.execute("SET threads = 16")
    store_module._tune(con, tmp_path)
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    assert threads == store_module.INGEST_THREADS <= 4
    # DuckDB reads the limit back in its own units: the same setting applied to a fresh connection
    fresh = duckdb.connect()
    fresh.execute(f"SET memory_limit = '{store_module.INGEST_MEMORY_LIMIT}'")
    expected = fresh.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    default = duckdb.connect().execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == expected != default
    assert Path(con.execute("SELECT current_setting('temp_directory')").fetchone()[0]) == tmp_path / "spill"
