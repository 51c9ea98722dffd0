"""The one stage pipeline: stage order per job, parity in-process vs Ray for every backbone and
method, held-out pairs kept out of every model, KD-term state through snapshot and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from continual_kd.config import load_job, parse_job
from continual_kd.continual import Learner, block_stages, make_learners, run_stream_local
from continual_kd.data.sources import open_source
from continual_kd.distill import KDTerm, register_term
from continual_kd.distill.base import TERMS
from continual_kd.eval import model_pairs_mask
from continual_kd.runtime.coordinator import run_job
from continual_kd.types import TRAIN, VALID

HEAD = """
name: {name}
seed: 0
source:
  dataset: synthetic
  store: stores/tiny
  synthetic: {{users: 150, items: 120, interactions: 3000, periods: 3, seed: 1}}
blocks: {{base_fraction: 0.5, incremental: 2}}
teachers:
  - {{name: mf, backbone: mf, dim: 16, train: {{epochs_base: 6, epochs_block: 3, batch_size: 256}}, resources: {{num_cpus: 0.5}}}}
  - {{name: gcn, backbone: lightgcn, dim: 16, train: {{epochs_base: 6, epochs_block: 3, batch_size: 256}}, resources: {{num_cpus: 0.5}}}}
  - {{name: vae, backbone: multvae, dim: 16, hidden: 32, train: {{epochs_base: 6, epochs_block: 3, batch_size: 32, lr: 0.003}}, resources: {{num_cpus: 0.5}}}}
student: {{dim: 8, train: {{epochs_base: 6, epochs_block: 3, batch_size: 256}}, resources: {{num_cpus: 0.5}}}}
eval: {{ks: [10, 20]}}
"""

METHODS = {
    "rrd+unkd": "distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}, "
                "{name: unkd, weight: 0.05, groups: 3, pairs: 6, per_group: 20}]}\n",
    "hetcomp": "distill: {terms: [{name: hetcomp, checkpoints: 2, k: 20, observed: 3, dkc_every: 2}]}\n",
    "bd": "distill: {terms: [{name: bd, weight: 0.5}], feedback: [{name: bd, weight: 0.5}]}\n",
    # a feedback term for some teachers only (`models`): `keep` trains gcn, the others learn by BD alone
    "bd+keep": "distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}], "
               "feedback: [{name: bd, weight: 0.5}, {name: keep, k: 10, uninteresting: 10, models: [gcn]}]}\n",
    "ccd": """distill:
  terms:
    - {name: rrd, k: 10, pool: 30, uninteresting: 10, score_clamp: 10}
    - {name: ir_rrd, k: 10, pool: 30, uninteresting: 10, score_clamp: 10}
    - {name: replay, top: 20, per_user: 5, every: 2, source: proxies}
  feedback:
    - {name: replay, top: 20, per_user: 5, every: 2, decay: 5, source: peers}
    - {name: keep, k: 10, uninteresting: 10}
