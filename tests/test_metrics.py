import math

import torch

from continual_kd.eval import evaluate_ranking, ndcg_at_k, recall_at_k, top_k_items
from continual_kd.sparse import UserItemSet


class FixedScores(torch.nn.Module):
    """A model whose scores are a given matrix (to check metric arithmetic by hand)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)
        self.num_items = self.scores.shape[1]

    def full_scores(self, users):
        return self.scores[users].clone()


SCORES = [[0.9, 0.1, 0.8, 0.3, 0.5],  # user 0: ranking 0,2,4,3,1; item 0 is masked
          [0.2, 0.4, 0.6, 0.8, 1.0]]  # user 1: ranking 4,3,2,1,0


def test_metric_functions_on_a_hit_matrix():
    hits = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    n_rel = torch.tensor([2, 1, 4])
    assert recall_at_k(hits, n_rel).tolist() == [1.0, 0.0, 0.25]
    nd = ndcg_at_k(hits, n_rel).tolist()
    assert math.isclose(nd[0], (1 + 1 / 2) / (1 + 1 / math.log2(3)), rel_tol=1e-6)
    assert nd[1] == 0.0
    # 4 relevant, K=3: ideal DCG is 3 hits at the top
    assert math.isclose(nd[2], (1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / 2), rel_tol=1e-6)


def test_full_ranking_with_masking_matches_hand_computed_values():
    model = FixedScores(SCORES)
    relevant = UserItemSet([0, 0, 1], [2, 3, 0], 2, 5)
    exclude = UserItemSet([0], [0], 2, 5)
    m = evaluate_ranking(model, relevant, exclude, ks=(2, 5))
    # user 0 after masking item 0: 2,4,3,1 → top-2 hits [1,0]; user 1: item 0 is last
    u0_ndcg2 = 1 / (1 + 1 / math.log2(3))
    assert math.isclose(m["recall@2"], (0.5 + 0.0) / 2)
    assert math.isclose(m["ndcg@2"], (u0_ndcg2 + 0.0) / 2, rel_tol=1e-6)
    assert math.isclose(m["recall@5"], 1.0)
    u0_ndcg5 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    u1_ndcg5 = 1 / math.log2(6)
    assert math.isclose(m["ndcg@5"], (u0_ndcg5 + u1_ndcg5) / 2, rel_tol=1e-6)
    assert m["users"] == 2


def test_evaluation_chunks_do_not_change_results():
    model = FixedScores(SCORES)
    relevant = UserItemSet([0, 0, 1], [2, 3, 0], 2, 5)
    exclude = UserItemSet([0], [0], 2, 5)
    assert evaluate_ranking(model, relevant, exclude, (2, 5), chunk_size=1) == \
        evaluate_ranking(model, relevant, exclude, (2, 5), chunk_size=64)


def test_top_k_items_skips_known_pairs():
    model = FixedScores(SCORES)
    ids, scores = top_k_items(model, torch.tensor([0, 1]), 2, UserItemSet([0, 1], [0, 4], 2, 5))
    assert ids.tolist() == [[2, 4], [3, 2]]
    assert torch.allclose(scores, torch.tensor([[0.8, 0.5], [0.8, 0.6]]))


def test_top_k_items_can_rank_only_the_known_items():
    model = FixedScores(SCORES)
    known = UserItemSet([0, 0, 0, 1], [1, 3, 4, 2], 2, 5)
    ids, scores = top_k_items(model, torch.tensor([0, 1]), 3, only=known)
    assert ids.tolist() == [[4, 3, 1], [2, -1, -1]]  # user 0 by score .5 > .3 > .1; user 1 has one item
    assert scores[1, 1:].isinf().all()


def test_no_user_to_evaluate_gives_none_not_nan_and_means_skip_it():
    from continual_kd.eval.metrics import defined_mean, undefined_as_none

    empty = evaluate_ranking(FixedScores(SCORES), UserItemSet([], [], 2, 5), None, ks=(2,),
                             item_popularity=torch.tensor([5, 4, 3, 2, 1]))
    assert empty["users"] == 0.0
    assert {k: v for k, v in empty.items() if k != "users"} == {
        "recall@2": None, "ndcg@2": None, "recall@2/head": None, "recall@2/mid": None, "recall@2/tail": None,
        "avgpop@2": None, "coverage@2": None}
    assert defined_mean([0.5, None, float("nan"), 0.25]) == (0.375, 2)  # over the 2 blocks where it is defined
    assert defined_mean([None, None]) == (None, 0)
    assert undefined_as_none({"a": [1.0, float("nan")], "b": (float("inf"), "x", None, 2)}) == \
        {"a": [1.0, None], "b": [None, "x", None, 2]}


def test_plasticity_stability_and_their_harmonic_mean_by_hand():
    from continual_kd.eval.continual import harmonic_mean, plasticity_stability

    per_block = {0: {"ndcg@20": 0.2, "recall@20": 0.3}, 1: {"ndcg@20": 0.4, "recall@20": float("nan")},
                 2: {"ndcg@20": 0.1, "recall@20": 0.5}}
    out = plasticity_stability(per_block, 2)
    assert out["plasticity/ndcg@20"] == 0.1
    assert math.isclose(out["stability/ndcg@20"], 0.3)  # blocks 0 and 1, not block 2 itself
    assert math.isclose(out["hmean/ndcg@20"], 2 * 0.1 * 0.3 / 0.4)
    assert math.isclose(out["stability/recall@20"], 0.3)  # the NaN of block 1 is left out, not averaged in
    first = plasticity_stability(per_block, 0)
    assert first["plasticity/ndcg@20"] == 0.2 and first["stability/ndcg@20"] is None and first["hmean/ndcg@20"] is None
    nan_now = plasticity_stability(per_block, 1)
    assert nan_now["plasticity/recall@20"] is None and nan_now["hmean/recall@20"] is None
    assert harmonic_mean(0.0, 0.0) == 0.0 and math.isclose(harmonic_mean(0.2, 0.6), 0.3)
