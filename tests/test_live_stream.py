"""A live stream: new data becomes new blocks of the running job (issue 10, items 1-3 and 5).

The cut rules are checked on hand-made timestamps; the end-to-end tests ingest the first half of a
generated stream, run `ckd submit --follow` as a separate process on the session's Ray, ingest the rest
file by file (through `ckd ingest --watch`) while it runs, stop it with SIGTERM (or SIGKILL it between two
ingests and resume), and compare every block with a run over the same data submitted at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from continual_kd.config import load_job, parse_job
from continual_kd.errors import CkdError
from continual_kd.stream import StreamStore
from continual_kd.stream.live import Cursor, LivePolicy, cut_blocks
from continual_kd.types import TEST, TRAIN, VALID

DAY = 86400
T0 = 1_600_000_000 // DAY * DAY  # a UTC midnight
SPLIT = (0.8, 0.1, 0.1)


def _window(days: int = 1, base_until=None, base_fraction=None) -> LivePolicy:
    return LivePolicy(days * DAY, None, base_fraction, base_until, SPLIT, 0)


# ---------------------------------------------------------------------------------------- the cut rules


def test_windows_are_cut_when_data_past_their_end_arrived_and_skip_empty_ones():
    ts = np.array([T0 + 10, T0 + 20, T0 + DAY + 5, T0 + 3 * DAY + 1, T0 + 3 * DAY + 2])
    cuts = cut_blocks(_window(), Cursor(), ts, max_ts=int(ts[-1]))
    # day 0 (2 rows), day 1 (1 row); day 2 is empty and skipped; day 3 has no data past its end yet
    assert [(c.take.tolist(), c.bound_start - T0, c.bound_end - T0, c.late) for c in cuts] == [
        ([0, 1], 0, DAY, 0), ([2], DAY, 2 * DAY, 0)]
    flushed = cut_blocks(_window(), Cursor(), ts, max_ts=int(ts[-1]), flush=True)
    assert [(c.take.tolist(), c.bound_start - T0) for c in flushed][-1] == ([3, 4], 3 * DAY)


def test_late_rows_join_the_next_block_and_are_counted():
    # blocks 0 (day 0) and 1 (day 1) are cut; pending: two late rows of day 0, one of day 1, three of day 2
    pending = np.array([T0 + 5, T0 + 7, T0 + DAY + 3, T0 + 2 * DAY, T0 + 2 * DAY + 1, T0 + 2 * DAY + 9])
    cursor = Cursor(blocks=2, last_end=T0 + 2 * DAY)
    assert cut_blocks(_window(), cursor, pending, max_ts=T0 + 2 * DAY + 9) == []  # day 2 is not complete
    [cut] = cut_blocks(_window(), cursor, pending, max_ts=T0 + 3 * DAY)
    assert (cut.take.tolist(), cut.bound_start - T0, cut.late) == ([0, 1, 2, 3, 4, 5], 2 * DAY, 3)


def test_base_block_until_a_time_or_a_fraction_then_windows_or_rows():
    ts = T0 + np.array([0, 100, 200, DAY + 1, DAY + 2, 2 * DAY + 1, 2 * DAY + 5, 3 * DAY])
    cuts = cut_blocks(_window(base_until=T0 + 150), Cursor(), ts, max_ts=int(ts[-1]))
    # base = rows before T0+150; windows of 1 day from there: [150, 150+DAY) holds rows 2..4
    assert [c.take.tolist() for c in cuts] == [[0, 1], [2, 3, 4], [5, 6]]
    assert cut_blocks(_window(base_until=T0 + 10 * DAY), Cursor(), ts, max_ts=int(ts[-1])) == []
    # base_fraction 0.5 of 8 rows → rows before the 5th row's time (DAY + 2)
    cuts = cut_blocks(_window(base_fraction=0.5), Cursor(), ts, max_ts=int(ts[-1]))
    assert [c.take.tolist() for c in cuts][0] == [0, 1, 2, 3]
    rows = LivePolicy(None, 3, None, T0 + 150, SPLIT, 0)
    cuts = cut_blocks(rows, Cursor(), ts, max_ts=int(ts[-1]))
    assert [c.take.tolist() for c in cuts] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    late = cut_blocks(rows, Cursor(blocks=3, last_end=T0 + 3 * DAY), np.array([T0 + 1, T0 + 4 * DAY, T0 + 5 * DAY]),
                      max_ts=T0 + 5 * DAY)
    assert [(c.take.tolist(), c.late) for c in late] == [([0, 1, 2], 1)]
    with pytest.raises(CkdError, match="base_until"):
        cut_blocks(_window(base_until=T0 - 1), Cursor(), ts, max_ts=int(ts[-1]))


def test_store_appends_blocks_never_changes_cut_ones_and_splits_each_block_alone(tmp_path):
    store = StreamStore.open(tmp_path / "s", create=True)
    rng = np.random.default_rng(0)

    def rows(lo, hi, n, tag):
        ts = np.sort(rng.integers(T0 + lo, T0 + hi, n))
        return pa.table({"user": [f"u{x}" for x in rng.integers(0, 20, n)],
                         "item": [f"i{x}" for x in rng.integers(0, 30, n)], "timestamp": ts}), tag

    store.ingest_table(*rows(0, 2 * DAY, 200, "a"))
    plan, waiting = store.advance_live_plan(_window())
    assert [b.rows for b in plan.blocks] == [int((store.read_block(plan.plan_id, 0).ts < T0 + DAY).sum())]
    first = store.read_block(plan.plan_id, 0)
    assert waiting["pending_rows"] == 200 - plan.blocks[0].rows and "2020-09-15 00:00:00" in waiting["needs"]
    store.ingest_table(*rows(0, 3 * DAY, 90, "b"))  # late rows for day 0 and 1, new rows for day 2
    plan, _ = store.advance_live_plan(_window())
    again = store.read_block(plan.plan_id, 0)
    assert np.array_equal(first.users, again.users) and np.array_equal(first.split, again.split)
    late_day0 = plan.blocks[1].late
    assert late_day0 > 0 and plan.num_blocks == 2  # day 2 waits for data past its end
    b1 = store.read_block(plan.plan_id, 1)
    assert int((b1.ts < T0 + DAY).sum()) == late_day0 and set(np.unique(b1.split)) == {TRAIN, VALID, TEST}
    status = store.status()["plans"][0]
    assert status["late_rows"] == late_day0 and status["pending_rows"] == 290 - plan.total_rows
    plan, waiting = store.advance_live_plan(_window(), flush=True)
    assert plan.total_rows == 290 and waiting["pending_rows"] == 0
    assert plan.blocks[-1].num_users == store.num_users


def test_live_block_spec_errors_name_the_field():
    assert parse_job({"blocks": {"window": "6h"}}).blocks.window_seconds == 6 * 3600
    assert parse_job({"blocks": {"rows": 500, "base_fraction": 0.4}}).blocks.base_fraction == 0.4
    assert parse_job({"blocks": {"window": "1d", "base_until": "2020-09-14T00:00:00Z"}}).blocks.base_until == T0 + DAY
    for blocks, message in [
        ({"window": "1 fortnight"}, "blocks.window: not a duration (got '1 fortnight'); write e.g. 30m, 6h, 1d or 7d"),
        ({"window": "1d", "rows": 10}, "blocks.rows: window and rows exclude each other (got 10)"),
        ({"window": "1d", "incremental": 5}, "blocks.incremental: a live policy"),
        ({"base_until": 5}, "blocks.base_until: only a live policy has it (got 5)"),
        ({"rows": 0}, "blocks.rows: must be a positive integer (got 0)"),
        ({"window": "1d", "base_until": "soon"}, "blocks.base_until: not a timestamp (got 'soon')"),
    ]:
        with pytest.raises(CkdError) as e:
            parse_job({"blocks": blocks}, "job.yaml")
        assert str(e.value).startswith("job.yaml: " + message), str(e.value)


# ---------------------------------------------------------------------------------------- ingest --watch


def test_watch_takes_each_file_once_and_refuses_a_bad_one_with_the_reason(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_text(f"user,item,timestamp\nu1,i1,{T0}\nu2,i1,{T0 + 5}\n")
    (inbox / "bad.csv").write_text("user,timestamp\nu1,1600000000\n")  # no item column
    (inbox / "b.csv.part").write_text(f"user,item,timestamp\nu3,i2,{T0}\n")  # still being written
    r = cli("ingest", "--store", "s", "--watch", inbox, "--once", "--settle", "0")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in inbox.iterdir()) == ["b.csv.part", "ingested", "refused"]
    assert (inbox / "ingested" / "a.csv").exists()
    assert "required item column 'item' not found" in (inbox / "refused" / "bad.csv.reason.txt").read_text()
    (inbox / "b.csv.part").rename(inbox / "b.csv")  # the writer is done: moved in whole
    (inbox / "a.csv").write_text(f"user,item,timestamp\nu1,i1,{T0}\nu2,i1,{T0 + 5}\n")  # the same content again
    r = cli("ingest", "--store", "s", "--watch", inbox, "--once", "--settle", "0")
    assert r.exit_code == 0 and "already ingested" in r.output, r.output
    assert sorted(p.name for p in (inbox / "ingested").iterdir()) == ["a-2.csv", "a.csv", "b.csv"]
    assert StreamStore.open(tmp_path / "s").status()["rows"] == 3


# ---------------------------------------------------------------------------------------- follow, end to end


JOB = """
name: {name}
source: {{dataset: store, store: {store}}}
blocks: {{window: 1d, base_until: {base_until}}}
teachers:
  - {{name: mf16, backbone: mf, dim: 16, train: {{epochs_base: 3, epochs_block: 2, batch_size: 512}}}}
