"""Nothing lost, nothing counted twice: actors killed mid-block, the driver SIGKILLed, damaged snapshots.

Each scenario ends with the same committed blocks (catalog records, no block active twice) and the
same metrics as an uninterrupted run of the same job (models are seeded per name, not per job).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray

from continual_kd.config import load_job
from continual_kd.runtime.coordinator import run_job
from continual_kd.snapshots import list_snapshots
from continual_kd.stream import StreamStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """The uninterrupted run, once per module: per-block metrics of the tiny job."""
    from conftest import TINY_JOB

    where = tmp_path_factory.mktemp("reference")
    (where / "ref.yaml").write_text(TINY_JOB.format(name="ref", seed=0, store="stores/tiny"))
    cwd = os.getcwd()
    os.chdir(where)
    try:
        result = run_job(load_job(where / "ref.yaml"))
    finally:
        os.chdir(cwd)
    return [h["metrics"] for h in result.history]


def assert_clean_lineage(tmp_path: Path, job: str, reference: list[dict], history: list[dict]) -> list[dict]:
    store = StreamStore.open(tmp_path / "stores" / "tiny")
    active = store.committed_blocks(job)
    assert [c["block"] for c in active] == [0, 1, 2]
    everything = store.committed_blocks(job, include_revoked=True)
    assert max(Counter(c["block"] for c in everything if c["revoked_at"] is None).values()) == 1
    assert [c["rows_covered"] for c in active] == [1500, 2250, 3000]
    assert list_snapshots(tmp_path / "runs" / job) == [0, 1, 2]
    assert [h["metrics"] for h in history] == reference
    return everything


def _kill_on(stage: str, block: int, actor: str, killed: list):
    def on_event(e: dict) -> None:
        if e["type"] == "stage" and e["block"] == block and e["stage"] == stage and not killed:
            ray.kill(ray.get_actor(actor), no_restart=False)  # a crash: Ray restarts the actor
            killed.append(actor)
    return on_event


@pytest.mark.parametrize("actor, stage, block", [
    ("student", "update student", 1),       # the student dies while the teachers already moved on
    ("teacher:mf32", "teacher knowledge", 2),  # a teacher dies after its update, before teaching
    ("teacher:mf32", "update teachers", 0),    # a teacher dies in the base block
], ids=["student-b1", "teacher-b2", "teacher-b0"])
def test_actor_killed_mid_block_gives_the_uninterrupted_result(reference, tiny_job, tmp_path, actor, stage, block):
    job = tiny_job(f"kill-{block}")
    killed: list = []
    result = run_job(load_job(job), progress=_kill_on(stage, block, actor, killed))
    assert killed == [actor] and result.retries == 1
    assert_clean_lineage(tmp_path, f"kill-{block}", reference, result.history)


def _driver(job: Path, tmp_path: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    env.pop("CKD_FAILPOINT", None)
    if failpoint:
        env["CKD_FAILPOINT"] = failpoint
    address = ray.get_runtime_context().gcs_address
    return subprocess.run([sys.executable, "-m", "continual_kd.cli", "submit", str(job), "--address", address,
                           "--json", "out.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_driver_sigkill_at_any_point_then_resume_gives_the_uninterrupted_result(reference, tiny_job, tmp_path):
    """One lineage, killed three times: between blocks, inside a stage, and after a snapshot was
    written but before it was committed; each re-submit continues where the last commit left off."""
    job = tiny_job("driver")
    for failpoint, committed in [("commit:0", [0]),                 # between blocks
                                 ("stage:1:update student", [0]),   # inside a stage
                                 ("snapshot:1", [0])]:              # snapshot 1 complete, not committed
        run = _driver(job, tmp_path, failpoint)
        assert run.returncode == -9, run.stdout + run.stderr  # SIGKILL
        store = StreamStore.open(tmp_path / "stores" / "tiny")
        assert [c["block"] for c in store.committed_blocks("driver")] == committed, failpoint
    final = _driver(job, tmp_path)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "snapshot complete but not committed" in final.stdout  # block 1 rolled forward, not retrained
    history = json.loads((tmp_path / "out.json").read_text())["history"]
    everything = assert_clean_lineage(tmp_path, "driver", reference, history)
    assert len(everything) == 3  # nothing revoked, nothing consumed twice


@pytest.mark.parametrize("damage", ["weights", "manifest"])
def test_damaged_snapshot_is_refused_and_resume_falls_back(reference, cli, tiny_job, tmp_path, damage):
    job = tiny_job("flip")
    assert cli("submit", job).exit_code == 0
    snapshot = tmp_path / "runs" / "flip" / "block-0002"
    if damage == "weights":  # a flipped byte: the manifest's checksum no longer matches
        target, needle = snapshot / "student.pt", "student.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:  # an edited manifest: still valid JSON, but without what every reader takes from it
        target, needle = snapshot / "manifest.json", "model_info"
        manifest = json.loads(target.read_text())
        del manifest["model_info"]
        target.write_text(json.dumps(manifest))

    r = cli("evaluate", "--snapshot", "2")
    assert r.exit_code == 2 and needle in r.output and "damaged" in r.output and "Traceback" not in r.output
    r = cli("evaluate", "--snapshot", "latest", "--json", "ev.json")
    assert r.exit_code == 0 and "block-0002 is damaged" in r.output and needle in r.output
    assert json.loads((tmp_path / "ev.json").read_text())["block"] == 1

    r = cli("submit", job, "--json", "resumed.json")  # block 2 is revoked and trained again (never rolled forward)
    assert r.exit_code == 0, r.output
    assert "revoked 1 committed block" in r.output and "committed it now" not in r.output
    history = json.loads((tmp_path / "resumed.json").read_text())["history"]
    everything = assert_clean_lineage(tmp_path, "flip", reference, history)
    revoked = [c for c in everything if c["revoked_at"] is not None]
    assert [(c["block"], c["revoked_reason"]) for c in revoked] == [(2, "snapshot missing or damaged")]
