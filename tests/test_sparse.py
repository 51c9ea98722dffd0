import torch

from continual_kd.sparse import ComplementSampler, UserItemSet, sample_excluding


def test_membership_rows_and_masks():
    s = UserItemSet([2, 0, 2, 2, 0], [1, 3, 0, 1, 3], num_users=4, num_items=5)  # duplicates collapse
    assert len(s) == 3
    assert s.contains(torch.tensor([0, 2, 2, 1]), torch.tensor([3, 0, 3, 1])).tolist() == [True, True, False, False]
    rows, cols = s.rows_for(torch.tensor([2, 1, 0]))
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (2, 3)]
    scores = torch.zeros(2, 5)
    s.mask_(scores, torch.tensor([0, 2]))
    assert torch.isinf(scores).nonzero().tolist() == [[0, 3], [1, 0], [1, 1]]
    assert s.dense(torch.tensor([2])).tolist() == [[True, True, False, False, False]]


def test_sampling_avoids_excluded_pairs():
    ex = UserItemSet([0] * 6, list(range(6)), 2, 10)  # user 0 has seen items 0..5
    draw = sample_excluding(torch.tensor([0, 1]), 50, 10, [ex], torch.Generator().manual_seed(0))
    assert set(draw[0].tolist()) <= {6, 7, 8, 9}
    assert len(set(draw[1].tolist())) > 5


def test_complement_sampler_draws_every_allowed_item_and_nothing_else():
    # user 0 excludes 1 and 3 of 5 items (allowed 0, 2, 4: shifted keys 1-0 = 1, 3-1 = 2, so r = 0, 1, 2
    # → 0, 2, 4); user 1 excludes everything (any item); user 2 has no row in the set (every item)
    ex = UserItemSet([0, 0, 1, 1, 1, 1, 1], [3, 1, 0, 1, 2, 3, 4], 2, 5)
    s = ComplementSampler(ex, 5)
    assert s.free.tolist() == [3, 0]
    draw = s.sample(torch.tensor([0, 1, 2]), 300, torch.Generator().manual_seed(0))
    assert set(draw[0].tolist()) == {0, 2, 4}
    assert set(draw[1].tolist()) <= set(range(5)) and set(draw[2].tolist()) == set(range(5))
    counts = torch.bincount(draw[0], minlength=5)[[0, 2, 4]].float()
    assert float(counts.min()) > 60  # uniform over the three: 100 each expected
