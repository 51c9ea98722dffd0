import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.ir_rrd import IRRRDTerm
from continual_kd.eval import top_k_users
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge


def ir_spec(**kw):
    base = dict(name="ir_rrd", weight=0.01, k=2, pool=2, uninteresting=1, score_clamp=None)
    base.update(kw)
    return SimpleNamespace(**base)


def item_knowledge(num_users: int, item_ids, item_users, source="t") -> Knowledge:
    users = np.arange(num_users)
    return Knowledge(source, 1, users, np.zeros((num_users, 1), np.int64), np.zeros((num_users, 1), np.float32),
                     item_ids=np.asarray(item_ids), item_users=np.asarray(item_users))


def test_top_k_users_matches_a_dense_brute_force():
    torch.manual_seed(0)
    nu, ni, k = 37, 23, 6
    model = build_backbone("mf", num_users=nu, num_items=ni, dim=4)
    gen = torch.Generator().manual_seed(3)
    pu, pi = torch.randint(0, nu, (120,), generator=gen), torch.randint(0, ni, (120,), generator=gen)
    pu = torch.cat([pu, torch.arange(2, nu)])  # item 5 is known by every user but users 0 and 1
    pi = torch.cat([pi, torch.full((nu - 2,), 5)])
    exclude = UserItemSet(pu, pi, nu, ni)
    items = torch.tensor([5, 0, 7, 22, 13])
    ids, vals = top_k_users(model, items, k, exclude, chunk_size=5)  # 8 user chunks
    with torch.no_grad():
        dense = model.user_emb @ model.item_emb.T  # (U, I)
    dense[pu, pi] = float("-inf")
    ref = torch.topk(dense[:, items].T, k, dim=1)
    ref_ids = torch.where(torch.isinf(ref.values), -1, ref.indices)
    assert ids.tolist() == ref_ids.tolist()
    assert torch.equal(vals, ref.values)
    assert ids[0, 2:].tolist() == [-1] * (k - 2) and set(ids[0, :2].tolist()) == {0, 1}
    big_ids, _ = top_k_users(model, items, 100, None, chunk_size=7)  # k > users: every user, ordered
    assert big_ids.shape == (5, nu) and sorted(big_ids[1].tolist()) == list(range(nu))


def one_item_case():
    """4 users scored 2, 1, .5, 9 for item 0 (MF dim 1, item vector 1); user 3 knows item 0.
    The list of item 0 is users [0, 1]; k = pool = 2, so the one uninteresting user can only be 2."""
    model = build_backbone("mf", num_users=4, num_items=2, dim=1)
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([[2.0], [1.0], [0.5], [9.0]]))
        model.item_emb.copy_(torch.tensor([[1.0], [1.0]]))
    known = UserItemSet([3, 3], [0, 1], 4, 2)
    ctx = TermContext(model, [item_knowledge(4, [0], [[0, 1]])], known, 4, 2, 1, 1)
    term = build_terms([ir_spec()], ctx)[0]
    term.resample(torch.Generator().manual_seed(0), 0)
    return model, term


def test_ir_rrd_loss_by_hand():
    model, term = one_item_case()
    assert isinstance(term, IRRRDTerm) and TERMS["ir_rrd"] is IRRRDTerm
    assert term.uninteresting_users.tolist() == [[2]]
    batch = Batch(torch.tensor([3, 2]), torch.tensor([0, 1]), torch.tensor([1, 1]))  # item 1 has no list
    expected = -((2 - math.log(math.e**2 + math.e**1 + math.e**0.5)) + (1 - math.log(math.e**1 + math.e**0.5)))
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.93845, abs=1e-5)  # .4644 + .4740
    # no listed item in the batch: nothing to distil
    assert float(term.loss(model, Batch(torch.tensor([0]), torch.tensor([1]), torch.tensor([1])), 0)) == 0.0


