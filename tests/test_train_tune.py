"""Ray Train (a teacher with ``workers: 2``) and Ray Tune (``ckd tune``), on the session's real local Ray.

The data-parallel teacher must reproduce the one-worker teacher: every worker draws the same epoch and
DDP sums the gradients of the batch's parts, so the steps are the same up to the order of float sums.
Tolerance: 1e-4 on every metric and on the update's loss, 1e-5 on every weight.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from continual_kd.config import load_job, parse_job
from continual_kd.continual import make_learners, run_stream_local
from continual_kd.data.sources import open_source, source_plan
from continual_kd.errors import CkdError
from continual_kd.runtime.tune import check_space, parse_path, with_values
from continual_kd.snapshots import resolve_snapshot

METRIC_TOL = 1e-4
WEIGHT_TOL = 1e-5


def _edit(path, change) -> dict:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def _two_worker_teacher(data: dict) -> None:
    data["blocks"]["incremental"] = 1  # base block + one warm update: the state goes to the workers and back
    data["teachers"][0].update(workers=2, resources={"num_cpus": 0.5})  # 2 Train workers × 0.5 CPU
    data["student"]["resources"] = {"num_cpus": 0.5}  # + teacher actor 0.5 + student 0.5 = the fixture's 2 CPUs


def test_two_worker_teacher_matches_one_worker(ray_cluster, tiny_job, one_thread):
    from continual_kd.runtime.coordinator import run_job

    path = tiny_job(name="dp")
    _edit(path, _two_worker_teacher)
    job = load_job(path)
    ray_run = run_job(job)  # the teacher's actor hands each update to a 2-worker TorchTrainer

    store = open_source(job.source)
    plan = source_plan(store, job)
    learners = make_learners(job)  # in-process: every model on one worker
    local = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, learners=learners)

    assert len(ray_run.results) == len(local) == 2
    for dp, one in zip(ray_run.results, local):
        assert dp.updates["teacher:mf32"]["workers"] == 2 and "workers" not in one.updates["teacher:mf32"]
        assert "workers" not in dp.updates["student"]
        for model in ("teacher:mf32", "student"):
            for part, metrics in (("test", dp.metrics), ("valid", dp.valid)):
                ref = (one.metrics if part == "test" else one.valid)[model]
                for name in ("ndcg@20", "recall@20", "ndcg@10"):
                    assert metrics[model][name] == pytest.approx(ref[name], abs=METRIC_TOL), (dp.block, model, part, name)
            assert dp.updates[model]["base_loss"] == pytest.approx(one.updates[model]["base_loss"], rel=METRIC_TOL)
            assert dp.updates[model]["epochs"] == one.updates[model]["epochs"]
    # the weights the actor got back from rank 0 are the one-worker weights
    snap, _ = resolve_snapshot(job.snapshot_dir, "latest")
    saved = snap.load_states()["teacher:mf32"]
    for name, value in learners["teacher:mf32"].state()["weights"].items():
        assert torch.allclose(saved[name], value, atol=WEIGHT_TOL), name
    # the teacher learned something (not a copy of its initial weights)
    assert dp.metrics["teacher:mf32"]["ndcg@20"] > 0.05


def test_train_workers_that_cannot_fit_are_refused_at_submit(ray_cluster, tiny_job):
    from continual_kd.runtime.coordinator import run_job

    path = tiny_job(name="dp-big")
    _edit(path, lambda d: d["teachers"][0].update(workers=3, resources={"num_cpus": 1.0}))
    with pytest.raises(CkdError, match=r"need 5 CPU .*Ray Train worker 2.* the Ray cluster has 2"):
        run_job(load_job(path))


def test_tune_paths_and_candidates_are_checked_before_any_trial(tmp_path):
    assert parse_path("distill.terms[0].weight") == ["distill", "terms", 0, "weight"]
    assert parse_path("student..dim") is None
    raw = {"teachers": [{"name": "t"}], "distill": {"terms": [{"name": "rrd", "weight": 0.01}]}}
    assert with_values(raw, {"student.train.lr": 0.01, "distill.terms[0].weight": 0.5}) == {
        **raw, "student": {"train": {"lr": 0.01}}, "distill": {"terms": [{"name": "rrd", "weight": 0.5}]}}
    assert raw["distill"]["terms"][0]["weight"] == 0.01  # the job mapping itself is left alone

    def refused(space: dict) -> str:
        data = {**raw, "tune": {"space": space}}
        with pytest.raises(CkdError) as e:
            check_space(parse_job(data, "t.yaml"), data, "t.yaml")
        return str(e.value)

    assert refused({"student.dims": {"choice": [8]}}).startswith("t.yaml: tune.space.student.dims: names no field")
    assert "names a section" in refused({"student.train": {"choice": [1]}})
    assert "names no field" in refused({"teachers[1].dim": {"choice": [8]}})  # the job has one teacher
    assert "not written in the job file" in refused({"eval.ks[0]": {"choice": [5]}})  # a default list
    assert refused({"student.dim": {"choice": [8, 0]}}).startswith(
        "t.yaml with tune.space.student.dim = 0: student.dim: must be a positive integer")
    assert refused({"distill.terms[0].weight": {"uniform": [-1.0, 1.0]}}).startswith(
        "t.yaml with tune.space.distill.terms[0].weight = -1.0: distill.terms[0].weight:")


def test_the_shipped_tune_job_checks_out():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "tune.yaml"
    job = load_job(path)
    check_space(job, yaml.safe_load(path.read_text()), str(path))
    assert {"distill.terms[0].weight", "student.dim", "student.train.lr", "teachers[0].train.lr"} <= set(job.tune.space)
    assert job.tune.blocks == 2 and job.config_hash() == parse_job({**yaml.safe_load(path.read_text()), "tune": None}).config_hash()


def test_a_trial_larger_than_every_node_is_refused_before_any_trial(ray_cluster, tiny_job, cli, tmp_path):
    path = tiny_job(name="huge")
    _edit(path, lambda d: d.update(tune={"space": {"student.dim": {"grid": [4, 8]}}, "num_samples": 1, "blocks": 2,
                                         "cpus_per_trial": 64}))
    r = cli("tune", path, "--storage", tmp_path / "tune-runs")
    assert r.exit_code == 2 and "tune.cpus_per_trial: 64 CPUs, but no node of the Ray cluster has that many" in r.output
    assert not (tmp_path / "tune-runs").exists() and not (tmp_path / "huge-best.yaml").exists()


def test_tune_two_trials_write_a_best_job_that_runs(ray_cluster, tiny_job, cli, tmp_path):
    path = tiny_job(name="tn")
    _edit(path, lambda d: d.update(tune={"space": {"student.dim": {"grid": [4, 8]}}, "num_samples": 1, "blocks": 2}))

    r = cli("tune", path, "--json", tmp_path / "tune.json", "--storage", tmp_path / "tune-runs")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "tune.json").read_text())
    trials = report["trials"]
    assert sorted(t["config"]["student.dim"] for t in trials) == [4, 8]  # the grid: one trial per value
    assert all(t["status"] in ("done", "stopped") and t["error"] is None for t in trials)
    done = [t for t in trials if t["status"] == "done"]
    assert done and all(len(t["per_block"]) == 2 for t in done)
    assert all(len(t["per_block"]) == 1 for t in trials if t["status"] == "stopped")  # ASHA stopped it after b0
    best = max(done, key=lambda t: t["per_block"][-1])
    assert report["best"] == best["trial"] and "*" + best["trial"] in r.output

    best_path = tmp_path / "tn-best.yaml"
    assert report["out"] == str(best_path)
    best_job = load_job(best_path)  # parses
    assert best_job.name == "tn-best" and best_job.tune is None
    assert best_job.student.dim == best["config"]["student.dim"]

    # it runs with ckd submit, and its Ray run gives the trial's in-process figures block for block
    r = cli("submit", best_path, "--max-blocks", "2", "--json", tmp_path / "best.json")
    assert r.exit_code == 0, r.output
    history = json.loads((tmp_path / "best.json").read_text())["history"]
    submitted = [h["valid"]["student"]["ndcg@20"] for h in history]
    assert len(submitted) == 2 and all(math.isfinite(v) for v in submitted)
    assert submitted == pytest.approx(best["per_block"], abs=1e-6)


def test_tune_on_the_held_out_share_reports_the_mean_over_every_block_so_far(ray_cluster, tiny_job, cli, tmp_path):
    """tune.metric: holdout — each trial reports, after each block, its student's mean NDCG@20 over the held-out
    parts of the blocks run so far; the same job run in-process gives the same figures."""
    from continual_kd.types import HOLDOUT

    path = tiny_job(name="th")
    _edit(path, lambda d: (d["blocks"].update(holdout=0.1),
                           d.update(tune={"space": {"student.dim": {"grid": [4, 8]}}, "num_samples": 1, "blocks": 2,
                                          "grace_period": 2, "metric": "holdout"})))
    r = cli("tune", path, "--json", tmp_path / "tune.json", "--storage", tmp_path / "tune-runs")
    assert r.exit_code == 0, r.output
    assert "held-out NDCG@20" in r.output
    assert "drop blocks.holdout" in (tmp_path / "th-best.yaml").read_text()
    trials = json.loads((tmp_path / "tune.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["done", "done"]
    job = load_job(path)
    store = open_source(job.source)
    plan = source_plan(store, job)
    for trial in trials:
        one = parse_job(with_values(yaml.safe_load(path.read_text()), trial["config"]), str(path))
        learners = make_learners(one)
        figures = []

        def held(res):
            seen = store.read_blocks(plan.plan_id, res.block)
            per = learners["student"].evaluate(seen, list(range(res.block + 1)), one.eval, split=HOLDOUT)
            figures.append(sum(m["ndcg@20"] for m in per.values()) / len(per))

        run_stream_local(one, lambda k: store.read_blocks(plan.plan_id, k), 2, on_block=held, learners=learners)
        assert trial["per_block"] == pytest.approx(figures, abs=1e-6)
        assert all(0 < f <= 1 for f in figures)


@pytest.mark.slow
def test_ctrl_c_interrupts_a_search_in_one_line_and_writes_no_job(tiny_job, tmp_path):
    """Tune's own SIGINT handler ended the trials and returned, and the search then wrote a "best" job from the
    trials finished so far (exit 0); now ^C ends `ckd tune` as it ends any command."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = tiny_job(name="cc")
    _edit(path, lambda d: d.update(tune={"space": {"student.dim": {"grid": [4, 8]}}, "num_samples": 20, "blocks": 3}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\nfrom continual_kd.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "tune", str(path), "--storage", str(tmp_path / "tr")],
                            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "tr").is_dir() or not any((tmp_path / "tr").rglob("params.json")):  # trials are running
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    said = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted (Ctrl-C)" in said and "Traceback" not in said, said[-2000:]
    assert not (path.parent / "cc-best.yaml").exists()


def test_tunes_records_never_share_a_folder_with_a_jobs_snapshots():
    """`ckd tune`'s default --storage is a folder no job name can give (a job named `tune` snapshots into
    runs/tune; its `--restart` refused to delete a folder holding Tune's records)."""
    import inspect

    from continual_kd.config import SAFE_NAME
    from continual_kd.runtime.tune import run_tune

    from continual_kd.cli import tune

    default = inspect.signature(run_tune).parameters["storage"].default
    assert default.parent.name == "runs" and not SAFE_NAME.fullmatch(default.name)
    assert inspect.signature(tune).parameters["storage"].default == default  # what `ckd tune` passes
