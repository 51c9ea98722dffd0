"""Several heterogeneous teachers: parallel actor updates under Ray, fusion, HetComp and UnKD wired in."""

from __future__ import annotations

import pytest
import torch

from continual_kd.config import load_job, parse_job
from continual_kd.continual import make_learners, run_stream_local
from continual_kd.data.sources import open_source
from continual_kd.eval import known_pairs, top_k_items
from continual_kd.runtime.coordinator import run_job

THREE_TEACHERS = """
teachers:
  - {name: mf, backbone: mf, dim: 32, train: {epochs_base: 16, epochs_block: 8, batch_size: 64}, resources: {num_cpus: 0.5}}
  - {name: gcn, backbone: lightgcn, dim: 32, train: {epochs_base: 16, epochs_block: 8, batch_size: 64}, resources: {num_cpus: 0.5}}
  - {name: vae, backbone: multvae, dim: 32, hidden: 64, train: {epochs_base: 24, epochs_block: 12, batch_size: 8, lr: 0.003}, resources: {num_cpus: 0.5}}
"""


def _three_teacher_job(tiny_job, name: str, distill: str) -> str:
    text = tiny_job(name).read_text()
    head, _, _ = text.partition("teachers:")
    student = "student: {dim: 8, train: {epochs_base: 8, epochs_block: 4, batch_size: 512}, resources: {num_cpus: 0.5}}\n"
    return head + THREE_TEACHERS + student + distill + "eval: {ks: [10, 20]}\n"


def _run_in_process(tmp_path, name: str, text: str):
    """The job ``text`` (written as ``name``.yaml) on its store's 3-block plan, in this process: (job, store, plan,
    learners, results)."""
    (tmp_path / f"{name}.yaml").write_text(text)
    job = load_job(tmp_path / f"{name}.yaml")
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    learners = make_learners(job)
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, learners=learners)
    return job, store, plan, learners, results


@pytest.mark.slow
def test_three_teacher_actors_update_in_parallel_and_fuse(ray_cluster, tiny_job, tmp_path):
    text = _three_teacher_job(tiny_job, "three", "distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}, "
                                                  "{name: unkd, weight: 0.05, groups: 3, pairs: 6, per_group: 20}]}\n")
    (tmp_path / "three.yaml").write_text(text)
    result = run_job(load_job(tmp_path / "three.yaml"))
    assert [r.block for r in result.results] == [0, 1, 2]
    teachers = ["teacher:mf", "teacher:gcn", "teacher:vae"]
    for r in result.results:
        assert set(r.metrics) == {*teachers, "student"}
        windows = [(r.updates[t]["started_at"], r.updates[t]["ended_at"]) for t in teachers]
        # the teacher updates overlap in time: each starts before any of them has ended
        assert max(s for s, _ in windows) < min(e for _, e in windows), windows
        assert r.updates["student"]["kd_loss"] > 0
        for metric in ("recall@20/tail", "avgpop@20", "coverage@20"):
            assert metric in r.metrics["student"]


@pytest.mark.parametrize("distill", [
    "distill: {terms: [{name: hetcomp, checkpoints: 2, k: 20, observed: 3, dkc_every: 2}]}\n",
    "distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}], fusion: importance, teacher_weights: valid_ndcg}\n",
], ids=["hetcomp", "importance-fusion-weighted"])
def test_multi_teacher_methods_run_in_process(tiny_job, tmp_path, distill, one_thread):
    job, store, plan, learners, results = _run_in_process(tmp_path, "m", _three_teacher_job(tiny_job, "m", distill))
    assert len(results) == 3
    for r in results:
        assert r.updates["student"]["kd_loss"] > 0
    # the student's top-10 unseen items for the last block's users share far more with each teacher's
    # than a random top-10 would (10 / the user's unseen items; HetComp's student has no BPR: all it
    # knows comes from the teachers)
    seen = store.read_blocks(plan.plan_id, plan.num_blocks - 1)
    known = known_pairs(seen)
    users = torch.unique(torch.as_tensor(seen.users[seen.block == plan.num_blocks - 1]))
    top = {name: top_k_items(learner.model, users, 10, known)[0] for name, learner in learners.items()}  # (B, 10)
    unseen = seen.num_items - torch.bincount(torch.as_tensor(seen.users), minlength=seen.num_users)[users]
    chance = (10 / unseen).mean().item()
    assert 0.05 < chance < 0.15
    for teacher in ("teacher:mf", "teacher:gcn", "teacher:vae"):
        shared = (top["student"][:, :, None] == top[teacher][:, None, :]).any(2).float().mean().item()
        assert shared > 3 * chance, (teacher, shared, chance)


