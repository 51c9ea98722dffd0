"""FTD / HTD (topology distillation): cosines, masks, prototypes and group assignment by hand; the
terms learn; each runs through a job under Ray."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual_kd.config import load_job, parse_job
from continual_kd.continual.stages import knowledge_request
from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.ftd import FTDTerm, TeacherSpace, cosine_matrix, full_topology_loss
from continual_kd.distill.htd import (GroupAssignment, HTDTerm, annealed_temperature, group_prototypes,
                                      hierarchical_topology_losses)
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge

R2 = 1 / math.sqrt(2)


def _mf(user_rows, item_rows):
    m = build_backbone("mf", len(user_rows), len(item_rows), dim=len(user_rows[0]))
    with torch.no_grad():
        m.user_emb.copy_(torch.tensor(user_rows, dtype=torch.float32))
        m.item_emb.copy_(torch.tensor(item_rows, dtype=torch.float32))
    return m


def _knowledge(users, user_vectors, item_vectors, source="t"):
    users = np.asarray(users)
    return Knowledge(source, 0, users, np.zeros((len(users), 1), np.int64), np.zeros((len(users), 1), np.float32),
                     user_vectors=np.asarray(user_vectors, np.float32), item_vectors=np.asarray(item_vectors, np.float32))


def _ctx(model, knowledge, num_users, num_items, epochs=10, weights=None):
    return TermContext(model=model, knowledge=knowledge, known=UserItemSet([], [], num_users, num_items),
                       num_users=num_users, num_items=num_items, block=0, epochs=epochs, weights=weights)


def htd_spec(**kw):
    base = dict(name="htd", weight=1e-3, groups=2, alpha=0.5, choice="second", positive_only=True, tau_start=1.0,
                tau_end=1e-10)
    base.update(kw)
    return SimpleNamespace(**base)


# ---------------------------------------------------------------------------------------- FTD


def test_full_topology_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: cosine 0
    t = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # cosine 1/√2
    assert cosine_matrix(t).flatten().tolist() == pytest.approx([1.0, R2, R2, 1.0])
    # both off-diagonal pairs (x, y) and (y, x): 2 · (1/√2 - 0)² = 1; the diagonal adds 0
    assert float(full_topology_loss(s, t)) == pytest.approx(1.0, rel=1e-6)


def test_full_topology_loss_without_the_pair_matrix_equals_the_pairwise_sum():
    """The Gram-matrix form gives the pairwise definition's value and gradient (random rows, zero rows too)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(50, 6, generator=gen)
    s[3] = 0.0
    s.requires_grad_(True)
    t = torch.randn(50, 20, generator=gen)
    direct = (cosine_matrix(t) - cosine_matrix(s)).pow(2).sum()
    fast = full_topology_loss(s, t)
    assert float(fast.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    g_direct, = torch.autograd.grad(direct, s)
    g_fast, = torch.autograd.grad(fast, s)
    assert torch.allclose(g_fast, g_direct, rtol=1e-4, atol=1e-5)


def test_ftd_term_uses_the_batch_users_and_items_with_teacher_vectors():
    """2 users, 3 items; the teacher knows users [0] only and items 0..1 (item 2 is newer than it)."""
    model = _mf([[1.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    k = _knowledge([0], [[1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    term = build_terms([SimpleNamespace(name="ftd", weight=1e-3)], _ctx(model, [k], 2, 3))[0]
    assert isinstance(term, FTDTerm) and TERMS["ftd"] is FTDTerm
    # batch: users {0, 1}, items {0, 1, 2}: entities = user 0 (user 1 has no teacher row), items 0, 1 (not 2)
    batch = Batch(torch.tensor([0, 1, 0]), torch.tensor([0, 2, 0]), torch.tensor([1, 1, 2]))
    users, items = term.teacher.batch_entities(batch)
    assert users.tolist() == [0] and items.tolist() == [0, 1]
    # teacher rows u0 = (1,1), i0 = (1,0), i1 = (0,1): cosines u0·i0 = u0·i1 = 1/√2, i0·i1 = 0
    # student rows u0 = (1,0), i0 = (0,1), i1 = (1,0): cosines u0·i0 = 0, u0·i1 = 1, i0·i1 = 0
    expected = 2 * ((R2 - 0) ** 2 + (R2 - 1) ** 2 + 0.0)
    loss = term.loss(model, batch, 0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()  # the gradient reaches the student's rows of the entities only
    assert model.user_emb.grad[1].abs().sum() == 0 and model.item_emb.grad[2].abs().sum() == 0
    assert model.user_emb.grad[0].abs().sum() > 0


def test_several_teachers_give_the_weighted_mean_cosine():
    model = _mf([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
    a = _knowledge([0], [[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], "a")  # cos(i0, i1) = 0
    b = _knowledge([0], [[2.0, 0.0, 0.0]], [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], "b")  # cos(i0, i1) = 1, dim 3
    space = TeacherSpace(_ctx(model, [a, b], 1, 2, weights=[3.0, 1.0]), "ftd")
    cos = cosine_matrix(space.of(torch.tensor([0]), torch.tensor([0, 1])))
    # (u0, i0): a 1, b 1/√2; (i0, i1): a 0, b 1; weights 3:1
    assert float(cos[0, 1]) == pytest.approx(0.75 * 1 + 0.25 * R2, rel=1e-6)
    assert float(cos[1, 2]) == pytest.approx(0.25, rel=1e-6)


def test_topology_terms_need_vectors_and_ask_for_them():
    model = _mf([[1.0, 0.0]], [[1.0, 0.0]])
    plain = Knowledge("t", 0, np.array([0]), np.array([[0]]), np.array([[1.0]], np.float32))
    with pytest.raises(ValueError, match="vectors"):
        FTDTerm(SimpleNamespace(name="ftd", weight=1.0), _ctx(model, [plain], 1, 1))
    job = parse_job({"teachers": [{"name": "t"}], "distill": {"terms": [{"name": "ftd"}, {"name": "htd", "groups": 4}]}})
    assert knowledge_request(job.distill.terms)["vectors"] is True
    assert job.distill.terms[1].groups == 4 and job.distill.terms[1].choice == "second"


def test_ftd_training_moves_the_student_topology_to_the_teacher(one_thread):
    torch.manual_seed(0)
    nu, ni = 10, 14
    teacher_u, teacher_i = torch.randn(nu, 8), torch.randn(ni, 8)
    model = build_backbone("mf", nu, ni, dim=4)
    term = FTDTerm(SimpleNamespace(name="ftd", weight=1.0),
                   _ctx(model, [_knowledge(np.arange(nu), teacher_u.numpy(), teacher_i.numpy())], nu, ni))
    batch = Batch(torch.arange(nu), torch.arange(nu), torch.arange(nu) + ni - nu)  # every user and item

    def gap():
        with torch.no_grad():
            return float(term.loss(model, batch, 0))

    before = gap()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        term.loss(model, batch, 0).backward()
        opt.step()
    assert gap() < 0.35 * before, (before, gap())


# ---------------------------------------------------------------------------------------- HTD


def test_group_prototypes_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    present, protos = group_prototypes(x, torch.tensor([0, 0, 2]), 3)
    assert present.tolist() == [0, 2]  # group 1 has no member
    assert protos.tolist() == [[2.0, 0.0], [0.0, 2.0]]


def _three_entities():
    # teacher t0 = (1,0), t1 = (1,1), t2 = (0,1); student s0 = (1,0), s1 = (0,1), s2 = (1,0); groups 0, 0, 1
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    return s, t, torch.tensor([0, 0, 1])


def test_entity_level_topology_only_inside_groups():
    s, t, groups = _three_entities()
    entity, _ = hierarchical_topology_losses(s, t, groups, 2)
    # same-group pairs: (0,1), (1,0) and the diagonal: 2 · (cos_T 1/√2 - cos_S 0)² = 1; the cross-group
    # pairs (0,2): cos_T 0 vs cos_S 1 and (1,2): 1/√2 vs 0 would add 2·1 + 2·(1/2) under FTD
    assert float(entity) == pytest.approx(1.0, rel=1e-6)
    assert float(full_topology_loss(s, t)) == pytest.approx(1.0 + 2.0 + 1.0, rel=1e-6)


def test_positive_only_drops_same_group_pairs_with_a_non_positive_teacher_cosine():
    t = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # cos_T = -1/√2
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos_S = 1
    groups = torch.tensor([0, 0])
    kept, _ = hierarchical_topology_losses(s, t, groups, 1, positive_only=False)
    dropped, _ = hierarchical_topology_losses(s, t, groups, 1, positive_only=True)
    assert float(kept) == pytest.approx(2 * (1 + R2) ** 2, rel=1e-6)
    assert float(dropped) == pytest.approx(0.0, abs=1e-6)


def test_group_level_topology_by_hand():
    s, t, groups = _three_entities()
    # prototypes: P_s = [(.5,.5), (1,0)], P_t = [(1,.5), (0,1)]
    c = 1 / math.sqrt(1.25)
    # "second": cos(P_s, s) = [[1/√2, 1/√2, 1/√2], [1, 0, 1]]; cos(P_t, t) = [[c, 1.5·c/√2, .5·c], [0, 1/√2, 1]]
    second = ((R2 - c) ** 2 + (R2 - 1.5 * c * R2) ** 2 + (R2 - 0.5 * c) ** 2 + (1 - 0) ** 2 + (0 - R2) ** 2 + 0)
    _, group = hierarchical_topology_losses(s, t, groups, 2, choice="second")
    assert float(group) == pytest.approx(second, rel=1e-6)
    # "first": prototype-prototype cosines, student 1/√2 vs teacher .5·c, both off-diagonal entries
    _, group = hierarchical_topology_losses(s, t, groups, 2, choice="first")
    assert float(group) == pytest.approx(2 * (R2 - 0.5 * c) ** 2, rel=1e-6)


def test_second_choice_prototypes_carry_no_gradient():
    s, t, groups = _three_entities()
    s = s.clone().requires_grad_(True)
    _, group = hierarchical_topology_losses(s, t, groups, 2, choice="second")
    group.backward()
    # by hand: d/ds of Σ_g (cos(P_s[g], s_n) - cos(P_t[g], t_n))² with P_s fixed; entity 0 = (1,0), P_s[0] = (.5,.5):
    # d cos(p, s)/ds = p/(|p||s|) - cos·s/|s|² = (.5,.5)/(√.5) - (1/√2)(1,0) = (0, 1/√2); residual 1/√2 - c
    c = 1 / math.sqrt(1.25)
    assert s.grad[0].tolist() == pytest.approx([0.0, 2 * (R2 - c) * R2], abs=1e-6)


def test_annealed_temperature():
    assert annealed_temperature(0, 10, 1.0, 1e-10) == 1.0
    assert annealed_temperature(5, 10, 1.0, 1e-10) == pytest.approx(1e-5)
    assert annealed_temperature(10, 10, 1.0, 1e-10) == pytest.approx(1e-10)


def test_group_assignment_picks_the_selected_expert_at_low_temperature():
    g = GroupAssignment(student_dim=1, teacher_dim=2, groups=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.select_w.copy_(torch.tensor([[100.0, 0.0], [0.0, 100.0]]))  # t = (1,0) → group 0, (0,1) → group 1
        g.select_b.zero_()
        # hidden (2+1)//2 = 1; expert 0: h = relu(s), out = (h, 0); expert 1: h = relu(2s), out = (0, h) + (1, 1)
        g.w1.copy_(torch.tensor([[[1.0]], [[2.0]]]))
        g.b1.zero_()
        g.w2.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
        g.b2.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[3.0], [0.5]])
    assert g.hard_groups(t).tolist() == [0, 1]
    assert g.experts(s)[1].tolist() == [[0.5, 0.0], [1.0, 2.0]]
    # entity 0 → expert 0: (3, 0) vs t (1, 0): 4; entity 1 → expert 1: (1, 2) vs (0, 1): 1 + 1
    loss = g.loss(s, t, 1e-10, torch.Generator().manual_seed(3))
    assert float(loss.detach()) == pytest.approx(6.0, rel=1e-5)


def test_htd_term_offsets_item_groups_and_combines_the_parts():
    model = _mf([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]])
    k = _knowledge([0, 1], [[1.0, 0.0], [0.8, 0.2]], [[0.9, 0.1], [0.1, 0.9]])
    term = build_terms([htd_spec(groups=2)], _ctx(model, [k], 2, 2))[0]
    assert isinstance(term, HTDTerm) and TERMS["htd"] is HTDTerm
    with torch.no_grad():  # every user and every item falls in its side's group 0
        for side in (term.user_groups, term.item_groups):
            side.select_w.zero_()
            side.select_b.copy_(torch.tensor([50.0, 0.0]))
    term.resample(torch.Generator().manual_seed(0), 9)  # τ(9 of 10 epochs) = 1e-9
    batch = Batch(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 0]))
    s = torch.cat([model.user_emb, model.item_emb]).detach()
    t = torch.cat([term.teacher.users, term.teacher.items])
    # groups: users 0, items 0 + K = 2: a user and an item are never one group
    entity, group = hierarchical_topology_losses(s, t, torch.tensor([0, 0, 2, 2]), 4)
    mixed_u = term.user_groups.experts(s[:2])[:, 0]
    mixed_i = term.item_groups.experts(s[2:])[:, 0]
    ga = ((t[:2] - mixed_u) ** 2).sum() + ((t[2:] - mixed_i) ** 2).sum()
    got = term.loss(model, batch, 9)
    assert float(got.detach()) == pytest.approx(float((0.5 * (entity + group) + 0.5 * ga).detach()), rel=1e-5)
    # with one group for users and items together the entity term would differ (the offset matters)
    merged, _ = hierarchical_topology_losses(s, t, torch.tensor([0, 0, 0, 0]), 4)
    assert float(merged) != pytest.approx(float(entity), rel=1e-3)
    got.backward()  # the experts and selection nets are trained too
    assert term.user_groups.w2.grad is not None and term.user_groups.w2.grad.abs().sum() > 0


def test_htd_parameters_are_the_terms_not_the_models():
    model = _mf([[1.0, 0.0]] * 3, [[1.0, 0.0]] * 4)
    k = _knowledge([0, 1, 2], np.ones((3, 6)), np.ones((4, 6)))
    term = HTDTerm(htd_spec(groups=5), _ctx(model, [k], 3, 4))
    model_ids = {id(p) for p in model.parameters()}
    assert not model_ids & {id(p) for p in term.parameters()}
    # per side: experts 2→4→6 (5 · (2·4 + 4 + 4·6 + 6)) + selection 6→5 (6·5 + 5)
    assert sum(p.numel() for p in term.parameters()) == 2 * (5 * (8 + 4 + 24 + 6) + 35)
    # the same block builds the same experts (no global RNG): in any process, the same numbers
    again = HTDTerm(htd_spec(groups=5), _ctx(model, [k], 3, 4))
    assert torch.equal(again.user_groups.w1, term.user_groups.w1)
    assert not torch.equal(term.user_groups.w1, term.item_groups.w1)


# ------------------------------------------------------------------------------- through a job


@pytest.mark.parametrize("term", ["{name: ftd, weight: 0.01}", "{name: htd, weight: 0.01, groups: 4}"],
                         ids=["ftd", "htd"])
def test_topology_term_runs_through_a_job_under_ray(ray_cluster, tiny_job, tmp_path, term, same_as_local):
    from continual_kd.runtime.coordinator import run_job
    from continual_kd.snapshots import resolve_snapshot

    path = tiny_job("topo")
    text = path.read_text().replace("distill: {terms: [{name: rrd, weight: 0.01, k: 10, pool: 30, uninteresting: 10}]}",
                                    f"distill: {{terms: [{term}]}}")
    text = text.replace("blocks: {base_fraction: 0.5, incremental: 2}", "blocks: {base_fraction: 0.5, incremental: 1}")
    path.write_text(text)
    job = load_job(path)
    result = run_job(job)
    assert [r.block for r in result.results] == [0, 1]
    name = term.split(",")[0].split()[-1]
    for r in result.results:
        assert r.updates["student"]["terms"] == [name]
        assert r.updates["student"]["kd_loss"] > 0
        assert 0 < r.metrics["student"]["ndcg@20"] <= 1
    same_as_local(job, result)
    snap, _ = resolve_snapshot(tmp_path / "runs" / "topo", "latest")
    weights = torch.load(snap.path / "student.pt", weights_only=True)
    weights = weights.get("weights", weights)
    assert set(weights) == {"user_emb", "item_emb"}  # no expert or selection weights in the served student


def test_within_group_pairs_equal_the_masked_dense_sum_and_its_gradient():
    from continual_kd.distill.htd import EXACT_GROUP, within_group_topology

    gen = torch.Generator().manual_seed(4)
    n = EXACT_GROUP + 90  # one group past EXACT_GROUP (unpadded), the rest padded to powers of two
    groups = torch.cat([torch.zeros(EXACT_GROUP + 10, dtype=torch.int64), torch.randint(1, 7, (80,), generator=gen)])
    s = torch.randn(n, 3, generator=gen, requires_grad=True)
    t = torch.randn(n, 5, generator=gen)
    cs, ct = cosine_matrix(s), cosine_matrix(t)
    mask = (groups[:, None] == groups[None]) & (ct > 0)
    dense = torch.where(mask, (cs - ct) ** 2, torch.zeros_like(cs)).sum()
    got = within_group_topology(F.normalize(s, dim=-1), F.normalize(t, dim=-1), groups, 7)
    assert float(got.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_got,) = torch.autograd.grad(got, s)
    assert torch.allclose(g_got, g_dense, rtol=1e-4, atol=1e-6)
