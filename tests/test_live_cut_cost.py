"""A live block's cut costs what the new data costs (issues 10 and 12): the kept state (stream/live_state.py)
lets a cut read only the segments with rows in no block yet, and the blocks it cuts are those the old cut —
every segment read, known ids from every planned row — gives, step by step, on a generated stream with late
rows, rows from the future, id gaps, two live plans on one store, a store without the kept state, a kept state
that disagrees with the catalog, a compaction and a failed cut. Real DuckDB catalog and Parquet segments.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.stream import StreamStore, live_state
from continual_kd.stream.compact import block_digest, compact_store
from continual_kd.stream.live import Cursor, LivePolicy, block_split, cut_blocks, live_plan_id
from continual_kd.stream.live_state import KnownIds
from continual_kd.stream.segments import READS

DAY = 86400
T0 = 1_600_000_000 // DAY * DAY
SPLIT = (0.8, 0.1, 0.1)
WINDOW = LivePolicy(DAY, None, None, None, SPLIT, 0)
ROWS = LivePolicy(None, 70, None, T0 + DAY, SPLIT, 1)  # a base block before day 1, then 70-row blocks
DAYS = 12


def day_table(day: int) -> pa.Table:
    """Day ``day``'s ~40 rows, ~5 late rows of the day before, and on every 5th day a new user's row 3 days
    ahead (its id comes before ids of later ingests that are cut first: a gap in the known ids)."""
    rng = np.random.default_rng(day)
    n, late = 40, 5 if day else 0
    ts = np.concatenate([T0 + day * DAY + rng.integers(0, DAY, n), T0 + (day - 1) * DAY + rng.integers(0, DAY, late)])
    users = [f"u{x}" for x in rng.integers(0, 12 + 3 * day, n + late)]
    items = [f"i{x}" for x in rng.integers(0, 10 + 2 * day, n + late)]
    if day % 5 == 2:
        ts, users, items = np.append(ts, T0 + (day + 3) * DAY + 7), users + [f"future{day}"], items + [f"fi{day}"]
    return pa.table({"user": users, "item": items, "timestamp": ts})


def old_cut(store: StreamStore, policy: LivePolicy, flush: bool = False) -> tuple[list[dict], pa.Table | None, int]:
    """The blocks the cut before the kept state gave: every segment read, pending = rows in no block, known
    ids = those of every planned row. → (new blocks as plan_blocks rows, their rows: offset, block, split,
    (files holding rows in no block, files holding rows in blocks))."""
    plan_id = live_plan_id(policy)
    with store._connect(write=False) as con:
        paths = [str(store.root / p) for (p,) in con.sql("SELECT path FROM segments").fetchall()]
        planned = con.sql('SELECT "offset" FROM plan_rows WHERE plan_id = ?', params=[plan_id]).fetchnumpy()["offset"]
        blocks = con.sql("SELECT block, num_users, num_items, bound_end FROM plan_blocks WHERE plan_id = ? ORDER BY block",
                         params=[plan_id]).fetchall()
    files = [pq.read_table(p) for p in paths]
    in_plan = [np.isin(f.column("offset").to_numpy(), planned) for f in files]
    open_files, planned_files = sum(not p.all() for p in in_plan), sum(bool(p.any()) for p in in_plan)
    rows = pa.concat_tables(files)
    offset, ts, user, item = (rows.column(c).to_numpy().astype(np.int64) for c in ("offset", "ts", "user", "item"))
    done = np.isin(offset, planned)
    seen = {"u": set(user[done].tolist()), "i": set(item[done].tolist())}
    order = np.lexsort((offset, ts))
    order = order[~done[order]]
    cursor = Cursor(len(blocks), blocks[-1][3] if blocks else None)
    num_u, num_i = (blocks[-1][1], blocks[-1][2]) if blocks else (0, 0)
    out, parts = [], []
    for j, cut in enumerate(cut_blocks(policy, cursor, ts[order], int(ts.max()), flush)):
        k, take = len(blocks) + j, order[cut.take]
        u, i = user[take], item[take]
        num_u, num_i = max(num_u, int(u.max()) + 1), max(num_i, int(i.max()) + 1)
        new_u, new_i = set(u.tolist()) - seen["u"], set(i.tolist()) - seen["i"]
        seen["u"] |= new_u
        seen["i"] |= new_i
        out.append({"block": k, "rows": len(u), "ts_start": int(ts[take].min()), "ts_end": int(ts[take].max()),
                    "num_users": num_u, "num_items": num_i, "new_users": len(new_u), "new_items": len(new_i),
                    "late": cut.late, "bound_start": cut.bound_start, "bound_end": cut.bound_end})
        parts.append(pa.table({"offset": offset[take], "block": np.full(len(u), k, np.int16),
                               "split": block_split(u, policy.split, policy.seed, k)}))
    return out, (pa.concat_tables(parts) if parts else None), (open_files, planned_files)


def advance_and_compare(store: StreamStore, policy: LivePolicy, flush: bool = False) -> tuple[int, int]:
    """Cut with the store, check the new blocks equal the old cut's; → (segment files the cut read, files that
    held rows in no block before it)."""
    expected, expected_rows, (open_files, planned_files) = old_cut(store, policy, flush)
    advance_and_compare.planned_files = planned_files
    before = store.get_plan(live_plan_id(policy)).num_blocks if _has_plan(store, policy) else 0
    READS.reset()
    plan, _ = store.advance_live_plan(policy, flush=flush)
    files = READS.files
    with store._connect(write=False) as con:
        got = con.sql("SELECT block, rows, ts_start, ts_end, num_users, num_items, new_users, new_items, late, "
                      "bound_start, bound_end FROM plan_blocks WHERE plan_id = ? AND block >= ? ORDER BY block",
                      params=[plan.plan_id, before]).to_arrow_table().to_pylist()
        got_rows = con.sql('SELECT "offset", block, split FROM plan_rows WHERE plan_id = ? AND block >= ? '
                           'ORDER BY "offset"', params=[plan.plan_id, before]).to_arrow_table()
    assert got == expected
    if expected_rows is None:
        assert got_rows.num_rows == 0
    else:
        want = expected_rows.sort_by("offset")
        for c in ("offset", "block", "split"):
            assert got_rows.column(c).to_numpy().tolist() == want.column(c).to_numpy().tolist()
    return files, open_files


def _has_plan(store: StreamStore, policy: LivePolicy) -> bool:
    with store._connect(write=False) as con:
        return bool(con.sql("SELECT count(*) FROM plans WHERE plan_id = ?", params=[live_plan_id(policy)]).fetchall()[0][0])


def _segment_rows(store: StreamStore) -> list[int]:
    with store._connect(write=False) as con:
        return [int(n) for (n,) in con.sql("SELECT rows FROM segments ORDER BY first_offset").fetchall()]


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, list[tuple[int, int, int]]]:
    """A store fed DAYS daily ingests, both live plans advanced (and compared with the old cut) after each;
    → its root and, per day, (files the window cut read, rows those files hold, segments stored)."""
    root = tmp_path_factory.mktemp("livecut") / "store"
    store = StreamStore.open(root, create=True)
    reads, gap_seen = [], False
    for day in range(DAYS):
        store.ingest_table(day_table(day), f"day-{day}")
        files, open_files = advance_and_compare(store, WINDOW)
        reads.append((files, open_files, len(_segment_rows(store))))
        rows_files, rows_open = advance_and_compare(store, ROWS)
        assert rows_files in (0, rows_open)
        with store._connect(write=False) as con:
            gap_seen |= bool(con.sql("SELECT count(*) FROM live_ids").fetchall()[0][0])
    assert gap_seen  # the stream made known ids that are not a prefix, and the kept state held them
    return root, reads


def _copy(grown, tmp_path: Path) -> StreamStore:
    shutil.copytree(grown[0], tmp_path / "store")
    return StreamStore.open(tmp_path / "store")


def test_a_cut_reads_only_the_new_segments_and_cuts_the_blocks_the_old_cut_did(grown, tmp_path):
    root, reads = grown
    sizes = _segment_rows(StreamStore.open(root))
    # each cut (the blocks equal to the old cut's, checked in the fixture) read exactly the segment files that
    # held rows in no block — the new one, the rest of the day before, a pending row from the future — or none
    # when no block was complete (the day after a future row completed it early): 1-3 files, however many the store holds (12 at the end)
    assert all(files in (0, open_files) for files, open_files, _ in reads)
    assert max(open_files for _, open_files, _ in reads) <= 3 and reads[-1][2] == DAYS
    assert sum(files > 0 for files, _, _ in reads) >= DAYS - 4  # days without a cut: a row from the future
    store = _copy(grown, tmp_path)  # the flush below changes it
    plan = store.get_plan(live_plan_id(WINDOW))
    assert plan.num_blocks >= DAYS - 2
    with store._connect(write=False) as con:
        paths = [store.root / p for (p,) in con.sql("SELECT path FROM segments ORDER BY first_offset").fetchall()]
        offsets = con.sql('SELECT "offset", block FROM plan_rows WHERE plan_id = ?', params=[plan.plan_id]).fetchnumpy()
    in_file = [pq.read_table(p, columns=["offset"]).column(0).to_numpy() for p in paths]
    for k in (1, plan.num_blocks // 2, plan.num_blocks - 1):  # a block's read and its commit's fingerprint read
        mine = offsets["offset"][offsets["block"] == k]       # the files that hold its rows (1-3), no other
        holding = sum(bool(np.isin(f, mine).any()) for f in in_file)
        READS.reset()
        block = store.read_block(plan.plan_id, k)
        assert (READS.files, len(block.users)) == (holding, plan.blocks[k].rows) and holding <= 3
        READS.reset()
        with store._connect(write=False) as con:
            assert block_digest(con, store.root, plan.plan_id, k).rows == plan.blocks[k].rows
        assert READS.files == holding
    # flushing the rest: still the old cut's blocks; every stored row is in exactly one block
    for policy in (WINDOW, ROWS):
        advance_and_compare(store, policy, flush=True)
        assert store.get_plan(live_plan_id(policy)).total_rows == sum(sizes)


def test_a_store_without_the_kept_state_derives_it_once(grown, tmp_path):
    store = _copy(grown, tmp_path)
    with store._connect(write=True) as con:  # as a store cut before the state was kept
        for table in ("live_state", "live_ids", "live_segments"):
            con.execute(f"DROP TABLE {table}")
    store = StreamStore.open(store.root)  # the tables are created again, empty
    store.ingest_table(day_table(DAYS), f"day-{DAYS}")
    files, open_files = advance_and_compare(store, WINDOW)
    # derived once from the segments holding planned rows (all but the newest two), then the cut
    assert files == advance_and_compare.planned_files + open_files and files >= DAYS - 1
    store.ingest_table(day_table(DAYS + 1), f"day-{DAYS + 1}")
    files, open_files = advance_and_compare(store, WINDOW)
    assert files == open_files  # then only the segments with new rows again


def test_a_kept_state_that_disagrees_with_the_catalog_is_derived_again(grown, tmp_path):
    store = _copy(grown, tmp_path)
    plan_id = live_plan_id(WINDOW)
    with store._connect(write=True) as con:  # claim the open segment is full: its pending rows would be lost
        con.execute("UPDATE live_segments SET unplanned = 0 WHERE plan_id = ?", [plan_id])
    store.ingest_table(day_table(DAYS), f"day-{DAYS}")
    with store._connect(write=False) as con:  # the segments the kept state never counted (the newest ones)
        uncounted = con.sql("SELECT count(*) FROM segments WHERE segment_id NOT IN (SELECT segment_id FROM "
                            "live_segments WHERE plan_id = ?)", params=[plan_id]).fetchall()[0][0]
    files, open_files = advance_and_compare(store, WINDOW)
    # those gave fewer rows than stored − planned: the state was derived, then the blocks cut right
    assert uncounted >= 1 and files == uncounted + advance_and_compare.planned_files + open_files
    store.ingest_table(day_table(DAYS + 1), f"day-{DAYS + 1}")
    files, open_files = advance_and_compare(store, WINDOW)
    assert files == open_files


def test_cuts_after_a_compaction_keep_every_row_once(grown, tmp_path):
    store = _copy(grown, tmp_path)
    report = compact_store(store, target_rows=400)  # runs of ~45-row segments, open ones among them
    assert report.segments_after < report.segments_before
    for day in (DAYS, DAYS + 1):
        store.ingest_table(day_table(day), f"day-{day}")
        for policy in (WINDOW, ROWS):
            advance_and_compare(store, policy)
    for policy in (WINDOW, ROWS):
        advance_and_compare(store, policy, flush=True)
        assert store.get_plan(live_plan_id(policy)).total_rows == sum(_segment_rows(store))


def test_a_failed_cut_changes_neither_the_plan_nor_its_kept_state(grown, tmp_path, monkeypatch):
    store = _copy(grown, tmp_path)
    store.ingest_table(day_table(DAYS), f"day-{DAYS}")
    before = store.fingerprint()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(live_state.catalog, "write_live_state", fail)  # fails inside the cut's transaction
    with pytest.raises(OSError):
        store.advance_live_plan(WINDOW)
    assert store.fingerprint() == before
    monkeypatch.undo()
    files, open_files = advance_and_compare(store, WINDOW)
    assert files == open_files


def test_known_ids_are_a_prefix_and_the_ids_above_it():
    known = KnownIds.of(np.array([0, 1, 2, 5, 7]))
    assert (known.prefix, known.extra.tolist()) == (3, [5, 7])
    assert known.contains(np.array([0, 2, 3, 5, 6, 7, 9])).tolist() == [True, True, False, True, False, True, False]
    grown = known.add(np.array([3, 4, 4]))  # closes the gap up to 5 and the one at 6 stays
    assert (grown.prefix, grown.extra.tolist()) == (6, [7])
    assert (grown.add(np.array([6])).prefix, grown.add(np.array([6])).extra.tolist()) == (8, [])
