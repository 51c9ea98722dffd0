"""RD (ranking distillation): position weights, rank estimates, dynamic weights and the loss by hand."""

import math

import numpy as np
import pytest
import torch

from continual_kd.config import RDTermSpec
from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.rd import RDTerm, estimated_ranks, rd_dynamic_weights, rd_static_weights, rd_weights
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet, sample_excluding
from continual_kd.types import Knowledge


def rd_spec(**kw):
    base = {"name": "rd", "k": 2, "lam": 1.0, "mu": 0.5, "dynamic_samples": 4, "dynamic_start": 1}
    base.update(kw)
    return RDTermSpec(**base)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_static_weights_by_hand():
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    assert rd_static_weights(3, 1.0).tolist() == pytest.approx([math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z])
    z2 = math.exp(-0.5) + math.exp(-1)
    assert rd_static_weights(2, 2.0).tolist() == pytest.approx([math.exp(-0.5) / z2, math.exp(-1) / z2])


def test_rank_estimate_and_dynamic_weights_by_hand():
    top = torch.tensor([[3.0, 1.0, 0.0]])
    sampled = torch.tensor([[2.0, 0.5, 4.0, -1.0]])  # strictly above 3: 1, above 1: 2, above 0: 3 (of n = 4)
    ranks = estimated_ranks(top, sampled, num_items=9)  # ⌊8·c/4⌋ + 1
    assert ranks.tolist() == [[3.0, 5.0, 7.0]]
    dyn = rd_dynamic_weights(ranks, 0.5)  # tanh(0.5·(r̂ - k)), k = 1, 2, 3
    assert dyn[0].tolist() == pytest.approx([math.tanh(1.0), math.tanh(1.5), math.tanh(2.0)])
    # ranked at least as high as the teacher does: no weight
    assert rd_dynamic_weights(torch.tensor([[1.0, 1.0, 2.0]]), 0.5).tolist() == [[0.0, 0.0, 0.0]]
    static = rd_static_weights(3, 1.0)
    w = rd_weights(static, dyn)
    raw = [s * d for s, d in zip(static.tolist(), dyn[0].tolist())]
    assert w[0].tolist() == pytest.approx([x / sum(raw) for x in raw])
    assert rd_weights(static, dyn, renormalize=False)[0].tolist() == pytest.approx(raw)
    assert rd_weights(static, torch.zeros(1, 3)).tolist() == [[0.0, 0.0, 0.0]]  # nothing to push: stays zero


def one_user(num_items=6):
    """1 user; MF dim 1: user 1, items 2, -1, 0.5, 0, ... ; the teacher lists [0, 1, 2]."""
    model = build_backbone("mf", num_users=1, num_items=num_items, dim=1)
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([[1.0]]))
        model.item_emb.copy_(torch.tensor([[2.0], [-1.0], [0.5]] + [[0.0]] * (num_items - 3)))
    known = UserItemSet([0], [5], 1, num_items)
    k = Knowledge("t", 1, np.array([0]), np.array([[0, 1, 2]]), np.array([[3.0, 2.0, 1.0]], np.float32))
    ctx = TermContext(model, [k], known, num_users=1, num_items=num_items, block=1, epochs=4)
    return model, known, build_terms([rd_spec()], ctx)[0]


def test_rd_loss_with_static_weights_by_hand():
    model, _, term = one_user()
    assert isinstance(term, RDTerm) and TERMS["rd"] is RDTerm
    term.resample(torch.Generator().manual_seed(0), 0)  # before dynamic_start: static weights only
    w1, w2 = math.exp(-1) / (math.exp(-1) + math.exp(-2)), math.exp(-2) / (math.exp(-1) + math.exp(-2))
    per_pair = -(w1 * logsig(2.0) + w2 * logsig(-1.0))
    batch = Batch(torch.tensor([0, 0, 0]), torch.tensor([3, 4, 3]), torch.tensor([4, 3, 4]))  # one term per pair
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(3 * per_pair, rel=1e-6)
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(3 * 0.445982, rel=1e-5)


def test_dynamic_weights_come_from_the_models_ranks_of_sampled_unobserved_items():
    model, known, term = one_user()
    term.resample(torch.Generator().manual_seed(7), 1)
    # the same draw as the term's, counted by hand: scores item → [2, -1, .5, 0, 0, (known)]
    sampled = sample_excluding(torch.tensor([0]), 4, 6, [known], torch.Generator().manual_seed(7))[0].tolist()
    assert 5 not in sampled  # known items are never drawn
    item_score = [2.0, -1.0, 0.5, 0.0, 0.0, 0.0]
    dyn = []
    for pos, score in enumerate([2.0, -1.0], start=1):
        above = sum(item_score[j] > score for j in sampled)
        rank = math.floor(5 * above / 4) + 1
        dyn.append(max(math.tanh(0.5 * (rank - pos)), 0.0))
    static = [math.exp(-1), math.exp(-2)]
    raw = [s * d for s, d in zip(static, dyn)]
    expected = [x / sum(raw) for x in raw] if sum(raw) > 0 else [0.0, 0.0]
    assert term.weights[0].tolist() == pytest.approx(expected, abs=1e-6)
    # item 0 is the model's best (no sampled item above it): its dynamic weight is 0
    assert term.weights[0, 0].item() == 0.0
    batch = Batch(torch.tensor([0]), torch.tensor([3]), torch.tensor([4]))
    assert float(term.loss(model, batch, 1).detach()) == pytest.approx(-(expected[1] * logsig(-1.0)), rel=1e-5)


def test_users_without_a_list_are_skipped_and_training_pulls_the_list_up():
    model, _, term = one_user()
    batch = Batch(torch.tensor([0]), torch.tensor([3]), torch.tensor([4]))
    term.resample(torch.Generator().manual_seed(0), 0)
    other_users = Batch(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert float(term.loss(model, other_users, 0).detach()) == 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = float(model.score(torch.tensor([0]), torch.tensor([1])).detach())
    for _ in range(20):
        opt.zero_grad()
        term.loss(model, batch, 0).backward()
        opt.step()
    assert float(model.score(torch.tensor([0]), torch.tensor([1])).detach()) > before


def test_fused_lists_of_several_teachers():
    model = build_backbone("mf", num_users=1, num_items=4, dim=1)
    known = UserItemSet([], [], 1, 4)
    a = Knowledge("a", 1, np.array([0]), np.array([[0, 1, 2]]), np.zeros((1, 3), np.float32))
    b = Knowledge("b", 1, np.array([0]), np.array([[0, 3, 1]]), np.zeros((1, 3), np.float32))
    ctx = TermContext(model, [a, b], known, num_users=1, num_items=4, block=1, epochs=1)
    term = build_terms([rd_spec()], ctx)[0]
    # both teachers' best comes first, then item 1 (ranks 2 and 3), which both list, above b's 2nd (item 3)
    assert term.top.tolist() == [[0, 1]]
