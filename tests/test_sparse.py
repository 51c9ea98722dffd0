import torch

from continual_kd.sparse import UserItemSet, sample_excluding


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
