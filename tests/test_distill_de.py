"""DE (distillation experts): the expert mixture by hand with a fixed selection, routing, annealing, the
term on a batch; a DE student's saved state holds no expert; RD, CD and DE in one job under Ray."""

import math

import numpy as np
import pytest
import torch

from continual_kd.config import DETermSpec, load_job
from continual_kd.continual import Learner
from continual_kd.data.sources import open_source
from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.de import DETerm, DistillationExperts, annealed_tau
from continual_kd.models import build_backbone
from continual_kd.runtime.coordinator import run_job
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge


def two_experts() -> DistillationExperts:
    """d_s = d_t = 1 (hidden 1): expert0(s) = 2·relu(s) + .5, expert1(s) = 3·relu(-s) - 1; α = (.5, .5)."""
    ex = DistillationExperts(1, 1, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ex.w1.copy_(torch.tensor([[1.0, -1.0]]))
        ex.b1.zero_()
        ex.w2.copy_(torch.tensor([[2.0], [3.0]]))
        ex.b2.copy_(torch.tensor([[0.5], [-1.0]]))
        ex.select_w.zero_()
        ex.select_b.zero_()
    return ex


S, T, W = torch.tensor([[2.0], [-1.0]]), torch.tensor([[4.0], [1.0]]), torch.tensor([1.0, 0.5])
G = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # z(τ = 1) = softmax(log .5 + g) = (.25, .75)


def test_expert_mixture_by_hand_with_a_fixed_selection():
    ex = two_experts()
    assert ex.selection(T).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    # s = 2: experts 4.5 and -1 → .25·4.5 + .75·(-1) = .375; s = -1: .5 and 2 → 1.625
    assert ex.mixture(S, torch.tensor([[0.25, 0.75], [0.25, 0.75]])).squeeze(1).tolist() == pytest.approx([0.375, 1.625])
    soft = ex.loss(S, T, W, 1.0, G)
    assert float(soft.detach()) == pytest.approx((4 - 0.375) ** 2 + 0.5 * (1 - 1.625) ** 2, rel=1e-6)
    assert float(soft.detach()) == pytest.approx(13.3359375, rel=1e-6)
    # routed to the Gumbel-max expert (1 for both): -1 and 2 → (4+1)² + .5·(1-2)²
    assert float(ex.loss(S, T, W, 1.0, G, hard=True).detach()) == pytest.approx(25.5)
    # the soft mixture at a tiny τ is that limit
    assert float(ex.loss(S, T, W, 1e-10, G).detach()) == pytest.approx(25.5, rel=1e-6)


def test_routing_groups_entities_by_expert_and_matches_the_one_hot_mixture():
    ex = DistillationExperts(3, 5, 4, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    s, t, w = torch.randn(50, 3, generator=gen), torch.randn(50, 5, generator=gen), torch.rand(50, generator=gen)
    choice = torch.randint(0, 4, (50,), generator=gen)
    dense = (w * (t - ex.mixture(s, torch.nn.functional.one_hot(choice, 4).float())).pow(2).sum(-1)).sum()
    routed = ex.routed(s, t, choice, w)
    assert float(routed.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
    routed.backward()
    assert ex.w2.grad is not None and ex.w2.grad.abs().sum() > 0
    assert ex.select_w.grad is None  # routing by the Gumbel-max: no gradient to the selection


def test_temperature_anneals_from_start_to_end():
    assert annealed_tau(0, 10, 1.0, 1e-10) == 1.0
    assert annealed_tau(5, 10, 1.0, 1e-10) == pytest.approx(1e-5)
    assert annealed_tau(10, 10, 1.0, 1e-10) == pytest.approx(1e-10)
    assert annealed_tau(20, 10, 1.0, 1e-10) == 1e-10


def de_case(weights=None, two=False):
    """2 users, 4 items; student MF dim 2; teacher vectors (dim 3) for user 0 only and items 0..2."""
    model = build_backbone("mf", num_users=2, num_items=4, dim=2)
    k = Knowledge("t", 1, np.array([0]), np.array([[1]]), np.array([[1.0]], np.float32),
                  user_vectors=np.ones((1, 3), np.float32), item_vectors=np.arange(9, dtype=np.float32).reshape(3, 3))
    lists = [k, Knowledge("u", 1, np.array([0]), np.array([[1]]), np.array([[1.0]], np.float32),
                          user_vectors=np.ones((1, 2), np.float32), item_vectors=np.ones((3, 2), np.float32))] if two else [k]
    ctx = TermContext(model, lists, UserItemSet([0], [3], 2, 4), num_users=2, num_items=4, block=1, epochs=10,
                      weights=weights)
    return model, build_terms([DETermSpec(experts=3)], ctx)[0]


def test_term_distils_batch_users_and_half_weighted_items():
    model, term = de_case()
    assert isinstance(term, DETerm) and TERMS["de"] is DETerm
    batch = Batch(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 3]), torch.tensor([1, 2, 2]))
    users, items, w = term.entities(model, batch)
    assert users.tolist() == [0, 1] and items.tolist() == [0, 1, 2, 3]
    assert w.tolist() == [0.5, 1.0, 0.5, 0.5]  # item 1 is a positive and a negative: counted twice
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.tau == 1.0 and not term.hard
    # by hand: only user 0 and items 0..2 have teacher rows; the same Gumbel draws as the term's
    gen = torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    draws = torch.Generator().manual_seed(seed)
    from continual_kd.distill.de import gumbel_noise

    g_u, g_i = gumbel_noise((1, 3), draws, "cpu"), gumbel_noise((3, 3), draws, "cpu")
    u_all, i_all = model.embeddings()
    ue, ie = term.user_experts[0], term.item_experts[0]
    t_i = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    expected = (ue.loss(u_all[[0]], torch.ones(1, 3), torch.ones(1), 1.0, g_u)
                + ie.loss(i_all[[0, 1, 2]], t_i, torch.tensor([0.5, 1.0, 0.5]), 1.0, g_i))
    loss = term.loss(model, batch, 0)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert model.user_emb.grad[0].abs().sum() > 0 and model.user_emb.grad[1].abs().sum() == 0
    assert all(p.grad is not None for p in term.parameters())  # the experts learn with the model
    term.resample(torch.Generator().manual_seed(0), 3)  # τ = 1e-3 ≤ hard_tau: one expert per entity
    assert term.tau == pytest.approx(1e-3) and term.hard
    assert float(term.loss(model, batch, 3).detach()) > 0


def test_several_teachers_one_de_each_weighted_to_sum_one():
    _, term = de_case(weights=[3.0, 1.0], two=True)
    assert term.teacher_weights == [0.75, 0.25]
    assert [e.teacher_dim for e in term.user_experts] == [3, 2]


def test_de_student_state_and_snapshot_hold_no_expert_weights(tiny_job, one_thread, tmp_path):
    from continual_kd.snapshots import resolve_snapshot, write_snapshot

    job = load_job(tiny_job("de"))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    seen = store.read_blocks(plan.plan_id, 0)
    teacher = Learner(job.teachers[0], 0, role="teacher")
    teacher.update(seen, 0)
    knowledge = teacher.knowledge(seen, 0, 5, vectors=True)
    student = Learner(job.student, 0)
    log = student.update(seen, 0, knowledge=[knowledge], terms=[DETermSpec(experts=4)])
    assert log["terms"] == ["de"] and log["kd_loss"] > 0
    weights = student.state()["weights"]
    assert set(weights) == set(student.model.state_dict())  # the model's tensors only: no aux., no expert
    assert student.num_parameters() == sum(p.numel() for p in student.model.parameters())
    snap = write_snapshot(tmp_path / "runs", 0, {"student": weights}, {"job": "de", "model_info": {}})
    saved = resolve_snapshot(tmp_path / "runs", 0)[0].load_states()["student"]
    assert set(saved) == {"user_emb", "item_emb"} and snap.block == 0


JOB = """
name: rd-cd-de
seed: 0
source:
  dataset: synthetic
  store: stores/tiny
  synthetic: {users: 150, items: 120, interactions: 3000, periods: 3, seed: 1}
blocks: {base_fraction: 0.5, incremental: 2}
teachers:
  - {name: mf, backbone: mf, dim: 16, train: {epochs_base: 4, epochs_block: 2, batch_size: 256}, resources: {num_cpus: 0.5}}
  - {name: gcn, backbone: lightgcn, dim: 16, train: {epochs_base: 4, epochs_block: 2, batch_size: 256}, resources: {num_cpus: 0.5}}
student: {dim: 8, train: {epochs_base: 4, epochs_block: 2, batch_size: 256}, resources: {num_cpus: 0.5}}
distill:
  terms:
    - {name: rd, k: 5, dynamic_samples: 20, dynamic_start: 2}
    - {name: cd, pool: 40, samples: 3, rank_temperature: 10.0}
    - {name: de, experts: 4}
eval: {ks: [10, 20]}
"""


@pytest.mark.slow
def test_rd_cd_and_de_run_under_ray_with_two_teachers(ray_cluster, tiny_job, same_as_local):
    tiny_job("unused")  # a fresh working directory
    path = tiny_job("unused").parent / "rd-cd-de.yaml"
    path.write_text(JOB)
    job = load_job(path)
    assert [t.name for t in job.distill.terms] == ["rd", "cd", "de"] and len(job.teachers) == 2
    result = run_job(job)
    assert [r.block for r in result.results] == [0, 1, 2]
    for r in result.results:
        assert r.updates["student"]["terms"] == ["rd", "cd", "de"]
        assert r.updates["student"]["kd_loss"] > 0
        assert r.metrics["student"]["ndcg@20"] > 0
    same_as_local(job, result)
    from continual_kd.snapshots import resolve_snapshot

    saved = resolve_snapshot(result.runs_dir, "latest")[0].load_states()["student"]
    assert set(saved) == {"user_emb", "item_emb"}  # the served student: no expert, no term state


def test_mixture_skipping_negligible_experts_equals_the_dense_mixture():
    from continual_kd.distill.experts import DENSE_SHARE, MIXTURE_CUTOFF

    ex = DistillationExperts(3, 6, 8, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(400, 3, generator=gen, requires_grad=True)
    t, w = torch.randn(400, 6, generator=gen), torch.rand(400, generator=gen)
    g = -torch.log(-torch.log(torch.rand(400, 8, generator=gen).clamp(1e-10, 1 - 1e-7)))
    for tau in (0.3, 0.05):  # τ = .05: few pairs ≥ the cutoff, so the pairs are evaluated expert by expert
        z = torch.softmax(ex.gumbel_logits(t, g) / tau, -1)
        if tau == 0.05:
            assert int((z >= MIXTURE_CUTOFF).sum()) < DENSE_SHARE * z.numel()
        dense = (w * (t - ex.mixture(s, z)).pow(2).sum(-1)).sum()
        got = ex.loss(s, t, w, tau, g)
        assert float(got.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
        (gd,) = torch.autograd.grad(dense, s)
        (gg,) = torch.autograd.grad(got, s)
        assert torch.allclose(gg, gd, rtol=1e-4, atol=1e-5)
