import math

import pytest
import torch

from continual_kd.distill import fuse_rankings, teacher_weights_from_ndcg

# 2 users × 3 teachers; teacher 2 keeps only its top-2 (N_t differs per teacher)
T0 = torch.tensor([[0, 1, 2], [4, 5, 0]])
T1 = torch.tensor([[1, 0, 3], [5, 4, 1]])
T2 = torch.tensor([[2, 1], [3, 4]])
LISTS = [T0, T1, T2]


def test_rank_fusion_by_hand_with_reciprocal_ranks():
    # rank_power = 1: contribution 1/rank, absent = 0, mean over the 3 teachers
    items, scores = fuse_rankings(LISTS, 5, "rank", num_items=6, rank_power=1.0)
    # user 0: item0 (1 + 1/2 + 0)/3 = 1/2, item1 (1/2 + 1 + 1/2)/3 = 2/3, item2 (1/3 + 0 + 1)/3 = 4/9,
    #         item3 (0 + 1/3 + 0)/3 = 1/9; only 4 candidates → one -1 pad with score 0
    assert items[0].tolist() == [1, 0, 2, 3, -1]
    assert torch.allclose(scores[0], torch.tensor([2 / 3, 1 / 2, 4 / 9, 1 / 9, 0.0]))
    # user 1: item4 (1 + 1/2 + 1/2)/3 = 2/3, item5 (1/2 + 1)/3 = 1/2, item3 (1)/3 = 1/3,
    #         item0 (1/3)/3 = 1/9 and item1 (1/3)/3 = 1/9 tie → smaller id first
    assert items[1].tolist() == [4, 5, 3, 0, 1]
    assert torch.allclose(scores[1], torch.tensor([2 / 3, 1 / 2, 1 / 3, 1 / 9, 1 / 9]))


def test_rank_fusion_with_the_ccd_exponent():
    p = 0.05
    items, scores = fuse_rankings(LISTS, 2, num_items=6)  # defaults: "rank", rank_power 0.05
    r2, r3 = 0.5**p, (1 / 3) ** p
    # user 0: item1 = (r2 + 1 + r2)/3 beats item0 = (1 + r2)/3 and item2 = (r3 + 1)/3
    assert items[0].tolist() == [1, 0]
    assert math.isclose(float(scores[0, 0]), (2 * r2 + 1) / 3, rel_tol=1e-6)
    assert math.isclose(float(scores[0, 1]), (1 + r2) / 3, rel_tol=1e-6)
    items, scores = fuse_rankings(LISTS, 3, num_items=6)
    assert items[0].tolist() == [1, 0, 2] and math.isclose(float(scores[0, 2]), (r3 + 1) / 3, rel_tol=1e-6)


def test_weights_change_the_order():
    # teacher 2 weighted 4: user 0 item2 = (1/3 + 0 + 4·1)/6 = 13/18 beats item1 = (1/2 + 1 + 4/2)/6 = 7/12
    items, scores = fuse_rankings(LISTS, 4, "rank", [1.0, 1.0, 4.0], num_items=6, rank_power=1.0)
    assert items[0].tolist() == [2, 1, 0, 3]
    assert torch.allclose(scores[0], torch.tensor([13 / 18, 7 / 12, 1.5 / 6, (1 / 3) / 6]))
    # teacher 1 alone (others weight 0): its own list, in its own order
    items, _ = fuse_rankings(LISTS, 3, "rank", [0.0, 1.0, 0.0], num_items=6, rank_power=1.0)
    assert items.tolist() == T1.tolist()


def test_importance_fusion_by_hand():
    # HetComp importance exp(-pos/10), pos 0-based; absent items contribute 0
    items, scores = fuse_rankings(LISTS, 4, "importance", num_items=6)
    e1, e2 = math.exp(-0.1), math.exp(-0.2)
    expected = {1: (e1 + 1 + e1) / 3, 0: (1 + e1) / 3, 2: (e2 + 1) / 3, 3: e2 / 3}
    assert items[0].tolist() == [1, 0, 2, 3]
    assert torch.allclose(scores[0], torch.tensor([expected[i] for i in [1, 0, 2, 3]]))
    # user 1: item4 (1 + e1 + e1), item5 (e1 + 1), item3 (1), item0 (e2) = item1 (e2) → id order
    assert items[1].tolist() == [4, 5, 3, 0]


def test_padding_is_ignored_and_ties_break_by_item_id():
    a = torch.tensor([[7, -1, -1]])
    b = torch.tensor([[3, -1, -1]])
    items, scores = fuse_rankings([a, b], 3, num_items=10, rank_power=1.0)
    assert items.tolist() == [[3, 7, -1]]  # both at rank 1 in one list: equal scores, 3 < 7
    assert torch.allclose(scores, torch.tensor([[0.5, 0.5, 0.0]]))


