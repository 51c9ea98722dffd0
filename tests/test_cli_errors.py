"""Bad input through the real CLI: exit code 2, one line naming the problem, nothing stored changes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.stream import StreamStore

GOOD_CSV = "user,item,timestamp\nu1,i1,1600000000\nu2,i2,1600000100\nu1,i3,1600000200\n"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    (tmp_path / "good.csv").write_text(GOOD_CSV)
    StreamStore.open(root, create=True).ingest_file(tmp_path / "good.csv")
    return root


def _write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, pa.Table):
        pq.write_table(content, p)
    elif content is not None:
        p.write_text(content)
    return p


BAD_FILES = [
    ("missing.csv", None, "missing.csv"),
    ("empty.csv", "", "empty.csv"),
    ("junk.csv", bytes(range(256)) * 4, "junk.csv"),
    ("nocol.csv", "user,timestamp\nu1,1600000000\n", "item"),
    ("nocol.parquet", pa.table({"user": ["u1"], "ts": [1]}), "item"),
    ("header-only.csv", "user,item,timestamp\n", "header-only.csv"),
]


@pytest.mark.parametrize("name, content, needle", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_unreadable_files_exit_2_and_leave_the_store_unchanged(cli, store, tmp_path, name, content, needle):
    before = StreamStore.open(store).fingerprint()
    path = _write(tmp_path, name, content)
    r = cli("ingest", path, "--store", store)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.strip().splitlines() if line.startswith("error:")]) == 1
    assert StreamStore.open(store).fingerprint() == before


def test_bad_rows_are_quarantined_and_counted(cli, store, tmp_path):
    path = _write(tmp_path, "mixed.csv", "user,item,timestamp\n"
                  "u3,i1,1600000300\n"     # taken
                  "u4,i2,1600000400\n"     # taken
                  ",i9,1600000500\n"       # missing user id
                  "u5,i9,not-a-time\n"     # unparseable timestamp
                  "u1,i1,1600000000\n"     # duplicate of a stored row
                  "u3,i1,1600000300\n")    # duplicate within the file
    r = cli("ingest", path, "--store", store)
    assert r.exit_code == 0, r.output
    assert "2 rows taken, 4 quarantined (2 new users, 0 new items)" in r.output
    for reason in ("missing user id", "unparseable timestamp", "duplicate of stored row", "duplicate row"):
        assert f"1 × {reason}" in r.output
    s = StreamStore.open(store).status()
    assert s["rows"] == 5 and sum(s["quarantine"].values()) == 4


def test_reingest_is_a_noop(cli, store, tmp_path):
    before = StreamStore.open(store).fingerprint()
    r = cli("ingest", tmp_path / "good.csv", "--store", store)
    assert r.exit_code == 0 and "already ingested" in r.output
    assert StreamStore.open(store).fingerprint() == before


JOB_ERRORS = [
    ("name: x\nteachers: [\n", "not valid YAML"),
    ("name: x\ncolour: red\n", "unknown top-level key 'colour'"),
    ("name: x\nteachers: [{name: t, dim: -3}]\n", "teachers[0].dim"),
    ("name: x\nstudent: {train: {epochs_base: many}}\n", "student.train.epochs_base"),
]


@pytest.mark.parametrize("text, needle", JOB_ERRORS, ids=["yaml", "unknown-key", "negative-dim", "wrong-type"])
def test_bad_job_files_exit_2(cli, tmp_path, text, needle):
    job = _write(tmp_path, "job.yaml", text)
    r = cli("submit", job)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


def test_unknown_things_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("submit", "nope.yaml")
    assert r.exit_code == 2 and "nope.yaml" in r.output
    r = cli("evaluate", "--snapshot", "latest")
    assert r.exit_code == 2 and "no snapshots" in r.output
    r = cli("evaluate", "--snapshot", "abc")
    assert r.exit_code == 2 and "'abc'" in r.output
    r = cli("status", "--store", "not-a-store")
    assert r.exit_code == 2 and "not-a-store" in r.output
    assert not (tmp_path / "not-a-store" / "catalog.duckdb").exists()


def test_unreachable_cluster_exits_2_quickly(cli, tiny_job):
    job = tiny_job("unreach")
    r = cli("submit", job, "--address", "127.0.0.1:1")
    assert r.exit_code == 2 and "127.0.0.1:1" in r.output and "ray start --head" in r.output
    assert not Path("runs/unreach").exists()