continual: {order: student_first, proxies: {stability: 0.9, plasticity: 0.1}}
""",
}


def _write(tmp_path, name: str, method: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(HEAD.format(name=name) + METHODS[method])
    return path


def test_stage_order_follows_the_job():
    job = parse_job({"teachers": [{"name": "t"}], "distill": {"terms": [{"name": "rrd"}]}}, "j.yaml")
    names = lambda j, b: [n for n, _ in block_stages(j, b)]  # noqa: E731
    assert names(job, 0) == names(job, 1) == ["update teachers", "teacher knowledge", "update student", "evaluate"]
    bd = parse_job({"teachers": [{"name": "t"}], "distill": {"terms": [{"name": "bd"}], "feedback": [{"name": "bd"}]}},
                   "j.yaml")
    assert names(bd, 0) == ["update teachers", "teacher knowledge", "update student", "evaluate"]
    assert names(bd, 1) == ["student feedback", "update teachers", "teacher knowledge", "update student", "evaluate"]
    ccd = parse_job({"teachers": [{"name": "t"}], "distill": {"terms": [{"name": "rrd"}], "feedback": [{"name": "bd"}]},
                     "continual": {"order": "student_first"}}, "j.yaml")
    assert names(ccd, 0) == names(job, 0)  # nothing to learn from before the teachers' first block
    assert names(ccd, 2) == ["teacher knowledge", "update student", "student feedback", "update teachers", "evaluate"]
    alone = parse_job({}, "j.yaml")
    assert names(alone, 1) == ["update student", "evaluate"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_in_process_and_ray_give_the_same_metrics(ray_cluster, tiny_job, tmp_path, method, same_as_local):
    """Every backbone (MF, LightGCN, MultVAE teachers; MF student) and every method: one stage list,
    two executors, the same numbers to the digit — and knowledge really flows the job's ways."""
    tiny_job("unused")  # a fresh working directory
    job = load_job(_write(tmp_path, method.replace("+", "-"), method))
    ray_result = run_job(job)
    local = same_as_local(job, ray_result)  # metrics, plasticity / stability, terms and KD losses of every model
    assert [r.block for r in local] == [r.block for r in ray_result.results] == [0, 1, 2]
    for a in local:
        assert set(a.metrics) == {"teacher:mf", "teacher:gcn", "teacher:vae", "student"}
    last = local[-1].updates
    distill = job.distill
    assert sorted(last["student"]["terms"]) == sorted(t.name for t in distill.terms)
    for teacher in job.teachers:  # each teacher trained by the feedback terms meant for it
        assert sorted(last[f"teacher:{teacher.name}"]["terms"]) == sorted(t.name for t in distill.feedback
                                                                          if not t.models or teacher.name in t.models)
    if method == "bd+keep":
        assert "keep" in last["teacher:gcn"]["terms"] and "keep" not in last["teacher:mf"]["terms"]
    if distill.feedback:  # the collaborative direction trains the teachers with a KD loss
        assert last["teacher:mf"]["kd_loss"] > 0
    assert local[-1].continual["student"]["hmean/ndcg@20"] is not None
    if job.continual.proxies is not None:  # CCD's proxies ride in the student's snapshot
        from continual_kd.snapshots import resolve_snapshot

        weights = resolve_snapshot(ray_result.runs_dir, "latest")[0].load_states()["student"]
        assert "aux.proxies.meta" in weights and any(k.startswith("aux.proxies.stability.") for k in weights)
        # stopped after block 1 and resumed: the proxies come back from the snapshot, same numbers
        resumed = job.model_copy(update={"name": "ccd-resumed"})
        assert [r.block for r in run_job(resumed, max_blocks=2).results] == [0, 1]
        last = run_job(resumed).results
        assert [r.block for r in last] == [2]
        assert last[0].metrics["student"] == ray_result.results[2].metrics["student"]


def test_held_out_pairs_never_reach_a_model(tiny_job):
    """While block k is trained and validated, no model's graph / input rows hold block k's
    validation pairs or any test pair; earlier blocks' validation pairs may (their block is done)."""
    job = load_job(_write(tiny_job("unused").parent, "leak", "rrd+unkd"))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    learners = make_learners(job)
    seen = store.read_blocks(plan.plan_id, 1)
    run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), 2, learners=learners)
    vae, gcn = learners["teacher:vae"].model, learners["teacher:gcn"].model
    held = (seen.block == 1) & (seen.split == VALID) | (seen.split == 2)
    earlier_valid = (seen.block == 0) & (seen.split == VALID)
    # MultVAE's input rows, as the model holds them after validating block 1
    rows = np.repeat(np.arange(len(vae._indptr) - 1), torch.diff(vae._indptr).numpy())
    vae_pairs = set(zip(rows.tolist(), vae._cols.tolist()))
    gcn_pairs = set(zip(gcn._edges[0].tolist(), gcn._edges[1].tolist()))
    for pairs in (vae_pairs, gcn_pairs):
        assert not pairs & set(zip(seen.users[held].tolist(), seen.items[held].tolist()))
        assert set(zip(seen.users[earlier_valid].tolist(), seen.items[earlier_valid].tolist())) <= pairs
        assert set(zip(seen.users[seen.split == TRAIN].tolist(), seen.items[seen.split == TRAIN].tolist())) <= pairs
    assert model_pairs_mask(seen, 1).sum() == len(vae_pairs)


