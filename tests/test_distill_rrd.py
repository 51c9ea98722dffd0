import math

import pytest
import torch

from continual_kd.distill import RRDConfig, RRDTargets, relaxed_ranking_loss
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet


def test_rrd_loss_matches_hand_computation():
    s1 = torch.tensor([[2.0, 1.0]])  # interesting items in teacher order
    s2 = torch.tensor([[0.0]])  # one uninteresting item
    # k=1: 2 - log(e^2 + e^1 + e^0); k=2: 1 - log(e^1 + e^0)
    expected = -((2 - math.log(math.e**2 + math.e + 1)) + (1 - math.log(math.e + 1)))
    assert math.isclose(float(relaxed_ranking_loss(s1, s2)), expected, rel_tol=1e-6)
    assert math.isclose(expected, 0.72088, abs_tol=1e-4)


def test_rrd_loss_sums_over_users_and_is_stable_for_large_scores():
    s1 = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    s2 = torch.tensor([[0.0], [0.0]])
    assert math.isclose(float(relaxed_ranking_loss(s1, s2)), 2 * 0.720878, rel_tol=1e-4)
    big = relaxed_ranking_loss(torch.tensor([[1000.0, 999.0]]), torch.tensor([[998.0]]))
    assert torch.isfinite(big)


def test_rrd_loss_prefers_the_teacher_order():
    right = relaxed_ranking_loss(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[-1.0, -2.0]]))
    wrong = relaxed_ranking_loss(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[-1.0, -2.0]]))
    below = relaxed_ranking_loss(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[4.0, 5.0]]))
    assert float(right) < float(wrong) and float(right) < float(below)


def test_uninteresting_items_avoid_observed_and_teacher_pool():
    num_users, num_items = 3, 50
    users = torch.arange(num_users)
    pool = torch.stack([torch.arange(10) + 10 * u for u in range(num_users)])  # (3, 10)
    observed = UserItemSet([0, 0, 1], [40, 41, 42], num_users, num_items)
    cfg = RRDConfig(k=5, pool=10, uninteresting=30)
    t = RRDTargets(cfg, users, pool, observed, num_users, num_items)
    t.resample(torch.Generator().manual_seed(0))
    assert t.interesting.tolist() == pool[:, :5].tolist()
    un = t.uninteresting
    assert un.shape == (3, 30)
    for u in range(num_users):
        drawn = set(un[u].tolist())
        assert not drawn & set(pool[u].tolist())
        assert not drawn & {i for uu, i in [(0, 40), (0, 41), (1, 42)] if uu == u}


def test_rrd_targets_sample_mode_keeps_teacher_order():
    pool = torch.arange(100).unsqueeze(0)
    t = RRDTargets(RRDConfig(k=8, pool=100, mode="sample"), torch.tensor([0]), pool,
                   UserItemSet([], [], 1, 200), 1, 200)
    t.resample(torch.Generator().manual_seed(1))
    picked = t.interesting[0].tolist()
    assert picked == sorted(picked) and len(set(picked)) == 8 and max(picked) < 100


def test_rrd_loss_only_for_users_with_knowledge():
    model = build_backbone("mf", 4, 20, dim=4)
    t = RRDTargets(RRDConfig(k=3, pool=3, uninteresting=4), torch.tensor([1]), torch.tensor([[1, 2, 3]]),
                   UserItemSet([], [], 4, 20), 4, 20)
    t.resample(torch.Generator().manual_seed(0))
    assert float(t.loss(model, torch.tensor([0, 2, 3]))) == 0.0
    direct = relaxed_ranking_loss(model.score(torch.tensor([1]), t.interesting[[0]]),
                                  model.score(torch.tensor([1]), t.uninteresting[[0]]))
    assert math.isclose(float(t.loss(model, torch.tensor([1, 1, 0])).detach()), float(direct.detach()), rel_tol=1e-6)