def test_chunking_matches_a_dense_reference():
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 37, 50
    lists = [torch.stack([torch.randperm(n_items, generator=g)[:n] for _ in range(n_users)]) for n in (12, 8, 20)]
    weights = [0.5, 0.2, 0.3]
    items, scores = fuse_rankings(lists, 10, "rank", weights, num_items=n_items, chunk_size=5)
    dense = torch.zeros(n_users, n_items, dtype=torch.float64)
    for lst, w in zip(lists, weights):
        contrib = (1.0 / torch.arange(1, lst.shape[1] + 1, dtype=torch.float64)) ** 0.05 * w
        dense.scatter_add_(1, lst, contrib.expand(n_users, -1))
    # reference order: score descending, then item id ascending
    ref = torch.sort(-dense, dim=1, stable=True).indices[:, :10]
    assert items.tolist() == ref.tolist()
    assert torch.allclose(scores.double(), torch.gather(dense, 1, ref), atol=1e-6)
    big = fuse_rankings(lists, 10, "rank", weights, num_items=n_items, chunk_size=4096)
    assert torch.equal(big[0], items) and torch.equal(big[1], scores)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_rankings(LISTS, 2, "borda", num_items=6)
    with pytest.raises(ValueError, match="weights"):
        fuse_rankings(LISTS, 2, weights=[1.0], num_items=6)
    with pytest.raises(ValueError, match="num_items"):
        fuse_rankings(LISTS, 2, num_items=5)


def test_teacher_weights_from_ndcg_normalise_with_a_floor():
    w = teacher_weights_from_ndcg([0.3, 0.1, float("nan"), 0.0])
    assert math.isclose(sum(w), 1.0)
    assert math.isclose(w[0] / w[1], 3.0)
    assert w[2] == w[3] and 0 < w[2] < 0.01
    assert teacher_weights_from_ndcg([float("nan"), float("nan")]) == [0.5, 0.5]


def test_sharpened_weights_run_from_uniform_to_the_best_teacher_alone():
    from continual_kd.distill.fusion import sharpened_weights

    assert sharpened_weights([0.2, 0.1], 0.0) == [0.5, 0.5]
    assert sharpened_weights([0.2, 0.1], 1.0) == pytest.approx([2 / 3, 1 / 3])
    assert sharpened_weights([0.2, 0.1], 2.0) == pytest.approx([0.8, 0.2])
    assert sharpened_weights([0.2, 0.1, 0.2], math.inf) == [0.5, 0.0, 0.5]  # ties share
    assert sharpened_weights([float("nan"), 0.0], 1.0) == [0.5, 0.5]  # no evidence: the floor for both


def test_fusion_evidence_rewards_the_weighting_whose_fused_list_finds_the_held_out_item():
    from continual_kd.distill.fusion import WEIGHT_POWERS, choose_power, fusion_evidence, without
    from continual_kd.sparse import UserItemSet

    users = torch.tensor([0, 1])
    # teacher a lists the held-out item first; b lists items both teachers share, which uniform fusion prefers
    a = torch.tensor([[5, 1, 2], [7, 1, 2]])
    b = torch.tensor([[1, 2, 6], [1, 2, 6]])
    relevant = UserItemSet([0, 1], [5, 7], 2, 10)
    hidden = UserItemSet([1], [1], 2, 10)  # user 1 already has item 1: no ranking may show it
    assert without(b, users, hidden).tolist() == [[1, 2, 6], [2, 6, -1]]
    ndcgs, sums = fusion_evidence([a, b], users, relevant, hidden, "rank", num_items=10, k=2)
    assert ndcgs == [1.0, 0.0]
    # uniform: user 0 gets [1, 2] (a miss), user 1 [2, 7] (a hit second); a alone: each user's hit first
    assert sums[0.0] == pytest.approx(1 / math.log2(3)) and sums[math.inf] == pytest.approx(2.0)
    assert choose_power(sums) == min(p for p in WEIGHT_POWERS if sums[p] == max(sums.values()))
    assert choose_power({p: 0.0 for p in WEIGHT_POWERS}) == 0.0  # no evidence: uniform


def test_an_item_penalty_reorders_the_fused_candidates():
    # rank_power 1, user 0's fused scores: item1 2/3, item0 1/2, item2 4/9, item3 1/9 (above)
    penalty = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0, 0.0])  # item1: 2/3 - 0.3 = 0.367, now below items 0 and 2
    items, scores = fuse_rankings(LISTS, 4, "rank", num_items=6, rank_power=1.0, item_penalty=penalty)
    assert items[0].tolist() == [0, 2, 1, 3]
    assert torch.allclose(scores[0], torch.tensor([1 / 2, 4 / 9, 2 / 3 - 0.3, 1 / 9]))
    assert items[1].tolist() == [4, 5, 3, 0, 1][:4]  # user 1: item1 was 5th, only lower now