@pytest.mark.parametrize("tolerance", [None, 0.05])
def test_popularity_matched_fusion_runs_in_process_and_is_logged(tiny_job, tmp_path, one_thread, tolerance):
    distill = ("distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}], fusion_popularity: least_teacher, "
               f"fusion_popularity_tolerance: {'null' if tolerance is None else tolerance}}}\n")
    job, _, _, _, results = _run_in_process(tmp_path, "p", _three_teacher_job(tiny_job, "p", distill))
    assert job.distill.fusion_popularity == "least_teacher" and job.distill.fusion_popularity_tolerance == tolerance
    logs = [r.updates["student"]["fusion_popularity"] for r in results]
    for log in logs:
        assert log["beta"] >= 0 and len(log["teachers_avgpop"]) == 3
        assert log["target_avgpop"] == pytest.approx(min(log["teachers_avgpop"]))
        assert log["fused_avgpop_after"] <= log["target_avgpop"] + 1e-6
        assert (log["beta"] > 0) == (log["fused_avgpop"] > log["target_avgpop"])
        if tolerance is None:  # always used where a penalty was needed
            assert log["used"] == (log["beta"] > 0) and "valid_ndcg_sum_fused" not in log
        elif log["beta"] > 0:  # used while the matched lists' validation NDCG so far is within 5% of the plain ones'
            assert log["used"] == (log["valid_ndcg_sum_matched"] >= 0.95 * log["valid_ndcg_sum_fused"])
    assert any(log["beta"] > 0 for log in logs), logs  # rank fusion raised the popularity somewhere
    if tolerance is not None:  # the evidence accumulates over the blocks
        sums = [log["valid_ndcg_sum_fused"] for log in logs if "valid_ndcg_sum_fused" in log]
        assert len(sums) >= 2 and sums == sorted(sums) and sums[-1] > sums[0]
    for r in results:
        assert "fusion_popularity" not in r.updates["teacher:mf"]  # the teachers' own updates fuse nothing
    # what the snapshot history and the catalog keep of it (runtime/coordinator.py records update_choice)
    from continual_kd.manifest import block_results, update_choice

    last = results[-1].updates
    choice = {n: update_choice(u) for n, u in last.items()}
    assert choice["student"]["fusion_popularity_beta"] == logs[-1]["beta"]
    assert choice["student"]["fusion_popularity_used"] == (1.0 if logs[-1]["used"] else 0.0)
    assert "fusion_popularity_beta" not in choice["teacher:mf"]
    rows = block_results({"metrics": {n: {"ndcg@20": 0.1} for n in last}, "choice": choice})
    assert rows["student"]["choice/fusion_popularity_used"] == choice["student"]["fusion_popularity_used"]
    assert rows["student"]["choice/best_epoch"] == last["student"]["best_epoch"]


def test_served_popularity_corrects_the_target_by_where_the_student_landed(tiny_job, tmp_path, one_thread):
    """fusion_popularity: served — after every update where the match is used, the student's own top-20 on the
    match's users against the least popular teacher's; the next update's target is the least popular teacher's ×
    the accumulated correction (Π 1 / ratio, within [1/2, 2]), kept in the student's state."""
    import math

    distill = ("distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}], fusion_popularity: served, "
               "fusion_popularity_tolerance: null}\n")
    _, store, plan, learners, results = _run_in_process(tmp_path, "s", _three_teacher_job(tiny_job, "s", distill))
    logs = [r.updates["student"]["fusion_popularity"] for r in results]
    scale = 1.0
    for log in logs:
        assert log["served_scale"] == pytest.approx(scale)
        assert log["target_avgpop"] == pytest.approx(scale * log["least_avgpop"])
        if not (log["used"] or log["beta"] == 0):  # refused by the tolerance: nothing to correct
            assert "served_ratio" not in log
            continue
        assert log["served_ratio"] == pytest.approx(log["student_avgpop"] / log["least_avgpop"])
        if log["beta"] > 0 or log["served_ratio"] > 1:
            scale = min(max(scale / log["served_ratio"], 0.5), 2.0)
        assert log["served_scale_next"] == pytest.approx(scale)
    assert any("served_ratio" in log for log in logs)
    from continual_kd.manifest import update_choice

    assert update_choice(results[-1].updates["student"])["fusion_popularity_scale"] == logs[-1]["served_scale"]
    assert math.exp(learners["student"].fusion_evidence["served_log_scale"]) == pytest.approx(scale)
    # the student's own lists are its top-20 unseen items for the match's users, by hand on three users
    import types

    student = learners["student"]
    block = plan.num_blocks - 1
    seen = store.read_blocks(plan.plan_id, block)
    known = student.observe(seen, block)
    users = torch.tensor([0, 2, 5]).numpy()
    before = dict(student.fusion_evidence)
    got = student._served_popularity(seen, block, [types.SimpleNamespace(users=users)], known,
                                     {"least_avgpop": 10.0, "beta": 0.5})
    scores = student.model.full_scores(torch.as_tensor(users))
    scores[torch.as_tensor(known.contains(torch.as_tensor(users).repeat_interleave(seen.num_items),
                                          torch.arange(seen.num_items).repeat(3))).view(3, -1)] = -float("inf")
    counts = student.pairs.item_counts(seen)
    assert got["student_avgpop"] == pytest.approx(float(counts[scores.topk(20, dim=1).indices].mean()), rel=1e-5)
    assert got["served_ratio"] == pytest.approx(got["student_avgpop"] / 10.0)
    assert student.fusion_evidence["served_log_scale"] == pytest.approx(
        min(max(before["served_log_scale"] - math.log(got["served_ratio"]), -math.log(2)), math.log(2)))