def test_lean_pool_keys_draw_outside_observed_and_pool_like_the_complement_sampler(monkeypatch):
    """Many users × a long pool: the pool is kept as sorted keys alone (ListSet) and uninteresting items
    are drawn by rejection; the draws avoid the same pairs and are as uniform over what is left."""
    import continual_kd.distill.rrd as rrd
    from continual_kd.sparse import ListSet

    g = torch.Generator().manual_seed(0)
    num_users, num_items, pool = 60, 50, 20
    users = torch.randperm(num_users, generator=g)[:40]  # 40 users with knowledge, in no order
    items = torch.stack([torch.randperm(num_items, generator=g)[:pool] for _ in users])
    items[0, -3:] = -1  # a short list: no item in those slots
    obs_u = torch.randint(0, num_users, (300,), generator=g)
    obs_i = torch.randint(0, num_items, (300,), generator=g)
    observed = UserItemSet(obs_u, obs_i, num_users, num_items)
    cfg = RRDConfig(k=5, pool=pool, uninteresting=400)

    keys = ListSet(users, items, num_users, num_items)
    listed = {(int(u), int(i)) for u, row in zip(users, items) for i in row if i >= 0}
    assert len(keys) == len(listed) and bool((keys.keys[1:] > keys.keys[:-1]).all())
    qu, qi = torch.meshgrid(torch.arange(num_users), torch.arange(num_items), indexing="ij")
    inside = keys.contains(qu.reshape(-1), qi.reshape(-1)).tolist()
    assert {(int(u), int(i)) for u, i, x in zip(qu.reshape(-1), qi.reshape(-1), inside) if x} == listed

    full = RRDTargets(cfg, users, items, observed, num_users, num_items)
    monkeypatch.setattr(rrd, "LEAN_POOL_PAIRS", 10)
    lean = RRDTargets(cfg, users, items, observed, num_users, num_items)
    assert full.sampler is not None and lean.sampler is None and lean.pool_keys is not None
    assert torch.equal(lean.interesting, full.interesting)
    for t in (full, lean):
        t.resample(torch.Generator().manual_seed(1))
        drawn = t.uninteresting
        for row, u in enumerate(users.tolist()):
            allowed = set(range(num_items)) - {i for (uu, i) in listed if uu == u} - set(
                observed.items[observed.users == u].tolist())
            got = drawn[row].tolist()
            assert set(got) <= allowed  # never observed, never in the pool
            counts = torch.bincount(drawn[row], minlength=num_items).float()[sorted(allowed)]
            assert float(counts.min()) > 0  # 400 draws over ≤ 50 items: every allowed item drawn


def test_a_list_shorter_than_the_pool_counts_only_its_items():
    # a small catalogue: user 0's list ran out after 2 items (-1 padding), user 1's is full
    model = build_backbone("mf", 2, 12, dim=4)
    pool = torch.tensor([[3, 5, -1, -1], [1, 2, 4, 6]])
    t = RRDTargets(RRDConfig(k=3, pool=4, uninteresting=3), torch.tensor([0, 1]), pool,
                   UserItemSet([0], [7], 2, 12), 2, 12)
    t.resample(torch.Generator().manual_seed(0))
    assert not set(t.uninteresting[0].tolist()) & {3, 5, 7}  # outside the list and the known items
    assert not set(t.uninteresting[1].tolist()) & {1, 2, 4, 6}
    users = torch.tensor([0, 1])
    loss = t.loss(model, users)
    short = relaxed_ranking_loss(model.score(users[:1], torch.tensor([[3, 5]])), model.score(users[:1], t.uninteresting[:1]))
    full = relaxed_ranking_loss(model.score(users[1:], torch.tensor([[1, 2, 4]])), model.score(users[1:], t.uninteresting[1:]))
    assert math.isclose(float(loss.detach()), float((short + full).detach()), rel_tol=1e-6)
    loss.backward()
    assert torch.isfinite(model.item_emb.grad).all()
    sampled = RRDTargets(RRDConfig(k=3, pool=4, uninteresting=3, mode="sample"), torch.tensor([0, 1]), pool,
                         UserItemSet([0], [7], 2, 12), 2, 12)
    sampled.resample(torch.Generator().manual_seed(0))  # user 0 has 2 listed items for k = 3: no error
    assert set(sampled.interesting[0].tolist()) >= {3, 5} and torch.isfinite(sampled.loss(model, users))


