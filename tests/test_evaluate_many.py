"""evaluate_many: one ranking pass for several relevant sets gives each set's evaluate_ranking figures,
also when the mask hides a pair that is another set's target (a (user, item) pair repeated across blocks)."""

from __future__ import annotations

import pytest
import torch

from continual_kd.eval.metrics import evaluate_many, evaluate_ranking
from continual_kd.sparse import UserItemSet


class _Fixed:
    """Every user scores items 0 > 1 > 2 > 3."""

    num_items = 4

    def full_scores(self, users):
        return torch.tensor([[4.0, 3.0, 2.0, 1.0]]).expand(len(users), 4).clone()


def _sets():
    # user 0: block A's test pair (0, 0), block B's test pair (0, 1); user 1: A's (1, 3)
    return {"A": UserItemSet([0, 1], [0, 3], 2, 4), "B": UserItemSet([0], [1], 2, 4)}


@pytest.mark.parametrize("hidden_pairs, b_recall_at_1", [
    (([0], [2]), 0.0),  # no target hidden: user 0's list is 0, 1, …: B's item 1 is second
    (([0, 1], [0, 0]), 1.0),  # (0, 0) is A's target and hidden (B's train pair): for B, item 1 comes first
])
def test_one_pass_equals_a_pass_per_set(hidden_pairs, b_recall_at_1):
    hidden = UserItemSet(*hidden_pairs, 2, 4)
    many = evaluate_many(_Fixed(), _sets(), hidden, (1, 2), keep_relevant=True)
    for key, relevant in _sets().items():
        alone = evaluate_ranking(_Fixed(), relevant, hidden, (1, 2), keep_relevant=True)
        assert many[key] == pytest.approx(alone), key
    assert many["B"]["recall@1"] == b_recall_at_1 and many["B"]["recall@2"] == 1.0
    # A: user 0's item 0 is first (its own target, kept); user 1's item 3 is never in the top 2
    assert many["A"]["recall@1"] == 0.5 and many["A"]["recall@2"] == 0.5
