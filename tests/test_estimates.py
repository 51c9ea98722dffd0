"""Estimates past the log: inverse propensity (unbiased where the truth is known), the intervened split
(uniform over items), labelled-set ranking metrics and the truth's relevance share, by hand."""

import math

import numpy as np
import pytest
import torch

from continual_kd.eval import evaluate_ranking
from continual_kd.eval.estimates import (group_by_user, intervened_split, labelled_metrics, popularity_propensity,
                                         read_labelled_file, relevance_share, truth_labelled_set)
from continual_kd.errors import CkdError
from continual_kd.sparse import UserItemSet


class FixedScores(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = torch.as_tensor(scores, dtype=torch.float32)

    def full_scores(self, users):
        return self.scores[users].clone()


def test_popularity_propensity_by_hand():
    p = popularity_propensity(torch.tensor([100.0, 25, 1, 0]), exponent=0.5, clip=0.05)
    assert torch.allclose(p, torch.tensor([1.0, 0.5, 0.1, 0.05], dtype=torch.float64))
    assert torch.equal(popularity_propensity(torch.tensor([5.0, 0]), exponent=0.0), torch.ones(2, dtype=torch.float64))


def test_uniform_weights_give_back_the_logged_metrics():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 9, generator=gen)
    relevant = UserItemSet([0, 0, 1, 2, 2, 2, 3, 4, 5, 5], [1, 4, 2, 0, 3, 8, 7, 5, 6, 2], 6, 9)
    exclude = UserItemSet([0, 1, 3], [0, 0, 1], 6, 9)
    m = evaluate_ranking(FixedScores(scores), relevant, exclude, ks=(2, 5), item_weight=torch.ones(9))
    for k in (2, 5):
        assert math.isclose(m[f"ips_recall@{k}"], m[f"recall@{k}"], rel_tol=1e-6)
        assert math.isclose(m[f"ips_ndcg@{k}"], m[f"ndcg@{k}"], rel_tol=1e-6)


def test_inverse_propensity_estimates_are_unbiased_where_the_truth_is_known():
    """60 items ranked by id; every user finds the 40 even-or-low items relevant; a relevant pair enters the
    log with probability p_i, high for the items ranked first (popular items get shown and ranked). Over
    many logs the logged figures overrate the ranking; the inverse-propensity ones find the truth."""
    n_items, k = 60, 10
    relevant_items = np.array([i for i in range(n_items) if i % 3 != 2])  # 40 items
    p = np.clip(1.0 - np.arange(n_items) / n_items, 0.15, 1.0)  # (I,) high for the top-ranked ids
    scores = -np.arange(n_items, dtype=np.float32)  # rank = id
    # truth per user: recall@10 = |relevant ∩ top 10| / 40; NDCG@10 over all 40 relevant items
    top = np.arange(k)
    hits_true = np.isin(top, relevant_items)
    disc = 1 / np.log2(np.arange(2, k + 2))
    true_recall = hits_true.sum() / len(relevant_items)
    true_ndcg = (hits_true * disc).sum() / disc.sum()

    logs, users_per_log = 300, 4
    n_users = logs * users_per_log
    rng = np.random.default_rng(0)
    observed = rng.random((n_users, len(relevant_items))) < p[relevant_items][None, :]
    observed[:, 0] = True  # every user has at least one logged pair (item 0 has p = 1 anyway)
    uu, jj = np.nonzero(observed)
    relevant = UserItemSet(uu, relevant_items[jj], n_users, n_items)
    model = FixedScores(np.tile(scores, (n_users, 1)))
    m = evaluate_ranking(model, relevant, None, ks=(k,), item_weight=torch.as_tensor(1 / p))
    assert m[f"recall@{k}"] > true_recall + 0.05  # the logged figure overrates it
    assert abs(m[f"ndcg@{k}"] - true_ndcg) > 0.03  # (lower here: logged misses count as misses)
    assert abs(m[f"ips_recall@{k}"] - true_recall) < 0.01
    assert abs(m[f"ips_ndcg@{k}"] - true_ndcg) < 0.02