student: {{dim: 8, train: {{epochs_base: 3, epochs_block: 2, batch_size: 512}}}}
distill: {{terms: [{{name: rrd, weight: 0.01, k: 10, pool: 30, uninteresting: 10}}]}}
eval: {{ks: [10, 20]}}
"""
DAYS = [("d0-2", 0, 3), ("d3", 3, 4), ("d4", 4, 5), ("d5", 5, 6)]  # the first file is the first half


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    """A 6-day generated stream: all of it in one file, and the same rows cut into day files."""
    from continual_kd.data.synthetic import SyntheticConfig, generate_stream

    where = tmp_path_factory.mktemp("stream")
    table = generate_stream(SyntheticConfig(users=120, items=100, interactions=2400, periods=6, period_seconds=DAY,
                                            start_ts=T0, seed=1))
    pq.write_table(table, where / "all.parquet")
    ts = table.column("timestamp").to_numpy()
    for name, lo, hi in DAYS:
        pq.write_table(table.filter(pa.array((ts >= T0 + lo * DAY) & (ts < T0 + hi * DAY))), where / f"{name}.parquet")
    return where


@pytest.fixture(scope="module")
def at_once(ray_cluster, stream_files, tmp_path_factory):
    """The reference: every file in the store first, one `submit --flush` (all blocks, the last one flushed)."""
    from continual_kd.runtime.coordinator import run_job

    where = tmp_path_factory.mktemp("at-once")
    StreamStore.open(where / "store", create=True).ingest_file(stream_files / "all.parquet")
    (where / "job.yaml").write_text(JOB.format(name="ref", store=where / "store", base_until=T0 + 2 * DAY))
    cwd = os.getcwd()
    os.chdir(where)
    try:
        result = run_job(load_job(where / "job.yaml"), flush=True)
    finally:
        os.chdir(cwd)
    assert [h["block"] for h in result.history] == [0, 1, 2, 3, 4]
    return [h["metrics"] for h in result.history]


def _follower(job: Path, cwd: Path) -> subprocess.Popen:
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "token", "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    env.pop("CKD_FAILPOINT", None)
    return subprocess.Popen([sys.executable, "-m", "continual_kd.cli", "submit", str(job), "--follow", "--poll", "0.3s",
                             "--address", ray.get_runtime_context().gcs_address], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_commits(store: StreamStore, job: str, blocks: list[int], proc: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if [c["block"] for c in store.committed_blocks(job)] == blocks:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the follower exited ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"blocks {blocks} not committed in {timeout}s: {store.committed_blocks(job)}")


def _drop(cli, stream_files: Path, inbox: Path, store: Path, name: str) -> None:
    """A new file arrives (moved in whole) and the watcher takes it."""
    os.link(stream_files / f"{name}.parquet", inbox / f"{name}.parquet")
    r = cli("ingest", "--store", store, "--watch", inbox, "--once", "--settle", "0")
    assert r.exit_code == 0 and "rows taken" in r.output, r.output


def _finish_and_compare(job: Path, tmp_path: Path, stream_files: Path, at_once: list[dict]) -> None:
    """Flush the last (incomplete) window, then: each block committed once, rows covered = rows ingested, and
    every block's metrics equal to the run over the same data submitted at once."""
    from continual_kd.runtime.coordinator import run_job

    result = run_job(load_job(job), flush=True)
    store = StreamStore.open(tmp_path / "store")
    everything = store.committed_blocks("live", include_revoked=True)
    assert [c["block"] for c in everything] == [0, 1, 2, 3, 4]  # nothing revoked, nothing committed twice
    assert max(Counter(c["block"] for c in everything).values()) == 1
    assert everything[-1]["rows_covered"] == pq.read_metadata(stream_files / "all.parquet").num_rows
    assert store.status()["plans"][0]["late_rows"] == 0
    assert [h["metrics"] for h in result.history] == at_once


