"""CD (collaborative distillation): rank-aware draws from the teacher's list, soft labels, the loss by hand."""

import math

import numpy as np
import pytest
import torch

from continual_kd.config import CDTermSpec
from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.cd import CDTerm, cd_soft_labels, rank_positions
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(logit: float, label: float) -> float:
    return -(label * math.log(sig(logit)) + (1 - label) * math.log(1 - sig(logit)))


def test_soft_labels_by_hand():
    labels = cd_soft_labels(torch.tensor([4.0, 2.0, -2.0]), 2.0)
    assert labels.tolist() == pytest.approx([sig(2.0), sig(1.0), sig(-1.0)])
    assert labels.tolist() == pytest.approx([0.880797, 0.731059, 0.268941], abs=1e-6)


def test_rank_positions_follow_exp_of_minus_rank_over_t():
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(40000, 3, dtype=torch.bool)
    pos, ok = rank_positions(valid, 1, 1.0, gen)
    freq = torch.bincount(pos[:, 0], minlength=3).double() / len(pos)
    z = 1 + math.exp(-1) + math.exp(-2)
    assert freq.tolist() == pytest.approx([1 / z, math.exp(-1) / z, math.exp(-2) / z], abs=0.01)
    assert ok.all()
    # distinct positions; invalid ones only when a row has too few valid
    valid = torch.tensor([[True, True, True, True], [False, True, False, False]])
    pos, ok = rank_positions(valid, 3, 1e-3, gen)  # a tiny T: the best valid positions, in order
    assert pos[0].tolist() == [0, 1, 2] and ok[0].tolist() == [True, True, True]
    assert pos[1, 0].item() == 1 and ok[1].tolist() == [True, False, False]


def one_user(known_pairs=((0, 3),), samples=2):
    """1 user; MF dim 1: user 1, items .5, 1, -1, 0; the teacher lists [2, 0, 1] with scores [4, 2, -2]."""
    model = build_backbone("mf", num_users=1, num_items=4, dim=1)
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([[1.0]]))
        model.item_emb.copy_(torch.tensor([[0.5], [1.0], [-1.0], [0.0]]))
    users, items = zip(*known_pairs) if known_pairs else ((), ())
    known = UserItemSet(list(users), list(items), 1, 4)
    k = Knowledge("t", 1, np.array([0]), np.array([[2, 0, 1]]), np.array([[4.0, 2.0, -2.0]], np.float32))
    ctx = TermContext(model, [k], known, num_users=1, num_items=4, block=1, epochs=1)
    spec = CDTermSpec(samples=samples, rank_temperature=1e-3, temperature=2.0)
    return model, build_terms([spec], ctx)[0]


def test_cd_loss_by_hand():
    model, term = one_user()
    assert isinstance(term, CDTerm) and TERMS["cd"] is CDTerm
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.targets.tolist() == [[2, 0]]  # the two best-ranked (tiny rank temperature)
    assert term.target_labels[0].tolist() == pytest.approx([sig(2.0), sig(1.0)])
    per_pair = bce(-1.0, sig(2.0)) + bce(0.5, sig(1.0))
    batch = Batch(torch.tensor([0, 0]), torch.tensor([3, 3]), torch.tensor([1, 1]))  # one term per training pair
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(2 * per_pair, rel=1e-6)
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(2 * 1.802606, rel=1e-5)


def test_known_items_are_never_targets_and_short_lists_are_masked():
    model, term = one_user(known_pairs=((0, 2),), samples=3)  # item 2 learned since the list was made
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.targets[0, :2].tolist() == [0, 1] and term.target_valid[0].tolist() == [True, True, False]
    batch = Batch(torch.tensor([0]), torch.tensor([3]), torch.tensor([3]))
    expected = bce(0.5, sig(1.0)) + bce(1.0, sig(-1.0))  # the invalid third slot adds nothing
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(expected, rel=1e-6)
    other = Batch(torch.tensor([3]), torch.tensor([0]), torch.tensor([1]))  # a user without a list
    assert float(term.loss(model, other, 0).detach()) == 0.0


def test_several_teachers_label_from_the_mean_score():
    model = build_backbone("mf", num_users=1, num_items=3, dim=1)
    a = Knowledge("a", 1, np.array([0]), np.array([[0, 1]]), np.array([[2.0, 0.0]], np.float32))
    b = Knowledge("b", 1, np.array([0]), np.array([[0, 1]]), np.array([[4.0, 2.0]], np.float32))
    ctx = TermContext(model, [a, b], UserItemSet([], [], 1, 3), num_users=1, num_items=3, block=1, epochs=1)
    term = build_terms([CDTermSpec(samples=2, rank_temperature=1e-3, temperature=2.0)], ctx)[0]
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.targets.tolist() == [[0, 1]]
    assert term.target_labels[0].tolist() == pytest.approx([sig(1.5), sig(0.5)])  # σ(mean score / T)
    # distill.fusion_popularity's penalty on item 0 puts item 1 first in the draw's order; labels stay the lists'
    ctx.fusion_penalty = torch.tensor([1.0, 0.0, 0.0])
    term = build_terms([CDTermSpec(samples=2, rank_temperature=1e-3, temperature=2.0)], ctx)[0]
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.targets.tolist() == [[1, 0]]
    assert term.target_labels[0].tolist() == pytest.approx([sig(0.5), sig(1.5)])


def test_training_moves_scores_toward_the_labels():
    model, term = one_user()
    term.resample(torch.Generator().manual_seed(0), 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    batch = Batch(torch.tensor([0]), torch.tensor([3]), torch.tensor([3]))
    for _ in range(200):
        opt.zero_grad()
        term.loss(model, batch, 0).backward()
        opt.step()
    s = model.score(torch.tensor([0, 0]), torch.tensor([2, 0])).detach()
    assert torch.sigmoid(s).tolist() == pytest.approx([sig(2.0), sig(1.0)], abs=0.02)  # the BCE optimum
