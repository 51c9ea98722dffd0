import math

import pytest
import torch

from continual_kd.distill import (TERMS, UnKDConfig, UnKDTargets, fuse_group_rankings, group_rankings,
                                  popularity_groups, teacher_group_rankings)
from continual_kd.distill.unkd import truncated_geometric
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet


def test_popularity_groups_by_hand():
    # sorted: item1 (8), item3 (4), item0 (2), item4 (2, tie → after item0), item2 (0); total 16, 8 per group
    assert popularity_groups(torch.tensor([2, 8, 0, 4, 2]), 2).tolist() == [1, 0, 1, 1, 1]
    assert popularity_groups(torch.ones(8), 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert popularity_groups(torch.tensor([5, 5, 5, 5]), 2).tolist() == [0, 0, 1, 1]  # ties by id
    assert popularity_groups(torch.zeros(3), 4).tolist() == [0, 0, 0]


def test_popularity_groups_have_equal_mass_within_one_items_count():
    g = torch.Generator().manual_seed(3)
    counts = torch.floor(200.0 / torch.arange(1, 301, dtype=torch.float64) ** 0.9)  # power law, max < total/G
    counts = counts[torch.randperm(300, generator=g)]  # ids not in popularity order
    groups = popularity_groups(counts, 4)
    total = float(counts.sum())
    target = total / 4
    assert groups.unique().tolist() == [0, 1, 2, 3]
    order = torch.sort(counts, descending=True, stable=True).indices
    assert (groups[order].diff() >= 0).all()  # groups are contiguous runs of the popularity order
    mass = [float(counts[groups == j].sum()) for j in range(4)]
    # Precise property: the cut before group j (cumulative mass c_j of groups < j) satisfies
    # j·T - count(first item of j)/2 ≤ c_j < j·T + count(last item of j-1)/2, T = total / G
    sorted_groups, sorted_counts = groups[order], counts[order]
    for j in range(1, 4):
        first = int(torch.nonzero(sorted_groups == j)[0])
        c_j = float(sorted_counts[:first].sum())
        assert j * target - sorted_counts[first] / 2 <= c_j < j * target + sorted_counts[first - 1] / 2
    # hence every group's mass is total/G ± one item's count (the largest count is enough)
    assert all(abs(m - target) <= float(counts.max()) for m in mass)


def test_small_last_group_merges_into_the_previous_one():
    # G=4: item0 and item1 each fill ~2 quarters, groups 0, 1, then item2 (mass 1) alone:
    # 1 < half of the average mass 21/3 → merged
    assert popularity_groups(torch.tensor([10, 10, 1]), 4).tolist() == [0, 1, 1]
    # mass 4 is exactly half the average 24/3: kept
    assert popularity_groups(torch.tensor([10, 10, 4]), 4).tolist() == [0, 1, 2]


ITEM_GROUP = torch.tensor([0, 1, 0, 1, 1, 0])  # group 0: items 0, 2, 5; group 1: items 1, 3, 4
NEG = float("-inf")
SCORES = torch.tensor([[0.5, 0.9, NEG, 0.1, 0.9, 0.3],
                       [0.2, NEG, 0.7, NEG, NEG, 0.7]])


def test_group_rankings_by_hand():
    out = group_rankings(SCORES, ITEM_GROUP, 3)
    assert out.shape == (2, 2, 3)
    # user 0: group 0 → 0 (0.5), 5 (0.3), item 2 masked; group 1 → 1 and 4 tie at 0.9 (smaller id first), 3
    assert out[0].tolist() == [[0, 5, -1], [1, 4, 3]]
    # user 1: group 0 → 2 and 5 tie at 0.7, then 0; group 1 fully masked
    assert out[1].tolist() == [[2, 5, 0], [-1, -1, -1]]
    assert group_rankings(SCORES, ITEM_GROUP, 4)[0].tolist() == [[0, 5, -1, -1], [1, 4, 3, -1]]
    assert group_rankings(SCORES, ITEM_GROUP, 1)[:, :, 0].tolist() == [[0, 1], [2, -1]]


def test_teacher_group_rankings_masks_known_pairs_in_chunks():
    class Fixed(torch.nn.Module):
        def full_scores(self, users):
            return torch.tensor([[0.5, 0.9, 0.8, 0.1, 0.9, 0.3], [0.2, 0.1, 0.7, 0.0, 0.4, 0.7]])[users]

    known = UserItemSet([0, 1, 1, 1], [2, 1, 3, 4], 2, 6)
    out = teacher_group_rankings(Fixed(), torch.tensor([0, 1]), ITEM_GROUP, 3, known, chunk_size=1)
    assert out.tolist() == group_rankings(SCORES, ITEM_GROUP, 3).tolist()


def test_fuse_group_rankings_ignores_padding():
    a = torch.tensor([[[1, 4, -1], [2, 5, 6]]])
    b = torch.tensor([[[4, -1, -1], [6, 2, -1]]])
    out = fuse_group_rankings([a, b], num_items=7, rank_power=1.0)
    # group 0: item4 (1/2 + 1)/2 = 3/4, item1 (1 + 0)/2 = 1/2; group 1: item2 (1 + 1/2)/2 = 3/4,
    # item6 (1/3 + 1)/2 = 2/3, item5 (1/2)/2 = 1/4
    assert out.tolist() == [[[4, 1, -1], [2, 6, 5]]]


def _encoded_groups():
    # user u, group g: items g·100 + position, group lengths vary (one group of 1 item, one empty)
    lengths = torch.tensor([[20, 5, 1], [20, 20, 0], [2, 20, 7]])
    pos = torch.arange(20)
    items = torch.arange(3).view(1, 3, 1) * 100 + pos.view(1, 1, 20)
    items = items.expand(3, -1, -1).clone()
    items[pos.view(1, 1, 20) >= lengths.unsqueeze(-1)] = -1
    return lengths, items


def test_sampled_pairs_stay_in_one_group_and_the_positive_ranks_higher():
    lengths, items = _encoded_groups()
    t = UnKDTargets(UnKDConfig(pairs=300, temperature=5.0), torch.tensor([7, 2, 4]), items)
    t.resample(torch.Generator().manual_seed(0))
    assert t.pos_items.shape == (3, 3, 100)
    groups = torch.arange(3).view(1, 3, 1).expand_as(t.pos_items)
    v = t.valid
    assert torch.equal(v, (lengths >= 2).unsqueeze(-1).expand_as(v))  # all drawn pairs distinct after rejection
    assert torch.equal(t.pos_items[v] // 100, groups[v]) and torch.equal(t.neg_items[v] // 100, groups[v])
    assert (t.pos_items[v] % 100 < t.neg_items[v] % 100).all()  # better-ranked item is the positive
    assert (t.neg_items[v] % 100 < lengths.unsqueeze(-1).expand_as(v)[v]).all()  # never a padding slot
    # redrawn every epoch
    before = t.pos_items.clone()
    t.resample(torch.Generator().manual_seed(1))
    assert not torch.equal(before, t.pos_items)


def test_positions_follow_the_exponential_rank_distribution():
    length = torch.full((200_000,), 10)
    r = truncated_geometric(length, 20.0, torch.Generator().manual_seed(0))
    p = torch.exp(-(torch.arange(10) + 1) / 20.0)
    p = p / p.sum()
    freq = torch.bincount(r, minlength=10).double() / len(r)
    assert r.min() >= 0 and r.max() <= 9
    assert torch.allclose(freq, p.double(), atol=0.005)


def test_loss_by_hand_for_one_user():
    model = build_backbone("mf", 3, 10, dim=2)
    with torch.no_grad():
        model.user_emb.zero_()
        model.item_emb.zero_()
        model.user_emb[1] = torch.tensor([1.0, 0.0])
        model.item_emb[3] = torch.tensor([2.0, 1.0])
        model.item_emb[5] = torch.tensor([0.5, 3.0])
    # group 0: [3, 5] → the only pair is (pos 3, neg 5); group 1 has a single item → no pair
    t = UnKDTargets(UnKDConfig(pairs=2), torch.tensor([1]), torch.tensor([[[3, 5], [7, -1]]]))
    t.resample(torch.Generator().manual_seed(0))
    # s(1,3) = 2, s(1,5) = 0.5: -log(σ(1.5) + 1e-10) = log(1 + e^-1.5)
    expected = math.log(1 + math.exp(-1.5))
    assert math.isclose(expected, 0.201413, abs_tol=1e-6)
    loss = t.loss(model, torch.tensor([1, 1, 0, 2]))  # repeats count once, users 0, 2 have no knowledge
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5)
    assert float(t.loss(model, torch.tensor([0, 2]))) == 0.0
    loss.backward()
    assert model.user_emb.grad[1].abs().sum() > 0


def test_loss_sums_over_pairs_and_users():
    model = build_backbone("mf", 4, 10, dim=3)
    t = UnKDTargets(UnKDConfig(pairs=4), torch.tensor([0, 3]),
                    torch.tensor([[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [7, 8, 9]]]))
    t.resample(torch.Generator().manual_seed(2))
    s = lambda u, i: model.score(torch.tensor([u]), torch.tensor([i]))  # noqa: E731
    manual = sum(-torch.log(torch.sigmoid(s(u, int(p)) - s(u, int(n))) + 1e-10)
                 for row, u in enumerate([0, 3])
                 for p, n in zip(t.pos_items[row].flatten(), t.neg_items[row].flatten()))
    assert math.isclose(float(t.loss(model, torch.tensor([3, 0])).detach()), float(manual.detach()), rel_tol=1e-5)


def test_kd_alone_teaches_the_in_group_order(one_thread):
    torch.manual_seed(0)
    n_users, n_items = 8, 40
    item_group = popularity_groups(torch.arange(n_items, 0, -1).double(), 4)
    teacher = torch.randn(n_users, n_items)
    ranks = group_rankings(teacher, item_group, 40)
    t = UnKDTargets(UnKDConfig(pairs=40), torch.arange(n_users), ranks)
    student = build_backbone("mf", n_users, n_items, dim=16)
    gen = torch.Generator().manual_seed(0)

    def agreement():
        with torch.no_grad():
            same = group_rankings(student.full_scores(torch.arange(n_users)), item_group, 40) == ranks
            return float(same[ranks >= 0].float().mean())  # share of slots holding the teacher's item

    start = agreement()
    for _ in range(30):
        t.resample(gen)
        student.zero_grad(set_to_none=True)
        t.loss(student, torch.arange(n_users)).backward()
        with torch.no_grad():  # plain gradient steps: torch.optim's first use imports torch._dynamo (seconds)
            for p in student.parameters():
                p -= 0.05 * p.grad
    assert agreement() > start + 0.3


def test_registry_and_validation():
    assert TERMS["unkd"].name == "unkd" and set(TERMS) >= {"rrd", "unkd", "hetcomp"}
    with pytest.raises(ValueError, match="padding"):
        UnKDTargets(UnKDConfig(), torch.tensor([0]), torch.tensor([[[1, -1, 2]]]))