def test_bad_multi_teacher_specs_are_refused():
    from continual_kd.errors import CkdError

    with pytest.raises(CkdError, match="distill.fusion"):
        parse_job({"teachers": [{"name": "t"}], "distill": {"fusion": "vote"}}, "j.yaml")
    with pytest.raises(CkdError, match="distill.fusion_popularity"):
        parse_job({"teachers": [{"name": "t"}], "distill": {"fusion_popularity": "least"}}, "j.yaml")
    with pytest.raises(CkdError, match=r"distill.terms\[0\]"):
        parse_job({"teachers": [{"name": "t"}], "distill": {"terms": [{"name": "unkd", "groups": 4, "pairs": 2}]}},
                  "j.yaml")
    with pytest.raises(CkdError, match="teacher"):
        parse_job({"distill": {"terms": [{"name": "unkd", "weight": 1}]}}, "j.yaml")


def test_a_collapsed_teacher_is_left_out_of_the_fusion_by_the_floor(tiny_job, tmp_path, one_thread):
    # the MF teacher learns nothing (lr 1e-9): its lists stay random, far under the other teachers' on validation
    distill = ("distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}], teacher_floor: 0.5, "
               "fusion_popularity: least_teacher, fusion_popularity_tolerance: null}\n")
    text = _three_teacher_job(tiny_job, "f", distill).replace("batch_size: 64}, resources", "batch_size: 64, lr: 1.0e-9}, "
                                                               "resources", 1)
    job, _, _, learners, results = _run_in_process(tmp_path, "f", text)
    assert job.teachers[0].train.lr == 1e-9 and job.distill.teacher_floor == 0.5
    evidence = learners["student"].fusion_evidence
    for r in results:
        floor = r.updates["student"]["teacher_floor"]
        ndcgs = floor["valid_ndcg@20"]
        assert set(ndcgs) == {"mf", "gcn", "vae"}
        assert floor["left_out"] == [t for t, v in ndcgs.items() if v < 0.5 * max(ndcgs.values())]
        assert floor["left_out"] == ["mf"], ndcgs
        # the fusion after it holds the two teachers kept: fusion_popularity's target is theirs
        assert len(r.updates["student"]["fusion_popularity"]["teachers_avgpop"]) == 2
    # the figures are over every block's validation users so far (kept with the fusion evidence)
    assert ndcgs["gcn"] == pytest.approx(evidence["teacher:gcn"] / evidence["users:gcn"])
    # an update without validation pairs decides on the evidence so far, adding none
    import types

    lists = [types.SimpleNamespace(source=s) for s in ("mf", "gcn", "vae")]
    before = dict(evidence)
    kept, weights, log = learners["student"]._teacher_floor(
        lists, [0.2, 0.3, 0.5], learners["student"]._teacher_evidence(lists, None), 0.5)
    assert [k.source for k in kept] == ["gcn", "vae"] and weights == [0.3, 0.5] and log["teacher_floor"]["left_out"] == ["mf"]
    assert learners["student"].fusion_evidence == before
    from continual_kd.manifest import update_choice

    assert update_choice(results[-1].updates["student"])["teachers_left_out"] == 1.0
    from continual_kd.errors import CkdError

    with pytest.raises(CkdError, match="distill.teacher_floor"):
        parse_job({"teachers": [{"name": "t"}], "distill": {"teacher_floor": 1.0}}, "j.yaml")
    with pytest.raises(CkdError, match="distill.teacher_floor: ftd reads one teacher"):  # a term the floor could starve
        parse_job({"teachers": [{"name": "t"}], "distill": {"teacher_floor": 0.5, "terms": [{"name": "ftd"}]}}, "j.yaml")
    # ∞ (the best teacher alone) of teacher_weights: chosen reaches the history and the catalog as a number
    assert update_choice({"weight_power": float("inf")})["weight_power"] == -1.0
    assert update_choice({"weight_power": 2.0})["weight_power"] == 2.0
    # one list left (here: one teacher) fuses nothing: logged as not used
    assert update_choice({"fusion_popularity": {"beta": 0.0, "used": False, "lists": 1}})["fusion_popularity_used"] == 0.0