def _popular_consensus(users: int = 200, items: int = 60, seed: int = 0):
    """Three teachers whose lists agree on popular items and each add their own unpopular ones: the rank
    fusion of them is more popular than every teacher (the consensus rises)."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.arange(items, 0, -1).float() ** 2  # item 0 the most popular
    lists = []
    for t in range(3):
        score = -torch.arange(items).float() / 4 + torch.randn(users, items, generator=g)  # popular first, noisy
        own = torch.arange(items) % 3 == t
        score[:, own & (torch.arange(items) >= 20)] += 5.0  # this teacher's own unpopular favourites
        lists.append(score.topk(30, dim=1).indices)
    return lists, popularity


def test_popularity_matched_beta_is_the_least_penalty_that_matches_the_least_popular_teacher():
    from continual_kd.distill.fusion import popularity_matched_beta

    lists, popularity = _popular_consensus()
    log_pop = torch.log1p(popularity)

    def avgpop(beta):
        fused = fuse_rankings(lists, 20, num_items=60, item_penalty=beta * log_pop)[0]
        return float(popularity[fused].mean())

    teachers = [float(popularity[lst[:, :20]].mean()) for lst in lists]
    assert avgpop(0.0) > min(teachers) * 1.05  # the consensus is more popular than every teacher
    beta, figures = popularity_matched_beta(lists, popularity, num_items=60)
    assert beta > 0
    assert figures["target_avgpop"] == pytest.approx(min(teachers))
    assert figures["fused_avgpop"] == pytest.approx(avgpop(0.0))
    assert avgpop(beta) <= min(teachers) + 1e-6  # matched ...
    assert avgpop(0.9 * beta) > min(teachers)  # ... by the least such penalty (to the bisection's precision)
    assert figures["fused_avgpop_after"] == pytest.approx(avgpop(beta))
    # a sample of users: the same kind of answer from a seeded part of them, the same for the same seed
    b1, f1 = popularity_matched_beta(lists, popularity, num_items=60, sample=50, seed=3)
    assert f1["users"] == 50 and (b1, f1) == popularity_matched_beta(lists, popularity, num_items=60, sample=50, seed=3)
    assert 0.5 * beta < b1 < 2 * beta


def test_popularity_matched_beta_scales_its_target():
    """fusion_popularity: served moves the target to the least popular teacher's × a scale: a lower target
    takes a larger penalty, a higher one a smaller, each the least that reaches it."""
    from continual_kd.distill.fusion import popularity_matched_beta

    lists, popularity = _popular_consensus()
    beta, figures = popularity_matched_beta(lists, popularity, num_items=60)
    low, f_low = popularity_matched_beta(lists, popularity, num_items=60, target_scale=0.95)
    high, f_high = popularity_matched_beta(lists, popularity, num_items=60, target_scale=1.03)
    assert f_low["least_avgpop"] == f_high["least_avgpop"] == figures["target_avgpop"]
    assert f_low["target_avgpop"] == pytest.approx(0.95 * figures["target_avgpop"])
    assert high < beta < low
    assert f_low["fused_avgpop_after"] <= f_low["target_avgpop"] + 1e-6
    assert f_high["fused_avgpop_after"] <= f_high["target_avgpop"] + 1e-6


def test_popularity_matched_beta_is_zero_when_the_fusion_adds_no_popularity():
    from continual_kd.distill.fusion import popularity_matched_beta

    lists, popularity = _popular_consensus()
    beta, figures = popularity_matched_beta(lists, popularity.flip(0), num_items=60)  # popular = the lists' tails
    assert beta == 0.0 and figures["fused_avgpop"] <= figures["target_avgpop"]


class _Fixed(torch.nn.Module):
    """A member whose scores are a given matrix."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores, dtype=torch.float32)
        self.num_users, self.num_items = self.scores.shape

    def observe(self, users, items):
        pass

    def full_scores(self, users):
        return self.scores[users].clone()


def test_the_evaluated_ensemble_fuses_full_rankings_by_hand():
    from continual_kd.continual.ensemble import RankFusionEnsemble
    from continual_kd.eval import evaluate_ranking
    from continual_kd.sparse import UserItemSet

    a = _Fixed([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    b = _Fixed([[0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    users = torch.tensor([0, 1])
    # weights 1 : 3, rank power 1: user 0's ranks a 1 2 3 4, b 4 1 2 3
    fused = RankFusionEnsemble([a, b], weights=[1.0, 3.0], power=1.0).full_scores(users)
    assert torch.allclose(fused[0], torch.tensor([0.25 + 0.75 / 4, 0.25 / 2 + 0.75, 0.25 / 3 + 0.75 / 2,
                                                  0.25 / 4 + 0.75 / 3]))
    # a known pair is ranked last by every member before the fusion: user 0's item 1 masked,
    # a's ranks become 1 4 2 3 and b's 3 4 1 2
    known = UserItemSet([0], [1], 2, 4)
    fused = RankFusionEnsemble([a, b], power=1.0, exclude=known).full_scores(users)
    assert torch.allclose(fused[0], torch.tensor([(1 + 1 / 3) / 2, 1 / 4, (1 / 2 + 1) / 2, (1 / 3 + 1 / 2) / 2]))
    assert fused[0].argsort(descending=True).tolist() == [2, 0, 3, 1]
    # a model fused with itself ranks as the model: the same metrics
    relevant = UserItemSet([0, 1, 1], [2, 3, 0], 2, 4)
    alone = evaluate_ranking(a, relevant, known, ks=(1, 2), chunk_size=2)
    twice = evaluate_ranking(RankFusionEnsemble([a, a], exclude=known), relevant, known, ks=(1, 2), chunk_size=2)
    assert alone == twice and alone["ndcg@2"] > 0
