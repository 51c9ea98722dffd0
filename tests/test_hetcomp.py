import math

import pytest
import torch

from continual_kd.distill.hetcomp import (HetCompConfig, HetCompTargets, checkpoint_distance, plackett_luce_loss,
                                          student_top_items)
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet


def gain(p):  # graded relevance of position p
    return 2 ** math.exp(-p / 10) - 1


def disc(t):
    return 1 / math.log2(t + 2)


def distance_by_hand(student, checkpoint):
    """1 - NDCG, relevance of an item = gain(its position in the checkpoint list)."""
    dcg = sum(gain(checkpoint.index(x)) * disc(t) for t, x in enumerate(student) if x in checkpoint)
    return 1 - dcg / sum(gain(p) * disc(p) for p in range(len(checkpoint)))


def mf_with_scores(item_scores, users=1):
    """MF of dim 1 whose (every) user scores item i as item_scores[i]."""
    model = build_backbone("mf", users, len(item_scores), dim=1)
    with torch.no_grad():
        model.user_emb.fill_(1.0)
        model.item_emb.copy_(torch.tensor(item_scores, dtype=torch.float32).unsqueeze(1))
    return model


# ---- distance -------------------------------------------------------------------------------

def test_checkpoint_distance_by_hand():
    ck = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    student = torch.tensor([[1, 2, 3], [4, 5, 6], [2, 1, 3]])  # identical, disjoint, one swap
    d = checkpoint_distance(student, ck)
    # swap: DCG = gain(1)·1 + gain(0)/log2 3 + gain(2)/2; IDCG = gain(0) + gain(1)/log2 3 + gain(2)/2
    assert d[0].item() == pytest.approx(0.0, abs=1e-6)
    assert d[1].item() == pytest.approx(1.0, abs=1e-6)
    assert d[2].item() == pytest.approx(1 - 1.885190 / 1.932308, abs=1e-5)
    assert d[2].item() == pytest.approx(0.024384, abs=1e-5)


def test_checkpoint_distance_matches_definition_on_random_lists():
    g = torch.Generator().manual_seed(0)
    ck = torch.stack([torch.randperm(30, generator=g)[:10] for _ in range(20)])
    st = torch.stack([torch.randperm(30, generator=g)[:10] for _ in range(20)])
    d = checkpoint_distance(st, ck)
    for u in range(20):
        assert d[u].item() == pytest.approx(distance_by_hand(st[u].tolist(), ck[u].tolist()), abs=1e-5)


def test_checkpoint_distance_student_relevance_ignores_order_inside_the_list():
    ck = torch.tensor([[1, 2, 3], [1, 2, 3]])
    d = checkpoint_distance(torch.tensor([[2, 1, 3], [9, 8, 3]]), ck, relevance="student")
    assert d[0].item() == pytest.approx(0.0, abs=1e-6)
    idcg = sum(gain(t) * disc(t) for t in range(3))
    assert d[1].item() == pytest.approx(1 - gain(2) * disc(2) / idcg, abs=1e-6)


# ---- targets --------------------------------------------------------------------------------

def small_targets(cfg=None):
    # 2 users × 2 teachers × 2 checkpoints, top-3 lists; importance exp(-pos/10)
    a = [torch.tensor([[1, 2, 3], [5, 6, 7]]), torch.tensor([[3, 2, 1], [5, 6, 7]])]
    b = [torch.tensor([[2, 4, 1], [6, 5, 8]]), torch.tensor([[7, 4, 9], [6, 5, 8]])]
    observed = UserItemSet([0, 0, 1], [0, 7, 9], 2, 10)
    return HetCompTargets(cfg or HetCompConfig(k=3, observed=2), torch.tensor([0, 1]), [a, b], observed, 2, 10)


def test_targets_are_importance_summed_plus_observed():
    t = small_targets()
    # user 0: 2 → e^-.1 + 1, 1 → 1 + e^-.2, 4 → e^-.1, 3 → e^-.2
    # user 1: 5 and 6 tie at 1 + e^-.1 (ascending id), 7 and 8 tie at e^-.2
    # observed ranked over the last checkpoints: user 0's 7 is B's first item there; user 1 has one
    assert t.targets().tolist() == [[2, 1, 4, 7, 0], [5, 6, 7, 9, -1]]
    assert t.phase == "early"


