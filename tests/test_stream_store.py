"""StreamStore ingest: formats, validation/quarantine, id maps, no-op re-ingest, atomicity, locking."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.errors import CkdError
from continual_kd.stream import ColumnMap, StreamStore
from continual_kd.stream import catalog


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def epoch(*args) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp())


@pytest.fixture
def store(tmp_path: Path) -> StreamStore:
    return StreamStore.open(tmp_path / "store", create=True)


def segment_rows(store: StreamStore) -> pa.Table:
    files = sorted((store.root / "segments").glob("seg-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


# --- opening -------------------------------------------------------------------------------

def test_open_missing_store_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(CkdError, match="ckd ingest") as e:
        StreamStore.open(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    assert not (tmp_path / "nowhere").exists()


def test_open_create_then_reopen(tmp_path: Path) -> None:
    created = StreamStore.open(tmp_path / "s", create=True)
    reopened = StreamStore.open(tmp_path / "s")
    assert reopened.root == tmp_path / "s"
    assert (reopened.num_users, reopened.num_items) == (0, 0)
    assert created.fingerprint() == reopened.fingerprint()


# --- ingest --------------------------------------------------------------------------------

def test_ingest_csv(store: StreamStore, tmp_path: Path) -> None:
    src = write(tmp_path / "a.csv", "user,item,timestamp,rating\n u2 ,i1,100,4\nu1,i2,200,5\nu2,i2,300,3.5\n")
    report = store.ingest_file(src)
    assert (report.rows_read, report.rows_taken, report.rows_quarantined) == (3, 3, 0)
    assert (report.segment_id, report.already_ingested, report.new_users, report.new_items) == (1, False, 2, 2)
    assert report.reasons == {}
    assert (store.num_users, store.num_items) == (2, 2)
    assert store.external_ids("user", np.array([0, 1])) == ["u2", "u1"]  # order of first appearance
    rows = segment_rows(store)
    assert rows.schema.names == ["offset", "user", "item", "ts", "weight"]
    assert rows.column("offset").to_pylist() == [0, 1, 2]
    assert rows.column("user").to_pylist() == [0, 1, 0]
    assert rows.column("item").to_pylist() == [0, 1, 1]
    assert rows.column("ts").to_pylist() == [100, 200, 300]
    assert rows.column("weight").to_pylist() == [4.0, 5.0, 3.5]
    [segment] = store.status()["segments"]
    assert (segment["rows"], segment["ts_min"], segment["ts_max"], segment["source"]) == (3, 100, 300, str(src))


def test_ingest_parquet_detected_by_magic_bytes(store: StreamStore, tmp_path: Path) -> None:
    ts = pa.array([datetime(2021, 5, 1, 12, 0, 0, 500000), datetime(2021, 5, 2)], pa.timestamp("ms"))
    table = pa.table({"uid": pa.array([7, 8], pa.int64()), "iid": pa.array(["a", "b"]), "when": ts,
                      "weight": pa.array([2.0, 1.0])})
    pq.write_table(table, tmp_path / "data.bin")  # no .parquet extension
    report = store.ingest_file(tmp_path / "data.bin", ColumnMap(user="uid", item="iid", timestamp="when"))
    assert (report.rows_taken, report.rows_quarantined) == (2, 0)
    rows = segment_rows(store)
    assert rows.column("ts").to_pylist() == [epoch(2021, 5, 1, 12), epoch(2021, 5, 2)]
    assert rows.column("weight").to_pylist() == [2.0, 1.0]
    assert store.external_ids("user", np.array([1, 0])) == ["8", "7"]


def test_delimiters_and_recbole_headers(store: StreamStore, tmp_path: Path) -> None:
    inter = write(tmp_path / "ml.inter",
                  "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t3\t100\n2\t10\t4\t101\n")
    semi = write(tmp_path / "b.txt", "who;what;t\nx;y;2020-03-04T05:06:07\n")
    assert store.ingest_file(inter).rows_taken == 2
    assert segment_rows(store).column("weight").to_pylist() == [3.0, 4.0]  # "rating" used as weight
    report = store.ingest_file(semi, ColumnMap(user="who", item="what", timestamp="t"))
    assert (report.rows_taken, report.new_users, report.new_items) == (1, 1, 1)
    assert segment_rows(store).column("ts").to_pylist()[-1] == epoch(2020, 3, 4, 5, 6, 7)


def test_timestamp_forms(store: StreamStore, tmp_path: Path) -> None:
    src = write(tmp_path / "t.csv", "user,item,timestamp\n"
                "a,1,1600000000\n"          # seconds
                "a,2,1600000000123\n"       # milliseconds
                "a,3,1600000000.9\n"        # float seconds, floored
                "a,4,2020-09-13T12:26:40\n"
                "a,5,2020-09-13 12:26:41\n"
                "a,6,2020-09-13\n")
    assert store.ingest_file(src).rows_taken == 6
    assert segment_rows(store).column("ts").to_pylist() == [
        1600000000, 1600000000, 1600000000, 1600000000, 1600000001, epoch(2020, 9, 13)]


def test_ids_stable_across_ingests(store: StreamStore, tmp_path: Path) -> None:
    store.ingest_file(write(tmp_path / "1.csv", "user,item,timestamp\nu1,i1,1\nu2,i2,2\n"))
    report = store.ingest_file(write(tmp_path / "2.csv", "user,item,timestamp\nu3,i2,3\nu1,i3,4\nu4,i1,5\n"))
    assert (report.new_users, report.new_items) == (2, 1)
    assert store.dense_ids("user", ["u1", "u2", "u3", "u4"]).tolist() == [0, 1, 2, 3]
    assert store.dense_ids("item", ["i3", "i1"]).tolist() == [2, 0]
    assert store.external_ids("item", np.array([2, 1, 0])) == ["i3", "i2", "i1"]
    rows = segment_rows(store)
    assert rows.column("offset").to_pylist() == [0, 1, 2, 3, 4]  # contiguous across segments
    assert rows.column("user").to_pylist() == [0, 1, 2, 0, 3]


def test_reingest_is_a_noop(store: StreamStore, tmp_path: Path) -> None:
    src = write(tmp_path / "a.csv", "user,item,timestamp\nu1,i1,1\n,i2,2\n")
    first = store.ingest_file(src)
    before = store.fingerprint()
    again = store.ingest_file(src)
    copy = store.ingest_file(write(tmp_path / "copy.csv", src.read_text()))  # same bytes, other name
    assert again.already_ingested and copy.already_ingested and not first.already_ingested
    assert (again.rows_read, again.rows_taken, again.segment_id, again.content_hash) == (2, 0, None, first.content_hash)
    assert store.fingerprint() == before

    table = pa.table({"user": ["x"], "item": ["y"], "timestamp": [10]})
    assert store.ingest_table(table, "batch-1").segment_id == 2
    before = store.fingerprint()
    assert store.ingest_table(table, "batch-1 again").already_ingested
    assert store.fingerprint() == before
    assert store.status()["ingests"] == 2


def test_every_quarantine_reason(store: StreamStore, tmp_path: Path) -> None:
    store.ingest_file(write(tmp_path / "old.csv", "user,item,timestamp,weight\nu1,i1,50,1\n"))
    src = write(tmp_path / "bad.csv", "user,item,timestamp,weight\n"
                "u1,i1,100,1\n"            # 1 ok
                ",i1,100,1\n"              # 2 missing user id
                "  ,i1,100,1\n"            # 3 missing user id (blank)
                "u1,,100,1\n"              # 4 missing item id
                "u1,i2,yesterday,1\n"      # 5 unparseable timestamp
                "u1,i2,,1\n"               # 6 unparseable timestamp (empty)
                "u1,i2,-5,1\n"             # 7 timestamp out of range
                "u1,i2,2100-01-01,1\n"     # 8 timestamp out of range
                "u1,i2,100,abc\n"          # 9 non-finite weight
                "u1,i2,100,inf\n"          # 10 non-finite weight
                "u1,i1,100,1\n"            # 11 duplicate row (of row 1)
                "u1,i1,50,1\n"             # 12 duplicate of stored row
                "u1,i1,50,2\n"             # 13 ok: other weight
                "u9,i9,50,1\n")            # 14 ok: new ids
    report = store.ingest_file(src)
    assert report.reasons == {"missing user id": 2, "missing item id": 1, "unparseable timestamp": 2,
                              "timestamp out of range": 2, "non-finite weight": 2, "duplicate row": 1,
                              "duplicate of stored row": 1}
    assert (report.rows_read, report.rows_taken, report.rows_quarantined) == (14, 3, 11)
    assert (report.new_users, report.new_items) == (1, 1)  # u9, i9; ids of quarantined rows are not added
    assert store.num_items == 2
    rows = store.quarantine()
    assert [r["row_number"] for r in rows] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert rows[0]["reason"] == "missing user id"
    assert rows[3] == {"ingest_id": 2, "source": str(src), "row_number": 5, "reason": "unparseable timestamp",
                       "raw": "user=u1, item=i2, timestamp=yesterday, weight=1"}
    assert rows[-1]["reason"] == "duplicate of stored row"
    assert store.status()["quarantine"]["non-finite weight"] == 2
    assert len(store.quarantine(limit=3)) == 3


def test_all_rows_quarantined_writes_no_segment(store: StreamStore, tmp_path: Path) -> None:
    report = store.ingest_file(write(tmp_path / "a.csv", "user,item,timestamp\n,i,1\nu,i,x\n"))
    assert (report.rows_taken, report.segment_id, report.new_users) == (0, None, 0)
    assert store.status()["segments"] == [] and store.status()["ingests"] == 1
    assert list((store.root / "segments").iterdir()) == []


# --- files that cannot be read: one sentence naming the file, store unchanged -------------

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    pq.write_table(pa.table({"user": ["a"], "item": ["b"]}), tmp_path / "nots.parquet")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "junk.csv").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"x" * 100)
    return {
        "missing": tmp_path / "missing.csv",
        "empty": tmp_path / "empty.csv",
        "header only": write(tmp_path / "header.csv", "user,item,timestamp\n"),
        "binary junk": tmp_path / "junk.csv",
        "missing column": write(tmp_path / "nocol.csv", "user,item,when\nu,i,1\n"),
        "parquet missing column": tmp_path / "nots.parquet",
        "broken parquet": tmp_path / "broken.parquet",
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "header only", "binary junk", "missing column",
                                  "parquet missing column", "broken parquet"])
def test_unreadable_file_raises_and_changes_nothing(store: StreamStore, tmp_path: Path, kind: str) -> None:
    store.ingest_file(write(tmp_path / "good.csv", "user,item,timestamp\nu,i,1\n"))
    before = store.fingerprint()
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(CkdError) as e:
        store.ingest_file(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert store.fingerprint() == before


def test_missing_column_message_names_columns_and_flags(store: StreamStore, tmp_path: Path) -> None:
    with pytest.raises(CkdError) as e:
        store.ingest_file(write(tmp_path / "nocol.csv", "user,item,when\nu,i,1\n"))
    assert "'timestamp'" in str(e.value) and "user, item, when" in str(e.value) and "--time-col" in str(e.value)


# --- atomicity and locking -----------------------------------------------------------------

def test_failure_inside_the_catalog_transaction_leaves_store_unchanged(
        store: StreamStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.ingest_file(write(tmp_path / "a.csv", "user,item,timestamp\nu1,i1,1\n"))
    before, files = store.fingerprint(), sorted(p.name for p in (store.root / "segments").iterdir())
    real_insert = catalog.insert_quarantine

    def insert_then_fail(*args, **kwargs):  # runs after ids, segment and ingest rows are inserted
        real_insert(*args, **kwargs)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(catalog, "insert_quarantine", insert_then_fail)
    src = write(tmp_path / "b.csv", "user,item,timestamp\nu2,i2,2\n,i3,3\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.ingest_file(src)
    assert store.fingerprint() == before
    assert sorted(p.name for p in (store.root / "segments").iterdir()) == files

    monkeypatch.setattr(catalog, "insert_quarantine", real_insert)
    report = store.ingest_file(src)  # the failed attempt left no trace: ids and segment id continue
    assert (report.segment_id, report.new_users, report.rows_quarantined) == (2, 1, 1)
    assert store.dense_ids("user", ["u2"]).tolist() == [1]


def test_unrecorded_segment_files_are_ignored(store: StreamStore, tmp_path: Path) -> None:
    store.ingest_file(write(tmp_path / "a.csv", "user,item,timestamp\nu1,i1,1\nu2,i2,2\n"))
    stray = pa.table({"offset": pa.array([2], pa.int64()), "user": pa.array([0], pa.int32()),
                      "item": pa.array([0], pa.int32()), "ts": pa.array([3], pa.int64()),
                      "weight": pa.array([1.0], pa.float32())})
    pq.write_table(stray, store.root / "segments" / "seg-000002-deadbeef.parquet")
    plan = store.ensure_plan(base_fraction=0.5, incremental=1)
    assert plan.total_rows == 2
    assert store.read_blocks(plan.plan_id, 1).ts.tolist() == [1, 2]


def test_locked_catalog_raises_after_waiting(store: StreamStore, tmp_path: Path) -> None:
    src = write(tmp_path / "a.csv", "user,item,timestamp\nu1,i1,1\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
                               "sys.stdin.read()", str(store.root / "catalog.duckdb")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store.lock_wait_s = 0.3
        with pytest.raises(CkdError, match="in use by another process") as e:
            store.ingest_file(src)
        assert str(store.root) in str(e.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert store.ingest_file(src).rows_taken == 1


def test_unknown_ids(store: StreamStore, tmp_path: Path) -> None:
    store.ingest_file(write(tmp_path / "a.csv", "user,item,timestamp\nu1,i1,1\n"))
    with pytest.raises(CkdError, match="Unknown user id 'nobody'"):
        store.dense_ids("user", ["u1", "nobody"])
    with pytest.raises(CkdError, match="Unknown dense item id 5"):
        store.external_ids("item", np.array([0, 5]))
