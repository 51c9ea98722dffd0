import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.keep import KeepTerm
from continual_kd.eval import top_k_items
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge


def keep_spec(**kw):
    base = dict(name="keep", weight=0.01, k=3, uninteresting=1)
    base.update(kw)
    return SimpleNamespace(**base)


def one_user_model(item_scores):
    model = build_backbone("mf", num_users=1, num_items=len(item_scores), dim=1)
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([[1.0]]))
        model.item_emb.copy_(torch.tensor(item_scores).unsqueeze(1))
    return model


def keep_term(model):
    """The model's own pre-block list is items [0, 1, 2, 3]; with k = 3 and the whole list avoided,
    the one uninteresting item can only be item 4."""
    own = Knowledge("self", 0, np.array([0]), np.array([[0, 1, 2, 3]]), np.array([[5, 4, 3, 2]], np.float32))
    ctx = TermContext(model, [], UserItemSet([], [], 1, 5), 1, 5, 1, 1, own=[own])
    term = build_terms([keep_spec()], ctx)[0]
    term.resample(torch.Generator().manual_seed(0), 0)
    return term


def test_keep_loss_by_hand_and_lower_when_the_old_order_is_kept():
    batch = Batch(torch.tensor([0]), torch.tensor([0]), torch.tensor([4]))
    kept = one_user_model([5.0, 4.0, 3.0, 2.0, 1.0])
    term = keep_term(kept)
    assert isinstance(term, KeepTerm) and TERMS["keep"] is KeepTerm
    assert term.targets.uninteresting.tolist() == [[4]]
    e = math.exp
    expected = -((5 - math.log(e(5) + e(4) + e(3) + e(1))) + (4 - math.log(e(4) + e(3) + e(1)))
                 + (3 - math.log(e(3) + e(1))))
    kept_loss = float(term.loss(kept, batch, 0).detach())
    assert kept_loss == pytest.approx(expected, rel=1e-6)
    reversed_model = one_user_model([1.0, 2.0, 3.0, 4.0, 5.0])
    reversed_loss = float(keep_term(reversed_model).loss(reversed_model, batch, 0).detach())
    assert kept_loss < reversed_loss


def test_keep_needs_the_models_own_knowledge():
    model = one_user_model([1.0, 2.0])
    with pytest.raises(ValueError, match="own"):
        build_terms([keep_spec()], TermContext(model, [], UserItemSet([], [], 1, 2), 1, 2, 1, 1))


def test_training_pulls_a_drifted_model_back_to_its_old_order():
    torch.manual_seed(0)
    nu, ni, k = 15, 50, 10
    old = build_backbone("mf", num_users=nu, num_items=ni, dim=8)
    with torch.no_grad():
        old.user_emb.mul_(100)  # spread scores: a clear old order
        old.item_emb.mul_(100)
    users = torch.arange(nu)
    known = UserItemSet(torch.arange(nu), torch.arange(nu), nu, ni)  # user u knows item u
    items, scores = top_k_items(old, users, k, known)
    own = Knowledge("self", 0, users.numpy(), items.numpy(), scores.numpy())
    model = build_backbone("mf", num_users=nu, num_items=ni, dim=8)  # the drifted model: fresh weights
    ctx = TermContext(model, [], known, nu, ni, 1, 80, own=[own])
    term = build_terms([keep_spec(k=k, uninteresting=10)], ctx)[0]
    old_top = items[:, :k]

    def overlap():  # share of the old top-k back in the model's top-k
        now = top_k_items(model, users, k, known)[0]
        return float((now.unsqueeze(2) == old_top.unsqueeze(1)).any(2).float().mean())

    before = overlap()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    batch = Batch(users, users, users)
    for epoch in range(80):
        term.resample(gen, epoch)
        opt.zero_grad()
        term.loss(model, batch, epoch).backward()
        opt.step()
    after = overlap()
    assert before < 0.4 and after > 0.9, (before, after)


def test_absent_keeps_only_the_users_the_block_has_no_pairs_for():
    """users: absent drops the old lists of the block's users (the block speaks for them): their rows get
    no keep loss, the others' loss is as with users: all."""
    model = build_backbone("mf", num_users=3, num_items=6, dim=2)
    lists = np.array([[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]])
    own = Knowledge("self", 0, np.arange(3), lists, np.zeros((3, 4), np.float32))
    ctx = TermContext(model, [], UserItemSet([], [], 3, 6), 3, 6, 1, 1, own=[own], block_users=torch.tensor([1]))
    every = build_terms([keep_spec(k=2)], ctx)[0]
    absent = build_terms([keep_spec(k=2, users="absent")], ctx)[0]
    assert every.targets.row.tolist() == [0, 1, 2] and absent.targets.row.tolist() == [0, -1, 1]
    for term in (every, absent):
        term.resample(torch.Generator().manual_seed(0), 0)
    only_block_user = Batch(torch.tensor([1]), torch.tensor([0]), torch.tensor([5]))
    assert float(absent.loss(model, only_block_user, 0).detach()) == 0.0 < float(every.loss(model, only_block_user, 0).detach())
    others = Batch(torch.tensor([0, 2]), torch.tensor([0, 0]), torch.tensor([5, 5]))
    absent.targets.uninteresting.copy_(every.targets.uninteresting[[0, 2]])  # the same draws for the same users
    absent.targets.targets = torch.cat([absent.targets.interesting, absent.targets.uninteresting], 1)
    assert float(absent.loss(model, others, 0).detach()) == pytest.approx(float(every.loss(model, others, 0).detach()), rel=1e-6)