def test_targets_match_a_brute_force_fusion():
    g = torch.Generator().manual_seed(3)
    users, items = 7, 15
    traj = [[torch.stack([torch.randperm(items, generator=g)[:6] for _ in range(users)])] for _ in range(3)]
    obs_u = torch.randint(0, users, (12,), generator=g)
    obs_i = torch.randint(0, items, (12,), generator=g)
    observed = UserItemSet(obs_u, obs_i, users, items)
    t = HetCompTargets(HetCompConfig(k=4, observed=3), torch.arange(users), traj, observed, users, items)
    seen = {(int(u), int(i)) for u, i in zip(obs_u, obs_i)}
    for u in range(users):
        score = {}
        for tr in traj:
            for p, i in enumerate(tr[0][u].tolist()):
                score[i] = score.get(i, 0.0) + math.exp(-p / 10)
        unseen = sorted((i for i in score if (u, i) not in seen), key=lambda i: (-score[i], i))
        assert t.top_items[u].tolist() == (unseen + [-1] * 4)[:4]
        mine = sorted((i for i in range(items) if (u, i) in seen), key=lambda i: (-score.get(i, 0.0), i))
        assert t.observed_items[u].tolist() == (mine + [-1] * 3)[:3]


def test_observed_ranked_overrides_the_observed_order():
    a = [torch.tensor([[1, 2]])]
    t = HetCompTargets(HetCompConfig(k=2, observed=3), torch.tensor([0]), [a], UserItemSet([0, 0], [5, 6], 1, 8),
                       1, 8, observed_ranked=torch.tensor([[6, 5]]))
    assert t.targets().tolist() == [[1, 2, 6, 5, -1]]


# ---- dynamic knowledge construction ---------------------------------------------------------

def dkc_targets(advance_when_farther=True):
    # 4 users, 1 teacher, 3 checkpoints; checkpoint c of user u = items 40u + 10c + [0..9]
    ck = [torch.stack([torch.arange(10) + 40 * u + 10 * c for u in range(4)]) for c in range(3)]
    cfg = HetCompConfig(k=10, observed=0, dkc_top=10, advance_when_farther=advance_when_farther)
    return HetCompTargets(cfg, torch.arange(4), [ck], UserItemSet([], [], 4, 160), 4, 160), ck


def dkc_students(ck):
    far = torch.stack([torch.arange(10) + 40 * u + 30 for u in range(4)])  # disjoint from every checkpoint
    first = far.clone()
    first[3] = ck[1][3][[1, 0, *range(2, 10)]]  # user 3 starts one swap away from checkpoint 1
    second = far.clone()
    second[0] = ck[1][0]  # user 0 reaches checkpoint 1: d = 0
    second[2, 9] = ck[1][2, 9]  # user 2 moves a little closer: d₀/d = 1/0.96988 = 1.0311 < θ(20)
    return first, second  # user 1 stays at d = 1; user 3 moves away (d₀ = 0.024 < d = 1)


def test_step_advances_exactly_the_users_past_the_threshold():
    t, ck = dkc_targets()
    first, second = dkc_students(ck)
    assert t.step(10, first) == 0  # the first step only records d₀
    swap = distance_by_hand(first[3].tolist(), ck[1][3].tolist())
    assert t.baseline[0].tolist() == pytest.approx([1, 1, 1, swap], abs=1e-6)
    assert 1 < 1 / t._next_distance(second)[0, 2].item() < t.threshold(20)
    assert t.step(20, second) == 2  # user 0 (closer by > θ) and user 3 (farther)
    assert t.position.tolist() == [[1, 0, 0, 1]]
    # an advanced pair measures d₀ to its new next checkpoint
    assert t.baseline[0, 0].item() == pytest.approx(1.0)
    assert t.top_items[0].tolist() == ck[1][0].tolist() and t.top_items[1].tolist() == ck[0][1].tolist()
    # θ decays: at epoch 60, 1.05·0.995^6 = 1.0189 < 1.0311, so user 2 advances; user 1 (ratio 1) does not
    assert t.threshold(60) == pytest.approx(1.018891, abs=1e-6)
    # (users 0 and 3 now face checkpoint 2, at d = d₀ = 1: they stay)
    assert t.step(60, second) == 1
    assert t.position.tolist() == [[1, 0, 1, 1]]


