"""End to end under a real local Ray: submit → snapshots → evaluate, resume, determinism."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from continual_kd.config import load_job
from continual_kd.continual import run_stream_local
from continual_kd.data.sources import open_source
from continual_kd.snapshots import list_snapshots, resolve_snapshot

pytestmark = pytest.mark.slow


def _history(result_json: Path) -> list[dict]:
    return json.loads(result_json.read_text())["history"]


def test_submit_snapshots_and_evaluate(ray_cluster, cli, tiny_job, tmp_path):
    job = tiny_job()
    r = cli("submit", job, "--json", "run.json")
    assert r.exit_code == 0, r.output
    assert "block 2" in r.output and "teacher:mf32" in r.output
    runs = tmp_path / "runs" / "tiny"
    assert list_snapshots(runs) == [0, 1, 2]
    snap, warnings = resolve_snapshot(runs, "latest")
    assert warnings == [] and snap.block == 2
    m = snap.manifest
    assert set(m["model_info"]) == {"teacher:mf32", "student"}
    assert m["model_info"]["student"]["parameters"] * 4 == m["model_info"]["teacher:mf32"]["parameters"]
    assert m["rows_covered"] == 3000 and [h["block"] for h in m["history"]] == [0, 1, 2]
    history = _history(tmp_path / "run.json")
    assert [h["block"] for h in history] == [0, 1, 2]
    for model in ("teacher:mf32", "student"):
        for key in ("ndcg@20", "recall@20"):  # --json reports what was committed: block 2's are the snapshot's
            assert history[-1]["metrics"][model][key] == m["metrics"][model][key]
        for h in history:  # recall = hits / relevant, and the top 20 hold the top 10
            assert h["metrics"][model]["recall@20"] >= h["metrics"][model]["recall@10"]

    # evaluate the latest snapshot from the same directory, with no further flag
    r = cli("evaluate", "--snapshot", "latest", "--json", "eval.json")
    assert r.exit_code == 0, r.output
    assert "teacher:mf32" in r.output and "mean over blocks 0..2" in r.output
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["block"] == 2 and set(ev["models"]) == {"teacher:mf32", "student"}
    for model, res in ev["models"].items():
        assert sorted(int(b) for b in res["blocks"]) == [0, 1, 2]
        # the same model on the same masks: evaluate reproduces the run's own block-2 numbers
        for key, value in m["metrics"][model].items():
            assert math.isclose(res["blocks"]["2"][key], value, rel_tol=1e-5, abs_tol=1e-7), (model, key)
        mean = sum(res["blocks"][b]["ndcg@20"] for b in res["blocks"]) / 3
        assert math.isclose(res["mean"]["ndcg@20"], mean, rel_tol=1e-9)
        # plasticity is block 2's figure, stability the mean of blocks 0 and 1 (CCD's protocol)
        cont, blocks = res["continual"], res["blocks"]
        assert cont["plasticity/ndcg@20"] == blocks["2"]["ndcg@20"]
        assert math.isclose(cont["stability/ndcg@20"], (blocks["0"]["ndcg@20"] + blocks["1"]["ndcg@20"]) / 2,
                            rel_tol=1e-9)

    # an earlier snapshot by number; an unknown one is a clean error
    assert cli("evaluate", "--snapshot", "1").exit_code == 0
    r = cli("evaluate", "--snapshot", "9")
    assert r.exit_code == 2 and "9" in r.output and "Traceback" not in r.output
    # a missing-at-random test file of another stream's ids: one line, not an empty table
    (tmp_path / "mar.csv").write_text("user,item,label\nnobody,nothing,1\nghost,nothing,0\n")
    r = cli("evaluate", "--snapshot", "latest", "--mar-test", "mar.csv")
    assert r.exit_code == 2 and "mar.csv: none of its rows" in r.output and "Traceback" not in r.output

    # status sees the store and the snapshots
    r = cli("status", "--store", "stores/tiny")
    assert r.exit_code == 0 and "3,000 interactions" in r.output and "blocks 0, 1, 2" in r.output

    # serving: the student's top-k unseen items for an external user id, and a clean error for an unknown one
    from continual_kd.stream import StreamStore

    store = StreamStore.open(tmp_path / "stores" / "tiny")
    user = store.external_ids("user", [0])[0]
    r = cli("recommend", "--user", user, "-k", "5", "--json", "rec.json")
    assert r.exit_code == 0, r.output
    recs = json.loads((tmp_path / "rec.json").read_text())["recommendations"][user]
    seen = store.read_blocks(m["plan_id"], 2)
    mine = set(store.external_ids("item", seen.items[seen.users == 0]))
    assert len(recs) == 5 and not {x["item"] for x in recs} & mine
    assert [x["score"] for x in recs] == sorted((x["score"] for x in recs), reverse=True)
    r = cli("recommend", "--user", user, "-k", "100000", "--json", "all.json")  # k past the user's unseen items
    assert r.exit_code == 0, r.output
    every = json.loads((tmp_path / "all.json").read_text())["recommendations"][user]
    assert len(every) == seen.num_items - len(mine) and not {x["item"] for x in every} & mine  # those and no others
    assert all(math.isfinite(x["score"]) for x in every) and every[:5] == recs
    r = cli("recommend", "--user", user, "--user", user, "-k", "3", "--json", "twice.json")  # served once
    assert r.exit_code == 0 and list(json.loads((tmp_path / "twice.json").read_text())["recommendations"]) == [user]
    assert sum(line.count(user) for line in r.stdout.splitlines()) == 1, r.stdout
    r = cli("recommend", "--user", "nobody")
    assert r.exit_code == 2 and "'nobody'" in r.output

    # the actors were named as the dashboard shows them
    from ray.util.state import list_actors

    import ray

    address = ray.get_runtime_context().gcs_address  # this session's cluster, not any other on the machine
    names = {a.name for a in list_actors(address=address, filters=[("class_name", "=", "LearnerActor")], limit=1000)}
    assert {"teacher:mf32", "student"} <= names


def test_resume_continues_after_the_last_snapshot_with_identical_results(ray_cluster, cli, tiny_job, tmp_path):
    full = tiny_job("full")
    assert cli("submit", full, "--json", "full.json").exit_code == 0
    part = tiny_job("part")
    r = cli("submit", part, "--max-blocks", "1", "--json", "p1.json")
    assert r.exit_code == 0, r.output
    assert list_snapshots(tmp_path / "runs" / "part") == [0]
    r = cli("submit", part, "--json", "p2.json")  # a plain re-submit continues at block 1
    assert r.exit_code == 0, r.output
    assert list_snapshots(tmp_path / "runs" / "part") == [0, 1, 2]
    assert [h["block"] for h in _history(tmp_path / "p2.json")] == [0, 1, 2]
    full_h, part_h = _history(tmp_path / "full.json"), _history(tmp_path / "p2.json")
    assert [h["block"] for h in full_h] == [h["block"] for h in part_h] == [0, 1, 2]
    for a, b in zip(full_h, part_h):
        assert a["metrics"] == b["metrics"], a["block"]
    r = cli("submit", part)
    assert r.exit_code == 0 and "already committed" in r.output

    # a changed job refuses to extend the old lineage, --restart starts over
    changed = tiny_job("part", extra="\nsnapshots: {keep_last: 0}\n").read_text().replace("dim: 8", "dim: 4")
    (tmp_path / "part.yaml").write_text(changed)
    r = cli("submit", tmp_path / "part.yaml")
    assert r.exit_code == 2 and "--restart" in r.output
    r = cli("submit", tmp_path / "part.yaml", "--restart", "--max-blocks", "1")
    assert r.exit_code == 0 and list_snapshots(tmp_path / "runs" / "part") == [0]


def test_in_process_loop_gives_the_same_metrics_as_ray(ray_cluster, cli, tiny_job, tmp_path):
    job_path = tiny_job("same", seed=3)
    assert cli("submit", job_path, "--json", "ray.json").exit_code == 0
    job = load_job(job_path)
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (num_cpus: 1)
    try:
        local = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks)
    finally:
        torch.set_num_threads(threads)
    history = _history(tmp_path / "ray.json")
    assert [r.block for r in local] == [h["block"] for h in history] == [0, 1, 2]
    for res, h in zip(local, history):
        assert set(res.metrics) == set(h["metrics"]) == {"teacher:mf32", "student"}
        for model, metrics in res.metrics.items():
            for key, value in metrics.items():
                assert math.isclose(h["metrics"][model][key], value, rel_tol=1e-5, abs_tol=1e-7), (res.block, model, key)


def test_distillation_pulls_the_student_to_the_teacher(ray_cluster, cli, tiny_job, tmp_path):
    """RRD is wired in: with it, the student's top-10 unseen items share more with the teacher's than
    the same student's without it (seeds are per model, so both runs have the same teacher)."""
    from continual_kd.continual.snapshot_eval import learners_from_snapshot
    from continual_kd.eval import known_pairs, top_k_items
    from continual_kd.stream import StreamStore

    rrd = "terms: [{name: rrd, weight: 0.01, k: 10, pool: 30, uninteresting: 10}]"
    kd, plain = tiny_job("kd"), tiny_job("plain")
    assert rrd in kd.read_text()
    kd.write_text(kd.read_text().replace(rrd, rrd.replace("0.01", "0.1")))  # 0.01 is too weak to see on 3,000 rows
    plain.write_text(plain.read_text().replace(rrd, "terms: []"))
    assert cli("submit", kd, "--max-blocks", "1").exit_code == 0
    assert cli("submit", plain, "--max-blocks", "1").exit_code == 0
    store = StreamStore.open(tmp_path / "stores" / "tiny")
    top = {}
    for run in ("kd", "plain"):
        snap, _ = resolve_snapshot(tmp_path / "runs" / run, 0)
        seen = store.read_blocks(snap.manifest["plan_id"], 0)
        users = torch.unique(torch.as_tensor(seen.users))
        top[run] = {name: top_k_items(learner.model, users, 10, known_pairs(seen))[0]  # (U, 10)
                    for name, learner in learners_from_snapshot(snap).items()}
    teacher = top["kd"]["teacher:mf32"]
    assert torch.equal(teacher, top["plain"]["teacher:mf32"])

    def shared(student: torch.Tensor) -> float:
        return (student[:, :, None] == teacher[:, None, :]).any(2).float().mean().item()

    assert shared(top["kd"]["student"]) > shared(top["plain"]["student"]) + 0.05


