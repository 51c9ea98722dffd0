"""Issue #7, items 1, 3, 4, 9, through the real CLI: --restart deletes only this job's snapshots and
--job stays under --runs; a failed store build leaves no store behind; user text is printed as-is,
never as Rich markup; one running driver per job (an OS file lock, freed even by SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from continual_kd.locks import LOCK_FILE, driver_lock
from continual_kd.snapshots import list_snapshots, write_snapshot
from continual_kd.stream import StreamStore

REPO = Path(__file__).resolve().parents[1]

# a student-only job (no teachers, no KD terms): the fastest real run
JOB = """
name: {name}
seed: 0
source:
  dataset: {dataset}
  store: {store}
  synthetic: {{users: 60, items: 50, interactions: 1200, periods: 2, seed: 3}}
blocks: {{base_fraction: 0.5, incremental: 1, split: [0.4, 0.3, 0.3]}}
student:
  dim: 4
  train: {{epochs_base: 2, epochs_block: 1, batch_size: 256}}
eval: {{ks: [5, 20]}}
"""


def write_job(name: str = "tiny", store: str = "stores/s", dataset: str = "synthetic", extra: str = "") -> Path:
    path = Path(f"{name}.yaml").absolute()
    path.write_text(JOB.format(name=name, store=store, dataset=dataset) + extra)
    return path


@pytest.fixture
def here(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_snapshot(runs_dir: Path, block: int, job: str) -> Path:
    """A real snapshot folder (snapshots.write_snapshot) whose manifest names ``job``."""
    return write_snapshot(runs_dir, block, {"student": {"w": torch.ones(2)}}, {"job": job}).path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def env() -> dict:
    e = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    e.pop("CKD_DEBUG", None)
    return e


# ------------------------------------------------------------------ 1. --restart and --job stay inside


@pytest.mark.parametrize("snap_dir", [".", "..", "runs"], ids=["cwd", "parent-of-cwd", "every-jobs-runs"])
def test_restart_refuses_a_folder_that_is_not_this_jobs_snapshots(cli, here, snap_dir):
    Path("runs/other").mkdir(parents=True)
    keep = Path("runs/other/notes.txt")
    keep.write_text("not a snapshot")
    job = write_job(extra=f"snapshots: {{dir: '{snap_dir}'}}\n")
    r = cli("submit", job, "--restart")
    assert r.exit_code == 2, r.output
    assert len(error_lines(r.output)) == 1 and "Traceback" not in r.output
    assert "refusing to delete" in r.output
    assert keep.read_text() == "not a snapshot" and job.is_file()


def test_restart_refuses_other_jobs_snapshots_and_stray_files_and_revokes_nothing(cli, here):
    runs = Path("runs/tiny")
    fake_snapshot(runs, 0, "tiny")
    other = fake_snapshot(runs, 1, "other")  # another job writing into the same snapshots.dir
    job = write_job()
    r = cli("submit", job, "--restart")
    assert r.exit_code == 2 and len(error_lines(r.output)) == 1, r.output
    assert "block-0001 is a snapshot of job 'other'" in r.output
    assert list_snapshots(runs) == [0, 1] and (other / "student.pt").is_file()

    os.replace(other, here / "moved-away")
    (runs / "block-0000" / "mine.txt").write_text("x")  # a file the snapshot's manifest does not list
    r = cli("submit", job, "--restart")
    assert r.exit_code == 2 and "block-0000 is not a snapshot this job wrote" in r.output, r.output
    assert (runs / "block-0000" / "mine.txt").is_file()

    (runs / "block-0000" / "mine.txt").unlink()
    (runs / "README").write_text("x")
    r = cli("submit", job, "--restart")
    assert r.exit_code == 2 and "README is not a snapshot this job wrote" in r.output, r.output
    assert list_snapshots(runs) == [0]


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "x..y"])
def test_unsafe_job_names_are_refused_before_anything_is_written(cli, here, name):
    job = write_job()
    job.write_text(job.read_text().replace("name: tiny", f"name: '{name}'"))
    r = cli("submit", job)
    assert r.exit_code == 2 and len(error_lines(r.output)) == 1, r.output
    assert "name" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in here.iterdir()) == ["tiny.yaml"]


@pytest.mark.parametrize("command", ["evaluate", "recommend"])
def test_job_option_cannot_reach_outside_runs(cli, here, command):
    fake_snapshot(Path("outside"), 0, "x")  # snapshots next to runs/, not under it
    Path("runs").mkdir()
    args = [command, "--runs", "runs", "--job", "../outside"] + (["--user", "u1"] if command == "recommend" else [])
    r = cli(*args)
    assert r.exit_code == 2 and len(error_lines(r.output)) == 1, r.output
    assert "'../outside'" in r.output and "not a path" in r.output


def test_restart_removes_exactly_this_jobs_snapshots_then_runs_again(cli, here, ray_cluster):
    # an empty store left by a failed build of an older version: the submit fills it (item 3)
    StreamStore.open("stores/s", create=True)
    job = write_job()
    r = cli("submit", job, "--max-blocks", "2")
    assert r.exit_code == 0, r.output
    runs = Path("runs/tiny")
    assert list_snapshots(runs) == [0, 1] and not (runs / LOCK_FILE).exists()
    store = StreamStore.open("stores/s")
    assert [c["block"] for c in store.committed_blocks("tiny")] == [0, 1]

    (runs / "keep-me.txt").write_text("mine")
    r = cli("submit", job, "--restart", "--max-blocks", "1")
    assert r.exit_code == 2 and "keep-me.txt is not a snapshot this job wrote" in r.output, r.output
    assert [c["block"] for c in store.committed_blocks("tiny")] == [0, 1]  # refused before revoking

    (runs / "keep-me.txt").unlink()
    (runs / ".tmp-block-0002-0123abcd").mkdir()  # an interrupted write's leftover is this job's too
    r = cli("submit", job, "--restart", "--max-blocks", "1")
    assert r.exit_code == 0, r.output
    assert "removed 2 snapshot(s)" in r.output
    assert sorted(p.name for p in runs.iterdir()) == ["block-0000"]
    assert [c["block"] for c in store.committed_blocks("tiny")] == [0]
    assert len(store.committed_blocks("tiny", include_revoked=True)) == 3


# ------------------------------------------------------------------ 3. a failed store build leaves nothing


_CLI_WITH_CTRL_C = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                    "from continual_kd.cli import main; main()")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_store_build_leaves_no_store_and_the_next_build_works(cli, here, sig):
    big = ["--users", "5000", "--items", "2000", "--interactions", "1000000"]
    proc = subprocess.Popen([sys.executable, "-c", _CLI_WITH_CTRL_C, "data", "synthetic", "--store", "stores/s", *big],
                            cwd=here, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    stores = here / "stores"
    while not (stores.is_dir() and any(stores.iterdir())):  # the build has begun
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)
    assert proc.poll() is None, "the build finished before it could be interrupted; make it bigger"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    said = proc.stdout.read()
    proc.stdout.close()
    assert not (stores / "s").exists()  # no half-built (or empty) store at the store's path
    if sig == signal.SIGINT:
        assert not stores.exists()  # its temp folder, and the stores/ folder it made, were removed on the way out
        # one line and the shell's code for ^C, whatever the library under it made of the interrupt
        assert proc.returncode == 130 and "interrupted (Ctrl-C)" in said and "Traceback" not in said, said[-2000:]

    r = cli("data", "synthetic", "--store", "stores/s", "--users", "60", "--items", "50", "--interactions", "1200",
            "--periods", "2", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert "1,200 rows taken" in r.output
    plan = StreamStore.open("stores/s").ensure_plan(0.5, 1, (0.8, 0.1, 0.1), 0)
    assert sum(b.rows for b in plan.blocks) == 1200


def test_build_refuses_a_folder_with_other_files_and_leaves_it_alone(cli, here):
    Path("stores/s").mkdir(parents=True)
    Path("stores/s/data.csv").write_text("keep")
    r = cli("data", "synthetic", "--store", "stores/s", "--users", "60", "--items", "50", "--interactions", "1200")
    assert r.exit_code == 2 and "other files" in r.output, r.output
    assert sorted(p.name for p in Path("stores/s").iterdir()) == ["data.csv"]
    assert sorted(p.name for p in Path("stores").iterdir()) == ["s"]


# ------------------------------------------------------------------ 4. user text printed as-is


def test_ingest_prints_file_names_as_they_are(cli, here):
    names = ["file[red].csv", "x[/]y.csv", "a:thumbs_up:b.csv", "[bold]z\\.csv"]  # x[/]y.csv: ]y.csv in x[
    Path("x[").mkdir()
    for i, name in enumerate(names):
        Path(name).write_text(f"user,item,timestamp\nu{i},i{i},{1600000000 + i}\n")
    r = cli("ingest", *names, "--store", "s")
    assert r.exit_code == 0, r.output
    for name in names:
        assert f"{name}: 1 rows taken, 0 quarantined" in r.output
    r = cli("status", "--store", "s")
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in names)


def test_recommend_and_status_print_ids_with_markup_characters(cli, here, ray_cluster):
    items = ["i[/]0", "[red]i1", "i2[", "i:smile:3", "i4\\", "i5", "i6", "i7", "i8", "i9"]
    rows, t = ["user,item,timestamp"], 1600000000
    for rep in range(6):  # user u has seen items u, u+3, u+6 (mod 10), each twice, spread over time
        for u in range(30):
            t += 1
            rows.append(f"u[/]{u},{items[(u + 3 * (rep % 3)) % 10]},{t}")
    Path("weird.csv").write_text("\n".join(rows) + "\n")
    r = cli("ingest", "weird.csv", "--store", "stores/w")
    assert r.exit_code == 0 and "180 rows taken" in r.output, r.output
    job = write_job(name="w", store="stores/w", dataset="store")
    r = cli("submit", job)
    assert r.exit_code == 0, r.output

    r = cli("recommend", "--user", "u[/]1", "--user", "u[/]2", "-k", "7", "--job", "w", "--json", "rec.json")
    assert r.exit_code == 0, r.output
    served = json.loads(Path("rec.json").read_text())["recommendations"]
    for u, seen in (("u[/]1", {1, 4, 7}), ("u[/]2", {2, 5, 8})):
        assert {e["item"] for e in served[u]} == {items[i] for i in range(10) if i not in seen}
        assert u in r.output
        row = next(line for line in r.output.splitlines() if u in line)
        assert all(e["item"] in row for e in served[u])  # printed exactly as they are
    r = cli("status", "--store", "stores/w", "--runs", "runs")
    assert r.exit_code == 0 and "weird.csv" in r.output, r.output


# ------------------------------------------------------------------ 9. one running driver per job


_HOLD = """
import sys, time
from pathlib import Path
from continual_kd.locks import driver_lock
with driver_lock(Path(sys.argv[1]), "job 'tiny'"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_submit_of_a_running_job_names_the_driver_and_exits_2(here):
    job = write_job()
    with driver_lock(Path("runs/tiny"), "job 'tiny'"):
        run = subprocess.run([sys.executable, "-m", "continual_kd.cli", "submit", str(job), "--address",
                              "127.0.0.1:1"], cwd=here, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = error_lines(run.stderr)
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"driver pid {os.getpid()} on host {socket.gethostname()} (since 20" in lines[0]
    assert "job 'tiny' is already running" in lines[0] and LOCK_FILE in lines[0]
    assert not Path("stores").exists()  # refused before anything was built or written
    assert not Path("runs").exists()  # the lock's folders go with the lock


def test_a_sigkilled_driver_frees_its_lock(cli, here):
    job = write_job()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, "runs/tiny"], cwd=here, env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("submit", job, "--address", "127.0.0.1:1")
        assert r.exit_code == 2 and f"driver pid {holder.pid} on host" in r.output, r.output
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (here / "runs" / "tiny" / LOCK_FILE).exists()  # the stale file stays; the OS dropped the lock
    r = cli("submit", job, "--address", "127.0.0.1:1")  # gets past the lock, to the address check
    assert r.exit_code == 2 and "already running" not in r.output and "ray start --head" in r.output, r.output
    assert not (here / "runs" / "tiny" / LOCK_FILE).exists()  # released, and its file removed
