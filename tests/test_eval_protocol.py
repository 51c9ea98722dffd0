"""The evaluation mask (standard / train / all_seen), the pooled test set, training popularity and UnKD's
equal-interaction groups, on hand-made two-block cases."""

import math

import numpy as np
import pytest
import torch

from continual_kd.config import parse_job
from continual_kd.errors import CkdError
from continual_kd.eval import evaluate_ranking
from continual_kd.eval.bias import equal_interaction_groups, popularity_groupings
from continual_kd.eval.protocol import eval_sets, training_popularity
from continual_kd.types import TEST, TRAIN, VALID, Interactions


class FixedScores(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores, dtype=torch.float32)

    def full_scores(self, users):
        return self.scores[users].clone()


def _seen(rows):
    """rows: (user, item, block, split) → Interactions over 2 users × 5 items."""
    u, i, b, s = (np.array(c) for c in zip(*rows))
    n = len(u)
    return Interactions(u.astype(np.int64), i.astype(np.int64), np.arange(n, dtype=np.int64),
                        np.ones(n, np.float32), b.astype(np.int16), s.astype(np.int8), 2, 5)


# user 0: block 0 train 0, valid 1, test 2; block 1 train 3, test 4
# user 1: block 0 train 0, test 1;          block 1 train 2, test 3
SEEN = _seen([(0, 0, 0, TRAIN), (0, 1, 0, VALID), (0, 2, 0, TEST), (0, 3, 1, TRAIN), (0, 4, 1, TEST),
              (1, 0, 0, TRAIN), (1, 1, 0, TEST), (1, 2, 1, TRAIN), (1, 3, 1, TEST)])
SCORES = [[0.9, 0.7, 0.6, 0.95, 1.0],  # user 0: block 1's test item 4 scores highest, then valid item 1, then 2
          [0.9, 0.2, 0.1, 0.5, 0.8]]


def test_standard_mask_keeps_other_blocks_test_items_as_candidates():
    model = FixedScores(SCORES)
    relevant, exclude = eval_sets(SEEN, 0, TEST)
    # user 0, block 0: train 0, 3 and valid 1 masked; item 4 (block 1's test) is ranked first → a miss at 1
    assert sorted(zip(exclude.users.tolist(), exclude.items.tolist())) == [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2)]
    m = evaluate_ranking(model, relevant, exclude, ks=(1, 2))
    # user 0: ranking 4, 2 → recall@1 0, NDCG@2 = 1/log2(3); user 1 (test 1): ranking 4, 3, 1 → 0 at 1 and 2
    assert m["recall@1"] == 0.0
    assert math.isclose(m["ndcg@2"], (1 / math.log2(3) + 0.0) / 2, rel_tol=1e-6)

    # the old rule masks every seen pair but the target: user 0's item 4 (block 1's test) disappears → a hit
    # at 1; user 1 loses item 3 → ranking 4 (never seen by user 1), 1
    relevant, exclude = eval_sets(SEEN, 0, TEST, mask="all_seen")
    m = evaluate_ranking(model, relevant, exclude, ks=(1, 2))
    assert m["recall@1"] == 0.5
    assert math.isclose(m["ndcg@2"], (1.0 + 1 / math.log2(3)) / 2, rel_tol=1e-6)

    # train only: user 0's valid item 1 stays a negative and ranks above item 2 → a miss at 2 too
    relevant, exclude = eval_sets(SEEN, 0, TEST, mask="train")
    m = evaluate_ranking(model, relevant, exclude, ks=(2, 3))
    assert m["recall@2"] == 0.0  # user 0: 4, 1; user 1: 4, 3
    assert math.isclose(m["ndcg@3"], (1 / math.log2(4) + 1 / math.log2(4)) / 2, rel_tol=1e-6)