@register_term("scale_probe")
class _ScaleProbe(KDTerm):
    """A test term with its own trainable parameter and carried state: pulls the model's positive
    scores toward its learned scale (so the optimiser must step the parameter)."""

    def __init__(self, spec, ctx):
        super().__init__(spec, ctx)
        start = ctx.state["scale"] if ctx.state else torch.tensor(0.0)
        self.scale = torch.nn.Parameter(start.clone().float())

    @classmethod
    def needs_knowledge(cls, spec) -> bool:
        return False

    def loss(self, model, batch, epoch):
        return ((model.score(batch.users, batch.pos) - self.scale - 1.0) ** 2).sum()

    def carry(self):
        return {"scale": self.scale.detach().clone()}


def test_term_parameters_are_stepped_and_survive_snapshot_and_resume(tmp_path, tiny_job):
    from types import SimpleNamespace

    from continual_kd.snapshots import resolve_snapshot, write_snapshot

    job = load_job(tiny_job("probe"))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    spec = SimpleNamespace(name="scale_probe", weight=1.0)
    learner = Learner(job.student, 0)
    learner.update(store.read_blocks(plan.plan_id, 0), 0, terms=[spec])
    moved = learner.term_state["scale_probe"]["scale"]
    assert float(moved) != 0.0  # the optimiser stepped the term's own parameter
    assert learner.num_parameters() == sum(p.numel() for p in learner.model.parameters())  # not served
    snap = write_snapshot(tmp_path / "runs", 0, {"student": learner.state()["weights"]},
                          {"job": "probe", "model_info": {}})
    again = Learner(job.student, 0)
    again.load({"block": 0, "num_users": learner.model.num_users, "num_items": learner.model.num_items,
                "weights": resolve_snapshot(tmp_path / "runs", 0)[0].load_states()["student"]})
    assert torch.equal(again.term_state["scale_probe"]["scale"], moved)
    assert snap.block == 0
    # the next block starts the term from the carried value
    captured = {}
    orig = _ScaleProbe.__init__

    def spy(self, spec, ctx):
        captured["state"] = ctx.state
        orig(self, spec, ctx)

    _ScaleProbe.__init__ = spy
    try:
        again.update(store.read_blocks(plan.plan_id, 1), 1, terms=[spec])
    finally:
        _ScaleProbe.__init__ = orig
    assert torch.equal(captured["state"]["scale"], moved)
    TERMS.pop("scale_probe", None)


def test_keep_is_skipped_for_a_model_that_has_learned_nothing_yet(tiny_job):
    """A new model has no old order to keep: `keep` only joins once the model was trained."""
    from types import SimpleNamespace

    job = load_job(tiny_job("keep"))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    keep = SimpleNamespace(name="keep", weight=0.01, k=5, uninteresting=5)
    learner = Learner(job.teachers[0], 0, role="teacher")
    assert learner.update(store.read_blocks(plan.plan_id, 0), 0, terms=[keep])["terms"] == []
    assert learner.update(store.read_blocks(plan.plan_id, 1), 1, terms=[keep])["terms"] == ["keep"]