def test_step_without_advancing_when_farther():
    t, ck = dkc_targets(advance_when_farther=False)
    first, second = dkc_students(ck)
    t.step(10, first)
    assert t.step(20, second) == 1
    assert t.position.tolist() == [[1, 0, 0, 0]]


def test_phase_turns_late_only_when_every_user_reached_every_last_checkpoint():
    a = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]])]
    b = [torch.tensor([[1, 3], [2, 4]])]  # one checkpoint: already at its last
    t = HetCompTargets(HetCompConfig(k=2, observed=0, dkc_top=2), torch.tensor([0, 1]), [a, b],
                       UserItemSet([], [], 2, 10), 2, 10)
    assert t.phase == "early" and t.due(10) and not t.due(0) and not t.due(15)
    far = torch.tensor([[0, 9], [0, 9]])
    t.step(10, far)
    assert t.step(20, torch.tensor([[5, 6], [0, 9]])) == 1  # user 0 reached a's last checkpoint
    assert t.phase == "early"
    assert t.step(30, torch.tensor([[5, 6], [7, 8]])) == 1
    assert t.phase == "late" and not t.due(40) and t.step(40, far) == 0
    single = HetCompTargets(HetCompConfig(k=2, observed=0), torch.tensor([0, 1]), [b], UserItemSet([], [], 2, 10), 2, 10)
    assert single.phase == "late"


# ---- losses ---------------------------------------------------------------------------------

def one_user(checkpoints, cfg):
    # 4 items; the teacher ranks 0 > 1 > 2; item 3 is observed
    lists = [torch.tensor([[0, 1, 2]])] * checkpoints
    return HetCompTargets(cfg, torch.tensor([0]), [lists], UserItemSet([0], [3], 1, 4), 1, 4)


def test_early_loss_by_hand():
    t = one_user(2, HetCompConfig(k=2, observed=1, rank_top=(2, 1)))
    assert t.phase == "early" and t.targets().tolist() == [[0, 1, 3]]
    model = mf_with_scores([2.0, 1.0, 0.0, -1.0])
    # targets 0, 1, 3 each against the one unobserved non-target item 2 (score 0)
    raw = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))
    assert raw == pytest.approx(1.753451, abs=1e-6)
    assert t.loss(model, torch.tensor([0])).item() == pytest.approx(0.01 * raw, rel=1e-5)


def test_late_loss_by_hand():
    t = one_user(1, HetCompConfig(k=2, observed=1, rank_top=(2, 1)))
    assert t.phase == "late"
    model = mf_with_scores([2.0, 1.0, 0.0, -1.0])
    observed = 1 + math.log(1 + math.exp(-1))  # PL([3] | {2})
    top2 = -((2 - math.log(math.e**2 + math.e + 1)) + (1 - math.log(math.e + 1)))  # PL([0, 1] | {2})
    top1 = math.log(math.e**2 + math.e + 1) - 2  # PL([0] | {1, 2})
    raw = observed + (top2 + top1) / 2
    assert raw == pytest.approx(1.877498, abs=1e-6)
    assert t.loss(model, torch.tensor([0, 0])).item() == pytest.approx(0.005 * raw, rel=1e-5)
    scaled = one_user(1, HetCompConfig(weight=2.0, k=2, observed=1, rank_top=(2, 1)))
    assert scaled.loss(model, torch.tensor([0])).item() == pytest.approx(0.01 * raw, rel=1e-5)