def test_row_models_distil_the_items_their_batch_users_know():
    _, term = one_item_case()
    row_model = SimpleNamespace(batch_unit="user")
    users = torch.tensor([3, 3])
    assert term.step_items(row_model, Batch(users, users, users)).tolist() == [0]  # user 3 knows items 0, 1
    assert term.step_items(row_model, Batch(torch.tensor([2]), torch.tensor([2]), torch.tensor([2]))).tolist() == []


def test_uninteresting_users_avoid_known_and_pool_users():
    nu, ni = 30, 5
    lists = np.stack([np.arange(10) + 3 * j for j in range(ni)])  # item j: users 3j .. 3j+9, best first
    known = UserItemSet([20, 21, 22, 25], [0, 0, 1, 4], nu, ni)
    model = build_backbone("mf", num_users=nu, num_items=ni, dim=2)
    ctx = TermContext(model, [item_knowledge(nu, np.arange(ni), lists)], known, nu, ni, 1, 1)
    term = build_terms([ir_spec(k=4, pool=10, uninteresting=50)], ctx)[0]
    term.resample(torch.Generator().manual_seed(1), 0)
    assert term.interesting.tolist() == lists[:, :4].tolist()
    known_pairs = {(20, 0), (21, 0), (22, 1), (25, 4)}
    for j in range(ni):
        drawn = set(term.uninteresting_users[j].tolist())
        assert not drawn & set(lists[j].tolist())
        assert not any((u, j) in known_pairs for u in drawn)


def test_several_lists_are_fused_over_users():
    model = build_backbone("mf", num_users=4, num_items=1, dim=1)
    a = item_knowledge(4, [0], [[0, 1, 2]], "a")
    b = item_knowledge(4, [0], [[1, 0, 3]], "b")
    # rank fusion, weights 1:3: user1 = .25·(1/2)^.05 + .75 = .991 > user0 = .25 + .75·(1/2)^.05 = .974
    ctx = TermContext(model, [a, b], UserItemSet([], [], 4, 1), 4, 1, 1, 1, weights=[1.0, 3.0])
    term = build_terms([ir_spec(k=2, pool=4)], ctx)[0]
    assert term.interesting.tolist() == [[1, 0]]
    # users 3 (.75·(1/3)^.05 = .710) then 2 (.237) fill the pool: nobody is left to be uninteresting
    assert sorted(term.pool_set.items.tolist()) == [0, 1, 2, 3]


def test_items_with_short_lists_are_left_out():
    model = build_backbone("mf", num_users=4, num_items=2, dim=1)
    ctx = TermContext(model, [item_knowledge(4, [0, 1], [[0, 1], [2, -1]])], UserItemSet([], [], 4, 2), 4, 2, 1, 1)
    term = build_terms([ir_spec()], ctx)[0]
    assert term.items.tolist() == [0]


def concordance(scores: torch.Tensor) -> float:
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)
    upper = torch.triu(torch.ones(scores.shape[1], scores.shape[1], dtype=torch.bool), 1)
    return float((diff[:, upper] > 0).float().mean())


def test_training_moves_each_items_user_ranking_toward_the_list():
    torch.manual_seed(0)
    nu, ni, m = 40, 12, 8
    model = build_backbone("mf", num_users=nu, num_items=ni, dim=8)
    gen = torch.Generator().manual_seed(2)
    lists = torch.stack([torch.randperm(nu, generator=gen)[:m] for _ in range(ni)])  # (I, M) users per item
    ctx = TermContext(model, [item_knowledge(nu, np.arange(ni), lists.numpy())], UserItemSet([], [], nu, ni),
                      nu, ni, 1, 60)
    term = build_terms([ir_spec(k=m, pool=m, uninteresting=8)], ctx)[0]
    items = torch.arange(ni)

    def agreement():
        with torch.no_grad():
            return concordance(model.score(lists.reshape(-1), items.repeat_interleave(m)).view(ni, m))

    before = agreement()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = Batch(torch.zeros(ni, dtype=torch.int64), items, items.roll(1))
    for epoch in range(60):
        term.resample(gen, epoch)
        opt.zero_grad()
        term.loss(model, batch, epoch).backward()
        opt.step()
    after = agreement()
    assert before < 0.7 and after > 0.9, (before, after)
