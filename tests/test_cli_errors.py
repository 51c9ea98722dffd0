"""Bad input through the real CLI, table-driven: every kind ends with exit code 2, one line naming
the problem (file / field / row and the fix), no traceback, and the store's content unchanged."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.stream import StreamStore

GOOD_CSV = "user,item,timestamp\nu1,i1,1600000000\nu2,i2,1600000100\nu1,i3,1600000200\n"
JOB_HEAD = ("name: bad\nsource: {dataset: store, store: store}\nblocks: {incremental: 1}\nteachers: [{name: t}]\n"
            "distill: {terms: []}\n")


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "store"
    (tmp_path / "good.csv").write_text(GOOD_CSV)
    StreamStore.open(root, create=True).ingest_file(tmp_path / "good.csv")
    return root


def _file(name: str, content) -> str:
    p = Path(name)
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, pa.Table):
        pq.write_table(content, p)
    elif content is not None:
        p.write_text(content)
    return name


def _job(text: str) -> str:
    return _file("job.yaml", text)


# (id, argv maker run inside the test's directory, text the message must contain)
CASES = [
    ("missing-file", lambda: ["ingest", "missing.csv", "--store", "store"], "missing.csv"),
    ("empty-file", lambda: ["ingest", _file("empty.csv", ""), "--store", "store"], "empty.csv"),
    ("binary-junk", lambda: ["ingest", _file("junk.csv", bytes(range(256)) * 4), "--store", "store"], "junk.csv"),
    ("missing-column", lambda: ["ingest", _file("nocol.csv", "user,timestamp\nu1,1600000000\n"), "--store", "store"], "item"),
    ("parquet-missing-column", lambda: ["ingest", _file("nocol.parquet", pa.table({"user": ["u1"], "ts": [1]})),
                                        "--store", "store"], "item"),
    ("duplicate-column", lambda: ["ingest", _file("dup.csv", "user,user,item,timestamp\nu7,u8,i1,1600000000\n"),
                                  "--store", "store"], "'user' appears 2 times"),
    ("header-only", lambda: ["ingest", _file("header.csv", "user,item,timestamp\n"), "--store", "store"], "header.csv"),
    ("ragged-rows", lambda: ["ingest", _file("ragged.csv", "user,item,timestamp\nu7,i1,1600000000\n\nu8,i1,1600000000,9,9\n"),
                             "--store", "store"], "ragged.csv: it could not be parsed as delimited text at line 4"),
    ("unknown-column-flag", lambda: ["ingest", _file("new.csv", GOOD_CSV.replace("u1", "u7")), "--store", "store",
                                     "--user-col", "nope"], "'nope'"),
    ("id-of-wrong-type", lambda: ["ingest", _file("listid.parquet", pa.table({"user": [[1, 2]], "item": ["i"],
                                                                               "timestamp": [1600000000]})),
                                  "--store", "store"], "user"),
    ("refused-into-a-new-store", lambda: ["ingest", _file("bad.csv", "user,timestamp\nu1,1600000000\n"), "--store",
                                          "not-a-store"], "item"),
    ("labelled-into-no-store", lambda: ["ingest-labelled", _file("lab.csv", "user,item,label\nu1,i1,1\n"),
                                        "--store", "not-a-store"], "--store not-a-store: no stream store there"),
    ("kg-into-no-store", lambda: ["ingest-kg", _file("kg.csv", "item,relation,tail\ni1,genre,g1\n"),
                                  "--store", "not-a-store"], "--store not-a-store: no stream store there"),
    ("labelled-without-label", lambda: ["ingest-labelled", _file("lab.csv", "user,item\nu1,i1\n"), "--store",
                                        "store"], "label"),
    ("store-is-a-file", lambda: ["ingest", "good.csv", "--store", "good.csv"], "is a file"),
    ("yaml-syntax", lambda: ["submit", _job("name: x\nteachers: [\n")], "not valid YAML at line"),
    ("yaml-not-a-mapping", lambda: ["submit", _job("- a\n- b\n")], "must be a YAML mapping"),
    ("yaml-duplicate-key", lambda: ["submit", _job(JOB_HEAD + "seed: 1\nseed: 2\n")], "key 'seed' is given twice"),
    ("yaml-unknown-key", lambda: ["submit", _job(JOB_HEAD + "colour: red\n")], "colour: unknown top-level key"),
    ("yaml-wrong-type", lambda: ["submit", _job(JOB_HEAD + "student: {train: {epochs_base: many}}\n")],
     "student.train.epochs_base"),
    ("negative-dim", lambda: ["submit", _job(JOB_HEAD.replace("{name: t}", "{name: t, dim: -3}"))],
     "teachers[0].dim: must be a positive integer"),
    ("k-larger-than-items", lambda: ["submit", _job(JOB_HEAD.replace("terms: []", "terms: [{name: rrd, k: 10, pool: 10}]"))],
     "distill.terms[0].k: 10 is larger than the 3 items"),
    ("job-file-missing", lambda: ["submit", "nope.yaml"], "nope.yaml: job file not found"),
    ("seed-past-int64", lambda: ["submit", _job(JOB_HEAD + "seed: 99999999999999999999999\n")], "seed: must be ≤"),
    ("json-into-a-folder", lambda: ["submit", _job(JOB_HEAD), "--json", "."], "--json .: is a folder"),
    ("json-under-a-file", lambda: ["evaluate", "--json", "good.csv/out.json"], "not a writable folder"),
    ("max-blocks-zero", lambda: ["submit", _job(JOB_HEAD), "--max-blocks", "0"], "--max-blocks"),
    ("restart-and-resume", lambda: ["submit", _job(JOB_HEAD), "--restart", "--resume"], "contradict"),
    ("unreachable-cluster", lambda: ["submit", _job(JOB_HEAD), "--address", "127.0.0.1:1"], "ray start --head"),
    ("address-port-out-of-range", lambda: ["submit", _job(JOB_HEAD), "--address", "127.0.0.1:99999"], "1–65535"),
    ("bad-address-syntax", lambda: ["submit", _job(JOB_HEAD), "--address", "not an address"], "host:port"),
    ("dashboard-host-with-address", lambda: ["submit", _job(JOB_HEAD), "--address", "127.0.0.1:1",
                                             "--dashboard-host", "0.0.0.0"], "only applies to the embedded Ray"),
    ("no-snapshots", lambda: ["evaluate", "--snapshot", "latest"], "no snapshots"),
    ("snapshot-not-a-number", lambda: ["evaluate", "--snapshot", "abc"], "'abc'"),
    ("snapshot-runs-missing", lambda: ["evaluate", "--runs", "elsewhere"], "elsewhere"),
    ("status-not-a-store", lambda: ["status", "--store", "not-a-store"], "not-a-store"),
    ("store-without-interactions", lambda: (StreamStore.open("bare", create=True),  # a store made, nothing ingested
                                            ["submit", _job(JOB_HEAD.replace("store: store", "store: bare"))])[1],
     "holds no interactions yet"),
    ("reasons-zero", lambda: ["recommend", "--user", "u1", "--explain", "--reasons", "0"], "--reasons: must be at least 1"),
    ("reasons-without-explain", lambda: ["recommend", "--user", "u1", "--reasons", "5"], "only applies with --explain"),
    # a path under a file: one line naming it (the OS's own refusal, not a traceback)
    ("simulate-under-a-file", lambda: ["data", "simulate", "good.csv/sim", "--users", "100", "--items", "80",
                                       "--clicks", "500"], "good.csv"),
    ("synthetic-store-under-a-file", lambda: ["data", "synthetic", "--store", "good.csv/s", "--users", "60",
                                              "--items", "50", "--interactions", "1200"], "good.csv"),
    ("tune-out-under-a-file", lambda: ["tune", _job(JOB_HEAD + "tune: {space: {student.train.lr: {grid: [0.001]}}}\n"),
                                       "--out", "good.csv/best.yaml"], "good.csv"),
]


@pytest.mark.parametrize("make_args, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(cli, store, make_args, needle):
    before = StreamStore.open(store).fingerprint()
    r = cli(*make_args())
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert [line for line in r.output.splitlines() if line.startswith("error:")].__len__() == 1
    assert r.output.strip() and not r.output.startswith("\n")  # no blank line before it (a progress bar never shown)
    assert StreamStore.open(store).fingerprint() == before
    assert not Path("not-a-store").exists() and not Path("runs").exists()


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_damaged_catalog_is_named_in_one_line_and_its_segments_stay(cli, store, damage):
    catalog = store / "catalog.duckdb"
    segments = sorted((p.name, p.read_bytes()) for p in (store / "segments").iterdir())
    size = catalog.stat().st_size
    with open(catalog, "r+b") as f:
        if damage == "truncated":  # a copy cut short: blocks past the end
            f.truncate(size // 2)
        else:  # blocks overwritten past the headers: their checksums no longer match
            f.seek(3 * 4096)
            f.write(bytes(size - 3 * 4096))
    for args in (["ingest", _file("new.csv", GOOD_CSV.replace("u1", "u7")), "--store", "store"],
                 ["status", "--store", "store"], ["status", "--store", "store", "--verify"]):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "catalog of the stream store store is damaged" in r.output and "Traceback" not in r.output
        assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1
    assert sorted((p.name, p.read_bytes()) for p in (store / "segments").iterdir()) == segments


def test_bad_rows_are_quarantined_and_counted(cli, store):
    path = _file("mixed.csv", "user,item,timestamp\n"
                 "u3,i1,1600000300\n"     # taken
                 "u4,i2,1600000400\n"     # taken
                 ",i9,1600000500\n"       # missing user id
                 "u5,i9,not-a-time\n"     # unparseable timestamp
                 "u6,i9,4200000000\n"     # timestamp out of range (after 2100)
                 f"u{'x' * 300},i9,1600000600\n"  # an id of 301 characters
                 "u1,i1,1600000000\n"     # duplicate of a stored row
                 "u3,i1,1600000300\n")    # duplicate within the file
    r = cli("ingest", path, "--store", store)
    assert r.exit_code == 0, r.output
    assert "2 rows taken, 6 quarantined (2 new users, 0 new items)" in r.output
    for reason in ("missing user id", "unparseable timestamp", "timestamp out of range", "id longer than 256",
                   "duplicate of stored row", "duplicate row"):
        assert f"1 × {reason}" in r.output
    s = StreamStore.open(store).status()
    assert s["rows"] == 5 and sum(s["quarantine"].values()) == 6


def test_duplicate_batch_is_a_noop_and_out_of_order_rows_are_ordered_by_time(cli, store):
    before = StreamStore.open(store).fingerprint()
    r = cli("ingest", "good.csv", "--store", store)
    assert r.exit_code == 0 and "already ingested" in r.output
    assert StreamStore.open(store).fingerprint() == before
    late = _file("late.csv", "user,item,timestamp\nu9,i9,1500000000\nu8,i8,1700000000\nu7,i7,1400000000\n")
    assert cli("ingest", late, "--store", store).exit_code == 0
    st = StreamStore.open(store)
    plan = st.ensure_plan(0.5, 1, (1.0, 0.0, 0.0), 0)
    rows = st.read_blocks(plan.plan_id, 1)
    assert list(rows.ts) == sorted(rows.ts)  # the stream is cut by time, whatever the arrival order


def test_a_float_id_column_quarantines_nan_as_a_missing_id(cli, store):
    path = _file("floatid.parquet", pa.table({"user": [7.0, float("nan"), 8.0], "item": ["i1", "i2", "i3"],
                                              "timestamp": [1600000300, 1600000400, 1600000500]}))
    r = cli("ingest", path, "--store", store)
    assert r.exit_code == 0, r.output
    assert "2 rows taken, 1 quarantined" in r.output and "1 × missing user id" in r.output
    st = StreamStore.open(store)
    assert st.status()["users"] == 4 and sorted(st.external_ids("user", range(4))) == ["7", "8", "u1", "u2"]


def test_binary_bytes_of_a_bad_file_never_reach_the_message(cli, store):
    from continual_kd.errors import excerpt

    assert excerpt("a\x00\x01\ufffd\ufffdb\nsecond line") == "a?b" and excerpt("x" * 300, 10) == "x" * 9 + "…"
    junk = _file("junk.csv", b"user,item,label\n" + bytes(range(128, 256)) * 8 + b"\n1,2,3,4\n")
    r = cli("ingest-labelled", junk, "--store", "store")
    assert r.exit_code == 2 and "junk.csv" in r.output, r.output
    line = next(line for line in r.output.splitlines() if line.startswith("error:"))
    assert "\ufffd" not in r.output and all(ch.isprintable() for ch in line) and len(line) < 400


def test_a_ragged_record_is_named_by_the_line_it_starts_on(tmp_path):
    from continual_kd.stream.ingest import _ragged_line

    f = tmp_path / "q.csv"  # records that span two lines (quoted newlines); the second one has a field too many
    f.write_text('user,item,timestamp\nu1,"i\n1",1600000000\n\nu2,"i\n2",1600000001,9\n')
    assert _ragged_line(f, ",", 3) == 5
    f.write_text("user\titem\ttimestamp\nu1\ti1\t1\n")
    assert _ragged_line(f, "\t", 3) is None


def test_watch_once_says_which_files_it_left_because_they_just_changed(cli, store):
    """A file copied in a moment ago (its time is now) is not taken by `--watch --once` under the default
    `--settle 2s`: it is named and left, the store unchanged, exit 0; the next look with `--settle 0` takes it."""
    inbox = Path("inbox")
    inbox.mkdir()
    (inbox / "fresh.csv").write_text(GOOD_CSV.replace("u1", "u9"))
    ahead = time.time() + 30  # its time a little ahead of the clock: "just changed" however slow this box is
    os.utime(inbox / "fresh.csv", (ahead, ahead))
    before = StreamStore.open(store).fingerprint()
    r = cli("ingest", "--store", "store", "--watch", "inbox", "--once")
    assert r.exit_code == 0, r.output
    assert "1 file(s) in inbox changed within the last 2s" in r.stderr and "fresh.csv" in r.stderr
    assert StreamStore.open(store).fingerprint() == before and (inbox / "fresh.csv").exists()
    r = cli("ingest", "--store", "store", "--watch", "inbox", "--once", "--settle", "0")
    assert r.exit_code == 0 and "left for the next look" not in r.stderr and not (inbox / "fresh.csv").exists()
    assert StreamStore.open(store).fingerprint() != before


@pytest.mark.parametrize("start, end, says", [(0, 3, "running 0..2"), (2, 3, "running 2"),
                                              (3, 3, "every block done; waiting for new data")])
def test_the_plan_line_says_what_runs(start, end, says):
    """`submit --follow` after every fixed block was done printed "running 3..2"."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from continual_kd.cli import _BlockProgress

    buf = io.StringIO()
    progress = _BlockProgress(Console(file=buf, width=200))
    plan = SimpleNamespace(plan_id="p1", num_blocks=3, blocks=[SimpleNamespace(rows=10)] * 3)
    progress({"type": "plan", "plan": plan, "start": start, "end": end})
    progress.stop()
    assert buf.getvalue().splitlines()[0] == f"block plan p1: 3 blocks (10, 10, 10 rows), {says}"