def test_follow_runs_each_new_block_once_survives_sigkill_and_stops_on_sigterm(cli, at_once, stream_files, tmp_path,
                                                                                 monkeypatch):
    """Half the stream is in; the follower runs the base block; day files arrive one by one (each new day
    completes the window before it); the follower is SIGKILLed between two ingests, a file arrives while none
    runs, a re-submit resumes after the last commit; SIGTERM stops it while it waits; --flush ends the stream."""
    monkeypatch.chdir(tmp_path)
    inbox, store_dir = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    job = tmp_path / "live.yaml"
    job.write_text(JOB.format(name="live", store=store_dir, base_until=T0 + 2 * DAY))
    _drop(cli, stream_files, inbox, store_dir, "d0-2")
    store = StreamStore.open(store_dir)
    proc = _follower(job, tmp_path)
    try:
        _wait_for_commits(store, "live", [0], proc)  # the base block; day 2 waits for data past its end
        _drop(cli, stream_files, inbox, store_dir, "d3")
        _wait_for_commits(store, "live", [0, 1], proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        _drop(cli, stream_files, inbox, store_dir, "d4")  # arrives while no follower runs
        proc = _follower(job, tmp_path)  # resumes after block 1
        _wait_for_commits(store, "live", [0, 1, 2], proc)
        _drop(cli, stream_files, inbox, store_dir, "d5")
        _wait_for_commits(store, "live", [0, 1, 2, 3], proc)
        time.sleep(1.0)  # it waits for data past day 5, which never comes
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "waiting for data at or after 2020-09-19 00:00:00 UTC" in out, out
    assert "stopped: the last committed block is 3" in out, out
    assert [c["block"] for c in store.committed_blocks("live")] == [0, 1, 2, 3]
    _finish_and_compare(job, tmp_path, stream_files, at_once)