def test_intervened_split_draws_every_item_equally():
    rng = np.random.default_rng(1)
    items = rng.zipf(1.6, 5000) % 50  # a skewed test split over 50 items
    users = rng.integers(0, 400, 5000)
    keep = intervened_split(users, items, per_item=2, seed=3)
    counts = np.bincount(items[keep], minlength=50)
    have = np.bincount(items, minlength=50)
    assert set(counts[have >= 2].tolist()) == {2}  # every item with ≥ 2 test pairs: exactly 2
    assert counts[have < 2].sum() == 0  # fewer: left out, so none is over-represented
    # within an item, every pair is equally likely to be drawn: an item with 4 pairs over 800 seeds
    its = np.array([7, 7, 7, 7, 8, 8])
    picks = np.zeros(4)
    for seed in range(800):
        picks += intervened_split(np.arange(6), its, per_item=1, seed=seed)[:4]
    assert picks.sum() == 800 and np.all(np.abs(picks - 200) < 4 * math.sqrt(800 * 0.25 * 0.75))
    assert intervened_split(np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)


def test_labelled_metrics_rank_only_the_labelled_items():
    model = FixedScores([[0.0, 0.9, 0.5, 0.1, 5.0], [0.3, 0.2, 0.1, 0.0, 9.0]])
    users, items, labels = group_by_user(np.array([0, 0, 0, 1, 1]), np.array([3, 1, 2, 0, 1]),
                                         np.array([True, False, True, False, False]))
    m = labelled_metrics(model, users, items, labels, ks=(2,))
    # user 0 ranks 1 (no), 2 (yes), 3 (yes); item 4 is not labelled, so never ranked; user 1 has no positive
    assert m["users"] == 1.0
    assert math.isclose(m["recall@2"], 0.5)
    assert math.isclose(m["ndcg@2"], (1 / math.log2(3)) / (1 + 1 / math.log2(3)), rel_tol=1e-6)


def test_relevance_share_and_truth_labels_by_hand():
    pref = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    model = FixedScores([[5.0, 2.0, 0.0, 1.0]])
    exclude = UserItemSet([0], [0], 1, 4)  # item 0 is known: neither the model nor the best may use it
    m = relevance_share(model, lambda u: pref[u], torch.tensor([0]), exclude, ks=(1, 2))
    assert math.isclose(m["truth_share@2"], (0.1 + 0.3) / (0.5 + 0.3), rel_tol=1e-6)
    assert math.isclose(m["truth_share@1"], 0.1 / 0.5, rel_tol=1e-6)
    certain = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    users, items, labels = truth_labelled_set(lambda u: certain[u], torch.tensor([0]), 4, exclude, per_user=10)
    drawn = items[0][items[0] >= 0].tolist()
    assert sorted(drawn) == [1, 2, 3]  # every rankable item, never the masked one
    assert {i: bool(lab) for i, lab in zip(items[0].tolist(), labels[0].tolist()) if i >= 0} == {1: True, 2: False,
                                                                                                  3: True}


def test_missing_at_random_file(tmp_path):
    f = tmp_path / "mar.csv"
    f.write_text("user,item,label\nu1,i2,5\nu1,i3,2\nu9,i2,5\nu2,i3,4\n")
    users, items, labels, dropped = read_labelled_file(f, {"u1": 0, "u2": 1}, {"i2": 0, "i3": 1}, positive=4)
    assert dropped == 1  # u9 is unknown
    assert users.tolist() == [0, 1] and items.tolist() == [[0, 1], [1, -1]]
    assert labels.tolist() == [[True, False], [True, False]]
    (tmp_path / "bad.csv").write_text("who,what\n1,2\n")
    with pytest.raises(CkdError, match="no column 'user'"):
        read_labelled_file(tmp_path / "bad.csv", {}, {})