def test_cli_in_a_fresh_process_starts_and_stops_an_embedded_ray(tiny_job, tmp_path):
    """The real `ckd` entry point with no shared Ray: embedded local Ray, exit codes, evaluate."""
    job = tiny_job("proc", extra="runtime: {num_cpus: 2}\n")
    env = {**os.environ, "COLUMNS": "160"}
    ckd = [sys.executable, "-m", "continual_kd.cli"]
    p = subprocess.run([*ckd, "submit", str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dashboard http://127.0.0.1:" in p.stdout
    p = subprocess.run([*ckd, "evaluate", "--snapshot", "latest"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "teacher:mf32" in p.stdout and "student" in p.stdout


def test_a_diverging_update_stops_the_job_in_one_line_and_keeps_what_was_committed(ray_cluster, cli, tiny_job,
                                                                                 tmp_path):
    # the warm updates step the student's old rows at an absurd rate: block 0 trains, block 1 diverges on its actor
    job = tiny_job("wild")
    job.write_text(job.read_text().replace("student:\n  dim: 8\n  train: {",
                                           "student:\n  dim: 8\n  train: {lr_block: 1.0e+30, "))
    r = cli("submit", job)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "student 'student', block 1: training diverged at epoch 1" in r.output and "lower train.lr" in r.output
    assert list_snapshots(tmp_path / "runs" / "wild") == [0]  # block 0 committed, nothing of block 1
    snap, _ = resolve_snapshot(tmp_path / "runs" / "wild", "latest")
    assert snap.block == 0