def test_uninteresting_items_drawn_by_popularity_avoid_the_pool_and_follow_the_weights():
    num_items = 40
    pool = torch.tensor([[0, 1, 2, 3]])
    popularity = torch.zeros(num_items)
    popularity[10], popularity[11] = 99.0, 24.0  # (count + 1)^1: item 10 is 4× item 11, 100× an item never seen
    observed = UserItemSet([0], [12], 1, num_items)
    t = RRDTargets(RRDConfig(k=2, pool=4, uninteresting=4000, uninteresting_exponent=1.0), torch.tensor([0]), pool,
                   observed, 1, num_items, item_popularity=popularity)
    t.resample(torch.Generator().manual_seed(0))
    drawn = torch.bincount(t.uninteresting[0], minlength=num_items)
    assert int(drawn[[0, 1, 2, 3, 12]].sum()) == 0  # never the pool or a known item
    assert 3.3 < float(drawn[10]) / float(drawn[11]) < 4.8
    assert float(drawn[10]) > 0.5 * 4000 * 100 / (100 + 25 + 34)  # most of the mass goes to the popular items


def _reference_rrd(s1: list[list[float]], s2: list[list[float]]) -> float:
    """The RRD loss slot by slot, each log-sum-exp in float64 shifted by its own largest term."""
    total = 0.0
    for a, b in zip(s1, s2):
        for k in range(len(a)):
            rest = a[k:] + b
            m = max(rest)
            total += m + math.log(sum(math.exp(x - m) for x in rest)) - a[k]
    return total


def test_rrd_loss_is_exact_and_finite_whatever_the_spread_of_a_row():
    # a slot ~1,500 below its row's largest score with nothing near it further down: exp(-1500) underflows even in
    # float64 (the 10M stream's student reached such spreads at its first warm update and its loss became inf)
    s1 = [[900.0, -600.0, -601.0, -2000.0], [1.0, 0.5, 0.0, -0.5]]
    s2 = [[-2500.0, -2600.0], [-1.0, 0.2]]
    a = torch.tensor(s1, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(s2, dtype=torch.float32, requires_grad=True)
    loss = relaxed_ranking_loss(a, b)
    assert math.isfinite(float(loss.detach()))
    assert math.isclose(float(loss.detach()), _reference_rrd(s1, s2), rel_tol=1e-6)
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all())
    # the first row alone: only -600 over -601 costs anything, log(1 + e⁻¹)
    assert math.isclose(float(relaxed_ranking_loss(a[:1], b[:1]).detach()), math.log1p(math.exp(-1)), rel_tol=1e-6)
    # a slot ~740 below its row's largest score: its exp-space sum is subnormal, finite in the forward and inf in
    # the backward (1 / sum) — the gradients must stay finite and exact all the same
    near = torch.tensor([[0.0, -740.0, -741.0], [0.0, -0.5, -1.0]], dtype=torch.float32, requires_grad=True)
    far = torch.tensor([[-742.0], [-2.0]], dtype=torch.float32, requires_grad=True)
    loss = relaxed_ranking_loss(near, far)
    assert math.isclose(float(loss.detach()), _reference_rrd(near.tolist(), far.tolist()), rel_tol=1e-6)
    g_near, g_far = torch.autograd.grad(loss, (near, far))
    assert bool(torch.isfinite(g_near).all()) and bool(torch.isfinite(g_far).all())
    # d/ds of the slot -740 over -741 and -742: softmax weight - 1, as in any row
    assert float(g_near[0, 1]) == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)) - 1, rel=1e-5)
    # a padded list (listed False at its end) still counts as the shorter list
    from continual_kd.distill.rrd import ranked_above_loss

    listed = torch.tensor([[True, True, True, False], [True, True, True, True]])
    padded = ranked_above_loss(torch.cat([a, b], 1).detach(), 4, listed)
    short = _reference_rrd([s1[0][:3]], [s2[0]]) + _reference_rrd([s1[1]], [s2[1]])
    assert math.isclose(float(padded), short, rel_tol=1e-6)


def test_rrd_loss_takes_the_same_value_in_exp_space_and_in_log_space():
    from continual_kd.distill.rrd import _log_space_terms, ranked_above_loss

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 30, generator=g, dtype=torch.float64) * 5
    assert float(ranked_above_loss(scores, 20)) == pytest.approx(float(_log_space_terms(scores, 20).sum()), rel=1e-12)