def test_keep_reads_the_models_own_list_and_replay_the_proxies(tiny_job):
    """With proxies and both terms, `keep` gets the model's own pre-update list (own[0]) and `replay`
    the proxies' lists; a teacher's `replay` with source proxies reads the student's proxies handed over."""
    from types import SimpleNamespace

    from continual_kd.distill.replay import PROXY_PREFIX

    job = load_job(tiny_job("own"))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    proxies = SimpleNamespace(stability=0.9, plasticity=0.1)
    keep = SimpleNamespace(name="keep", weight=0.01, k=5, uninteresting=5)
    replay = SimpleNamespace(name="replay", weight=0.5, decay=10.0, top=5, eps=1e-4, every=5, per_user=2,
                             source="proxies")
    student = Learner(job.student, 0)
    student.update(store.read_blocks(plan.plan_id, 0), 0, proxies=proxies)
    seen = store.read_blocks(plan.plan_id, 1)
    student.grow(seen, 1)
    known = student.observe(seen, 1)
    built = student._build_terms(seen, 1, [], [keep, replay], "rank", None, known, 1, "block")
    assert [t.name for t in built] == ["keep", "replay"]
    assert sorted(built[1].sources) == ["proxy:plasticity", "proxy:stability"]
    handed = student.feedback(seen, 1, 5)
    assert [k.source for k in handed][0] == job.student.name and all(k.source.startswith(PROXY_PREFIX)
                                                                     for k in handed[1:])
    teacher = Learner(job.teachers[0], 0, role="teacher")
    teacher.update(store.read_blocks(plan.plan_id, 0), 0)
    log = teacher.update(seen, 1, knowledge=[handed], terms=[replay])
    assert log["terms"] == ["replay"]


def test_a_stream_committed_under_the_previous_lineage_hash_carries_on(ray_cluster, tiny_job, monkeypatch):
    """Blocks committed by a release that hashed the job's lineage the old way (every field): the next submit
    relabels them (commits and results) and resumes after them, as if nothing had changed."""
    from continual_kd.config import JobSpec
    from continual_kd.stream.store import StreamStore

    job = load_job(tiny_job("upgrade"))
    new, old = job.config_hash(), job.lineage_aliases()[0]
    assert new != old
    with monkeypatch.context() as m:  # the previous release
        m.setattr(JobSpec, "config_hash", lambda self: self.lineage_aliases()[0])
        first = run_job(job, max_blocks=2)
    store = StreamStore.open(job.source.store)
    assert [c["lineage"] for c in store.committed_blocks(job.name)] == [old, old]
    resumed = run_job(job)  # this release
    assert [r.block for r in first.results] == [0, 1] and [r.block for r in resumed.results] == [2]
    assert [c["lineage"] for c in store.committed_blocks(job.name)] == [new] * 3
    assert {r["lineage"] for r in store.results(job.name)} == {new}


def test_a_multvae_restored_from_its_snapshot_trains_the_next_block_as_the_uninterrupted_one(tiny_job):
    """MultVAE's noise comes from a seed drawn when the model is first built (after its item-sized init); a model
    rebuilt at a later snapshot's larger size drew another, unless the snapshot carries it: resumed runs of the
    default job trained the next block differently from the uninterrupted run."""
    job = load_job(_write(tiny_job("unused").parent, "vae-resume", "rrd+unkd"))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    spec = next(t for t in job.teachers if t.backbone == "multvae")
    blocks = [store.read_blocks(plan.plan_id, k) for k in range(3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = Learner(spec, job.seed)
        straight.update(blocks[0], 0)
        built_with = straight.model.num_items
        straight.update(blocks[1], 1)
        state = straight.state()
        assert state["num_items"] > built_with  # the snapshot's model is larger than the one first built
        assert int(state["weights"]["aux.noise_seed"]) == straight.model._noise_seed
        resumed = Learner(spec, job.seed)
        resumed.load(state)
        assert resumed.model._noise_seed == straight.model._noise_seed
        straight.update(blocks[2], 2)
        resumed.update(blocks[2], 2)
    finally:
        torch.set_num_threads(threads)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