def test_pooled_test_set_by_hand():
    relevant, exclude = eval_sets(SEEN, None, TEST)  # every block's test pairs as one test set
    assert sorted(zip(relevant.users.tolist(), relevant.items.tolist())) == [(0, 2), (0, 4), (1, 1), (1, 3)]
    m = evaluate_ranking(FixedScores(SCORES), relevant, exclude, ks=(2, 3))
    # user 0: masked 0, 1, 3 → ranking 4, 2: both relevant at the top → NDCG@2 = 1
    # user 1: masked 0, 2 → ranking 4, 3, 1: hits at 2 and 3 → NDCG@2 = (1/log2 3) / (1 + 1/log2 3),
    #         NDCG@3 = (1/log2 3 + 1/2) / (1 + 1/log2 3)
    idcg = 1 + 1 / math.log2(3)
    assert math.isclose(m["ndcg@2"], (1 + (1 / math.log2(3)) / idcg) / 2, rel_tol=1e-6)
    assert math.isclose(m["ndcg@3"], (1 + (1 / math.log2(3) + 0.5) / idcg) / 2, rel_tol=1e-6)
    assert math.isclose(m["recall@2"], (1 + 0.5) / 2)


def test_a_target_pair_is_never_masked():
    # the same pair held out in block 0 and trained in block 1 still counts as block 0's target
    seen = _seen([(0, 2, 0, TEST), (0, 2, 1, TRAIN), (0, 0, 0, TRAIN)])
    relevant, exclude = eval_sets(seen, 0, TEST)
    assert relevant.items.tolist() == [2] and exclude.items.tolist() == [0]


def test_popularity_counts_training_pairs_only_and_equal_interaction_groups():
    assert training_popularity(SEEN).tolist() == [2, 0, 1, 1, 0]  # valid and test pairs do not count
    # counts 6, 3, 2, 1 (12 interactions, 3 groups of ~4): midpoints 3, 7.5, 10, 11.5 → 0, 1, 2, 2
    assert equal_interaction_groups(torch.tensor([6.0, 3, 2, 1]), 3).tolist() == [0, 1, 2, 2]
    groupings = popularity_groupings(torch.tensor([6.0, 3, 2, 1, 0]), 3)
    assert set(groupings) == {"", "eq"}
    m = evaluate_ranking(FixedScores([[0.1, 0.9, 0.8, 0.2, 0.3]]),
                         *eval_sets(_seen([(0, 1, 0, TEST), (0, 3, 0, TEST), (0, 0, 0, TRAIN)]), 0, TEST), ks=(1,),
                         item_popularity=torch.tensor([6.0, 3, 2, 1, 0]), item_group=groupings)
    # item 1 (hit at rank 1) is in eq group 1; item 3 (missed) in eq group 2; head/mid/tail: 1 mid, 3 tail
    assert (m["recall@1/eq1"], m["recall@1/eq2"], m["recall@1/eq0"]) == (1.0, 0.0, None)
    assert (m["recall@1/mid"], m["recall@1/tail"]) == (1.0, 0.0)
    assert not popularity_groupings(torch.tensor([1.0, 2.0]), 0).keys() - {""}


def test_the_mask_is_named_in_the_job_and_issue_11s_spelling_is_accepted():
    assert parse_job({}).eval.mask == "standard"
    assert parse_job({"eval": {"exclude": "train"}}).eval.mask == "train"
    assert parse_job({"eval": {"exclude": "known"}}).eval.mask == "standard"
    assert parse_job({"eval": {"mask": "all_seen"}}).eval.mask == "all_seen"
    with pytest.raises(CkdError, match="eval.exclude: must be known or train"):
        parse_job({"eval": {"exclude": "everything"}}, "j.yaml")
    with pytest.raises(CkdError, match="eval.mask"):
        parse_job({"eval": {"mask": "none"}}, "j.yaml")
    # the estimate-only options do not change the lineage; the mask does
    base = parse_job({}).config_hash()
    assert parse_job({"eval": {"ips_exponent": 1.0}}).config_hash() == base
    assert parse_job({"eval": {"mask": "train"}}).config_hash() != base
