import math

import pytest
import torch

from continual_kd.eval import (average_popularity, coverage, covered_items, evaluate_ranking, group_recall_at_k,
                               item_popularity_groups)
from continual_kd.sparse import UserItemSet


class FixedScores(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def full_scores(self, users):
        return self.scores[users].clone()


POP = torch.tensor([10, 8, 5, 3, 1, 0])  # training interaction counts
GROUPS = torch.tensor([0, 1, 1, 2, 2, 2])  # head: 0; mid: 1, 2; tail: 3, 4, 5
SCORES = [[0.9, 0.8, 0.1, 0.7, 0.2, 0.3],  # user 0: top-2 = 0, 1
          [0.1, 0.2, 0.3, 0.9, 0.8, 0.4],  # user 1: item 3 masked → top-2 = 4, 5
          [0.5, 0.1, 0.2, 0.3, 0.9, 0.6]]  # user 2: top-2 = 4, 5
RELEVANT = UserItemSet([0, 0, 1, 1, 2, 2, 2], [1, 3, 0, 5, 2, 4, 5], 3, 6)
EXCLUDE = UserItemSet([1], [3], 3, 6)


def test_item_popularity_groups_by_item_share():
    # 6 items: head = round(1.2) = 1 item, mid up to round(3.0) = 3 → 2 items, tail = 3 items
    assert item_popularity_groups(POP).tolist() == GROUPS.tolist()
    # 10 items, ids out of order; sorted: 1(9) 8(8) | 4(7) 6(5) 9(4) | 2(3) 3(3) 7(2) 5(1) 0(0)
    counts = torch.tensor([0, 9, 3, 3, 7, 1, 5, 2, 8, 4])
    assert item_popularity_groups(counts).tolist() == [2, 0, 2, 2, 1, 2, 1, 2, 0, 1]
    # ties straddling a cut go by id: 5 equal items, shares 0.4/0.6 → first 2 ids are the head
    assert item_popularity_groups(torch.ones(5), (0.4, 0.6)).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="sum to 1"):
        item_popularity_groups(POP, (0.5, 0.2))


def test_pure_bias_functions_on_a_hand_example():
    hits = torch.tensor([[False, True], [False, True]])
    top_groups = torch.tensor([[0, 1], [2, 2]])
    rel_per_group = torch.tensor([[0, 1, 1], [1, 0, 1]])
    recall, has = group_recall_at_k(hits, top_groups, rel_per_group)
    assert recall.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert has.tolist() == [[False, True, True], [True, False, True]]
    top = torch.tensor([[0, 1], [4, 5]])
    assert average_popularity(top, POP).tolist() == [9.0, 0.5]
    cov = covered_items(top, 6)
    assert cov.tolist() == [True, True, False, False, True, True]
    assert math.isclose(coverage(cov), 4 / 6)


def test_evaluate_ranking_bias_keys_by_hand():
    m = evaluate_ranking(FixedScores(SCORES), RELEVANT, EXCLUDE, ks=(1, 2), item_popularity=POP, item_group=GROUPS)
    # K=2 — user 0: top 0,1; relevant 1 (mid, hit), 3 (tail, miss)
    #       user 1: top 4,5; relevant 0 (head, miss), 5 (tail, hit)
    #       user 2: top 4,5; relevant 2 (mid, miss), 4, 5 (tail, both hit)
    assert math.isclose(m["recall@2/head"], 0.0)  # only user 1 has a head item
    assert math.isclose(m["recall@2/mid"], (1.0 + 0.0) / 2)  # users 0 and 2
    assert math.isclose(m["recall@2/tail"], (0.0 + 1.0 + 1.0) / 3)
    assert math.isclose(m["avgpop@2"], ((10 + 8) / 2 + (1 + 0) / 2 + (1 + 0) / 2) / 3)
    assert math.isclose(m["coverage@2"], 4 / 6)  # items 0, 1, 4, 5
    # K=1 — top items 0, 4, 4: only user 2's tail item 4 is a hit, 1 of its 2 tail items
    assert m["recall@1/head"] == 0.0 and m["recall@1/mid"] == 0.0
    assert math.isclose(m["recall@1/tail"], (0.0 + 0.0 + 0.5) / 3)
    assert math.isclose(m["avgpop@1"], (10 + 1 + 1) / 3)
    assert math.isclose(m["coverage@1"], 2 / 6)
    assert math.isclose(m["recall@2"], (1 / 2 + 1 / 2 + 2 / 3) / 3, rel_tol=1e-6)  # old keys: float32


def test_group_without_relevant_items_is_none_and_groups_default_from_popularity():
    relevant = UserItemSet([0, 0, 2, 2, 2], [1, 3, 2, 4, 5], 3, 6)  # no head item is relevant
    m = evaluate_ranking(FixedScores(SCORES), relevant, EXCLUDE, ks=(2,), item_popularity=POP)
    assert m["recall@2/head"] is None  # undefined: JSON null, never NaN
    assert math.isclose(m["recall@2/mid"], 0.5) and math.isclose(m["recall@2/tail"], 0.5)
    only_groups = evaluate_ranking(FixedScores(SCORES), relevant, EXCLUDE, ks=(2,), item_group=GROUPS)
    assert "avgpop@2" not in only_groups and math.isclose(only_groups["coverage@2"], 4 / 6)


def test_old_keys_unchanged_and_chunking_invariant():
    model = FixedScores(SCORES)
    plain = evaluate_ranking(model, RELEVANT, EXCLUDE, ks=(1, 2, 5))
    biased = evaluate_ranking(model, RELEVANT, EXCLUDE, ks=(1, 2, 5), item_popularity=POP, item_group=GROUPS)
    assert {k: biased[k] for k in plain} == plain
    assert set(plain) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 2, 5)} | {"users"}
    chunked = evaluate_ranking(model, RELEVANT, EXCLUDE, ks=(1, 2, 5), chunk_size=1, item_popularity=POP,
                               item_group=GROUPS)
    assert chunked.keys() == biased.keys()
    for key, value in biased.items():
        assert (value is None and chunked[key] is None) or math.isclose(chunked[key], value, rel_tol=1e-6)


def test_items_beyond_the_popularity_tensor_count_as_unpopular_tail():
    # popularity and groups known for items 0-3 only: items 4, 5 count 0 and join the last group (tail)
    m = evaluate_ranking(FixedScores(SCORES), RELEVANT, EXCLUDE, ks=(2,), item_popularity=POP[:4],
                         item_group=GROUPS[:4])
    ref = evaluate_ranking(FixedScores(SCORES), RELEVANT, EXCLUDE, ks=(2,), item_popularity=POP, item_group=GROUPS)
    assert {k: v for k, v in m.items() if k != "avgpop@2"} == {k: v for k, v in ref.items() if k != "avgpop@2"}
    assert math.isclose(m["avgpop@2"], ((10 + 8) / 2 + 0 + 0) / 3)  # item 4 now counts 0, not 1