def test_plackett_luce_padding_and_stability():
    full = plackett_luce_loss(torch.tensor([[2.0, 1.0]]), torch.tensor([[True, True]]), torch.tensor([0.0]))
    padded = plackett_luce_loss(torch.tensor([[2.0, 1.0, 7.0]]), torch.tensor([[True, True, False]]),
                                torch.tensor([0.0]))
    assert full.item() == pytest.approx(0.720868, abs=1e-5) and padded.item() == pytest.approx(full.item(), abs=1e-6)
    # the loss only sees score differences: shifted by 998 it is the [2, 1] | 0 case above, value and gradient
    s = torch.tensor([[1000.0, 999.0]], requires_grad=True)
    big = plackett_luce_loss(s, torch.tensor([[True, True]]), torch.tensor([998.0]))
    big.backward()
    small = torch.tensor([[2.0, 1.0]], requires_grad=True)
    plackett_luce_loss(small, torch.tensor([[True, True]]), torch.tensor([0.0])).backward()
    assert big.item() == pytest.approx(0.720868, abs=1e-4)
    assert torch.allclose(s.grad, small.grad, atol=1e-3) and small.grad.abs().sum() > 0.1  # float32 at 1000: ~1e-4


@pytest.mark.parametrize("checkpoints", [2, 1])  # early, late
def test_loss_decreases_toward_the_target_order(checkpoints):
    lists = [torch.tensor([[0, 1, 2, 3, 4]])] * checkpoints
    t = HetCompTargets(HetCompConfig(k=4, observed=2, rank_top=(4, 2)), torch.tensor([0]), [lists],
                       UserItemSet([0, 0], [6, 7], 1, 8), 1, 8)
    assert t.targets().tolist() == [[0, 1, 2, 3, 6, 7]]
    aligned = t.loss(mf_with_scores([4.0, 3.0, 2.0, 1.0, -1.0, -2.0, 3.5, 2.5]), torch.tensor([0])).item()
    partway = t.loss(mf_with_scores([1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 3.5, 2.5]), torch.tensor([0])).item()
    reversed_ = t.loss(mf_with_scores([-2.0, -1.0, 0.0, 1.0, 4.0, 3.0, -3.0, -2.5]), torch.tensor([0])).item()
    assert aligned < partway < reversed_


def test_loss_only_for_users_with_targets_and_unique_users():
    t = small_targets()
    model = build_backbone("mf", 4, 10, dim=3)
    assert t.loss(model, torch.tensor([2, 3])).item() == 0.0
    once = t.loss(model, torch.tensor([0])).item()
    assert t.loss(model, torch.tensor([0, 0, 3, 0])).item() == pytest.approx(once, rel=1e-6)


def test_hetcomp_alone_moves_a_small_mf_toward_the_targets():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    num_users, num_items = 8, 40
    obs_items = torch.stack([torch.randperm(num_items, generator=g)[:3] for _ in range(num_users)])
    observed = UserItemSet(torch.arange(num_users).repeat_interleave(3), obs_items.reshape(-1), num_users, num_items)

    def lists():  # teacher top-8 of unobserved items
        out = []
        for u in range(num_users):
            free = [i for i in torch.randperm(num_items, generator=g).tolist() if i not in obs_items[u].tolist()]
            out.append(torch.tensor(free[:8]))
        return torch.stack(out)

    users = torch.arange(num_users)
    for checkpoints in (2, 1):  # early phase, then late phase
        traj = [[lists() for _ in range(checkpoints)] for _ in range(2)]
        t = HetCompTargets(HetCompConfig(k=5, observed=2, rank_top=(4, 2), dkc_top=5), users, traj, observed,
                           num_users, num_items)
        assert t.phase == ("early" if checkpoints == 2 else "late")
        model = build_backbone("mf", num_users, num_items, dim=8)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)

        # early: the 5 targets as a set; late: the order of the top-4 (the 5th is only a competitor)
        n = 5 if checkpoints == 2 else 4

        def hits():  # share of the n best targets among the student's top-n unobserved items
            top = student_top_items(model, users, observed, n)
            return sum(len(set(top[u].tolist()) & set(t.top_items[u, :n].tolist())) for u in users) / (n * num_users)

        before = hits()
        for _ in range(150):
            opt.zero_grad()
            t.loss(model, users).backward()
            opt.step()
        after = hits()
        assert before < 0.3 and after >= 0.95, (checkpoints, before, after)
        if checkpoints == 1:  # the late phase also teaches the order of the top-4
            top = student_top_items(model, users, observed, 4)
            assert (top == t.top_items[:, :4]).all(dim=1).float().mean() >= 0.875
