"""Behaviour every backbone must show; each backbone only says how it is built (BACKBONE_CASES)
and, where the shared defaults do not suit it, how it trains (TRAIN_CASES). Growth rules and the
propagation / determinism checks are per backbone."""

import copy

import numpy as np
import pytest
import torch

from continual_kd.config import BACKBONE_NAMES, TrainSpec
from continual_kd.continual.training import train_epochs
from continual_kd.eval import evaluate_ranking
from continual_kd.models import BACKBONES, build_backbone
from continual_kd.models.lightgcn import normalized_adjacency
from continual_kd.sparse import UserItemSet

BACKBONE_CASES = {  # one entry per backbone: how to build it
    "mf": {"dim": 16},
    "lightgcn": {"dim": 16, "layers": 2},
    "multvae": {"dim": 8, "hidden": 32, "dropout": 0.5, "beta": 0.2},
    "pathrec": {},  # paths through the interaction graph (and an item graph when one is attached)
}
CHECKERBOARD_TRAIN = TrainSpec(epochs_base=60, lr=0.02, weight_decay=0.0, batch_size=64)
TRAIN_CASES = {  # per-backbone training for the checkerboard, where the shared one does not suit
    # batches of users (MultVAE reads whole rows): 60 users / 16 = 4 steps per epoch
    "multvae": TrainSpec(epochs_base=40, lr=0.01, weight_decay=0.0, batch_size=16),
}


def test_registry_and_config_agree():
    assert set(BACKBONES) == set(BACKBONE_NAMES) == set(BACKBONE_CASES)


def checkerboard(num_users=60, num_items=60, groups=6, seed=0):
    """Users and items in `groups` clusters; a user likes items of its own cluster only."""
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(num_users), 8)
    gu = u % groups
    items = np.array([rng.choice(np.arange(g, num_items, groups), 8, replace=False) for g in range(groups)])
    i = items[gu, np.tile(np.arange(8), num_users)]
    test = rng.random(len(u)) < 0.25
    return u, i, test


@pytest.mark.parametrize("name", sorted(BACKBONE_CASES))
def test_backbone_learns_the_checkerboard_and_beats_popularity(name):
    torch.manual_seed(0)
    u, i, test = checkerboard()
    model = build_backbone(name, 60, 60, **BACKBONE_CASES[name])
    tu, ti = torch.as_tensor(u[~test]), torch.as_tensor(i[~test])
    known = UserItemSet(u[~test], i[~test], 60, 60)
    spec = TRAIN_CASES.get(name, CHECKERBOARD_TRAIN)
    model.observe(known.users, known.items)  # the graph / input rows: the training pairs
    train_epochs(model, tu, ti, known, spec.epochs_base, spec, torch.Generator().manual_seed(0))
    model.observe(known.users, known.items)
    relevant = UserItemSet(u[test], i[test], 60, 60)
    m = evaluate_ranking(model, relevant, known, ks=(10,))

    class Popularity(torch.nn.Module):
        counts = torch.bincount(torch.as_tensor(i[~test]), minlength=60).float()

        def full_scores(self, users):
            return self.counts.expand(len(users), -1).clone()

    pop = evaluate_ranking(Popularity(), relevant, known, ks=(10,))
    assert m["recall@10"] > 0.8 > pop["recall@10"] + 0.3


# new user 3 interacted with old items 0 and 2; new item 4 with old users 1 and 2 (and new user 3)
GROW_USERS, GROW_ITEMS = torch.tensor([3, 3, 1, 2, 3]), torch.tensor([0, 2, 4, 4, 4])


@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_table_growth_keeps_old_rows_and_uses_neighbour_mean(name):
    model = build_backbone(name, 3, 4, **BACKBONE_CASES[name])
    users_before, items_before = model.user_emb.detach().clone(), model.item_emb.detach().clone()
    model.grow(4, 5, GROW_USERS, GROW_ITEMS, init="neighbor")
    ue, ie = model.user_emb, model.item_emb
    assert ue.shape[0] == 4 and ie.shape[0] == 5
    assert torch.equal(ue[:3], users_before) and torch.equal(ie[:4], items_before)
    assert torch.allclose(ue[3], (items_before[0] + items_before[2]) / 2)
    assert torch.allclose(ie[4], (users_before[1] + users_before[2]) / 2)  # old users only
    assert model.full_scores(torch.tensor([3])).shape == (1, 5)


@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_capped_neighbour_growth_keeps_a_new_row_no_longer_than_its_own_tables_median_row(name):
    model = build_backbone(name, 3, 4, **BACKBONE_CASES[name])
    with torch.no_grad():  # tables on different scales, as a dot-product model's drift apart
        model.user_emb.mul_(0.1)
        model.item_emb.mul_(20.0)
    users_before, items_before = model.user_emb.detach().clone(), model.item_emb.detach().clone()
    model.grow(4, 5, GROW_USERS, GROW_ITEMS, init="neighbor_capped")
    ue, ie = model.user_emb.detach(), model.item_emb.detach()
    assert torch.equal(ue[:3], users_before) and torch.equal(ie[:4], items_before)
    mean_u, mean_i = (items_before[0] + items_before[2]) / 2, (users_before[1] + users_before[2]) / 2
    # the new user's mean of (long) item rows: its direction, cut to the median length of a user's row ...
    assert float(torch.nn.functional.cosine_similarity(ue[3], mean_u, dim=0)) == pytest.approx(1.0, abs=1e-5)
    assert float(ue[3].norm()) == pytest.approx(float(users_before.norm(dim=1).median()), rel=1e-5)
    assert float(ue[3].norm()) < 0.05 * float(mean_u.norm())  # the plain mean: ~200× a user's length
    # ... the new item's mean of (short) user rows is shorter than an item's row already: the plain mean
    assert float(mean_i.norm()) < float(items_before.norm(dim=1).median())
    assert torch.allclose(ie[4], mean_i)


def test_multvae_growth_keeps_old_weights_and_uses_co_consumed_item_mean():
    model = build_backbone("multvae", 3, 4, **BACKBONE_CASES["multvae"])
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # new item 4: users 1 (old items 0, 1), 2 (old item 3) and 3 (no old item: not counted)
    users, items = torch.tensor([1, 1, 1, 2, 2, 3]), torch.tensor([0, 1, 4, 3, 4, 4])
    model.grow(4, 6, users, items, init="neighbor", generator=torch.Generator().manual_seed(0))
    assert model.num_users == 4 and model.num_items == 6
    after = model.state_dict()
    for k, v in before.items():  # old rows / untouched layers bit-identical
        assert torch.equal(after[k][: v.shape[0]] if k.startswith("item_") else after[k], v), k
    for k in ("item_in", "item_out", "item_bias"):
        old = before[k]
        expected = ((old[0] + old[1]) / 2 + old[3]) / 2  # mean over users of each user's old-item mean
        assert torch.allclose(after[k][4], expected), k
        assert not torch.allclose(after[k][5], expected)  # item 5 has no users: random
    assert model.full_scores(torch.tensor([3])).shape == (1, 6)


@pytest.mark.parametrize("name", sorted(BACKBONE_CASES))
def test_growth_random_init_and_unknown_init(name):
    model = build_backbone(name, 2, 2, **BACKBONE_CASES[name])
    model.grow(5, 3, init="random")
    assert [t.shape[0] for t in model.embeddings()] == [5, 3]
    with pytest.raises(ValueError):
        model.grow(6, 3, init="magic")


@pytest.mark.parametrize("name", sorted(BACKBONE_CASES))
def test_full_scores_agree_with_score(name):
    model = build_backbone(name, 5, 7, **BACKBONE_CASES[name])
    model.observe(torch.tensor([0, 0, 3, 4, 4]), torch.tensor([1, 2, 2, 5, 6]))
    model.eval()
    users = torch.tensor([0, 3, 4])
    full = model.full_scores(users)
    items = torch.arange(7).expand(3, -1)
    assert torch.allclose(full, model.score(users, items), atol=1e-6)
    assert torch.allclose(full[:, 2], model.score(users, torch.full((3,), 2)), atol=1e-6)
    ue, ie = model.embeddings()
    assert torch.allclose(full, ue[users] @ ie.T, atol=1e-5)


def test_multvae_few_items_scored_from_their_rows_equal_the_full_row_in_value_and_gradient():
    torch.manual_seed(0)
    model = build_backbone("multvae", 40, 200, dim=8, hidden=16)
    model.observe(torch.randint(0, 40, (300,)), torch.randint(0, 200, (300,)))
    users, items = torch.arange(12), torch.randint(0, 200, (12, 3))  # 3 of 200 columns: the row-gather path
    few = model.score(users, items)
    few.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = model.full_scores(users).gather(1, items)
    full.square().sum().backward()
    assert torch.allclose(few, full, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n


@pytest.mark.parametrize("name", sorted(BACKBONE_CASES))
def test_deepcopy_scores_the_same(name):  # proxies / checkpoints copy whole models
    model = build_backbone(name, 5, 7, **BACKBONE_CASES[name])
    model.observe(torch.tensor([0, 1, 4]), torch.tensor([1, 2, 6]))
    model.eval()
    with torch.no_grad():
        full = model.full_scores(torch.arange(5))
        assert torch.equal(copy.deepcopy(model).full_scores(torch.arange(5)), full)


def test_lightgcn_propagation_equals_dense_hand_computation():
    torch.manual_seed(0)
    model = build_backbone("lightgcn", 3, 3, dim=4, layers=2).double()
    # edges: u0–i0, u0–i1, u1–i1, u2–i2 (u0–i1 given twice: one edge)
    model.observe(torch.tensor([0, 0, 1, 2, 0]), torch.tensor([0, 1, 1, 2, 1]))
    a = torch.zeros(6, 6, dtype=torch.float64)  # nodes: u0 u1 u2 i0 i1 i2
    for u, i in [(0, 0), (0, 1), (1, 1), (2, 2)]:
        a[u, 3 + i] = a[3 + i, u] = 1.0
    d = a.sum(1).rsqrt()  # every node has an edge here
    norm = d[:, None] * a * d[None, :]
    assert torch.allclose(normalized_adjacency(*model._edges, 3, 3, torch.float64).to_dense(), norm)
    e0 = torch.cat([model.user_emb, model.item_emb]).detach()
    expected = (e0 + norm @ e0 + norm @ norm @ e0) / 3
    ue, ie = model.embeddings()
    assert torch.allclose(torch.cat([ue, ie]), expected)
    scores = model.full_scores(torch.arange(3))
    assert torch.allclose(scores, expected[:3] @ expected[3:].T)
    # gradients flow to the base tables through the custom sparse product
    model.base_loss(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 2])).backward()
    loss = lambda e: -torch.nn.functional.logsigmoid(  # noqa: E731
        ((e[[0, 1]] * (e[[3, 4]] - e[[5, 5]])).sum(-1))).sum()
    e0.requires_grad_(True)
    loss((e0 + norm @ e0 + norm @ norm @ e0) / 3).backward()
    assert torch.allclose(torch.cat([model.user_emb.grad, model.item_emb.grad]), e0.grad)


def test_lightgcn_reuses_propagation_until_something_changes():
    model = build_backbone("lightgcn", 4, 5, dim=8, layers=2)
    model.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 4]))
    with torch.no_grad():
        first = model.embeddings()[0]
        assert model.embeddings()[0] is first  # cached: no re-propagation per chunk
    assert model.embeddings()[0].requires_grad  # with grad enabled: always a fresh propagation
    model.base_loss(torch.tensor([0]), torch.tensor([0]), torch.tensor([3])).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()  # in-place update: cache invalid
    with torch.no_grad():
        second = model.embeddings()[0]
        assert second is not first and not torch.equal(second, first)
        model.observe(torch.tensor([0]), torch.tensor([1]))  # new graph: cache invalid
        assert not torch.equal(model.embeddings()[0], second)


def test_lightgcn_batch_scope_propagates_once_with_the_same_gradients():
    torch.manual_seed(0)
    model = build_backbone("lightgcn", 6, 7, dim=4, layers=2)
    model.observe(torch.tensor([0, 1, 2, 3, 4, 5, 5]), torch.tensor([0, 1, 2, 4, 6, 3, 5]))
    u, p, n = torch.tensor([0, 3, 5]), torch.tensor([0, 4, 3]), torch.tensor([6, 1, 2])

    def losses():  # the base loss and a term that scores the model again (as BD does)
        return model.base_loss(u, p, n) + model.score(u, torch.tensor([[2, 5], [0, 1], [6, 6]])).square().sum()

    losses().backward()
    apart = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    with model.batch_scope():
        assert model.embeddings()[0] is model.embeddings()[0]  # one propagation inside the batch
        loss = losses()
    loss.backward()
    for a, q in zip(apart, model.parameters()):
        assert torch.allclose(a, q.grad, atol=1e-7)
    assert model.embeddings()[0] is not model.embeddings()[0]  # outside it: afresh again
    with model.batch_scope():
        first = model.embeddings()[0]
        with torch.no_grad():
            model.user_emb.add_(1.0)  # a step inside the scope changes the key: no stale graph reused
        assert model.embeddings()[0] is not first


def test_lightgcn_hard_negatives_come_from_the_batch_propagation():
    """train.hard_negatives on a graph model: the candidates are scored from the propagation the batch's loss
    then reuses (no second one), with the scores of the model and no gradient through the choice."""
    from continual_kd.continual.training import hardest

    torch.manual_seed(0)
    model = build_backbone("lightgcn", 6, 7, dim=4, layers=2)
    model.observe(torch.tensor([0, 1, 2, 3, 4, 5, 5]), torch.tensor([0, 1, 2, 4, 6, 3, 5]))
    u, p = torch.tensor([0, 3, 5]), torch.tensor([0, 4, 3])
    candidates = torch.tensor([[6, 1, 2], [0, 1, 5], [2, 4, 6]])
    with torch.no_grad():
        expected = candidates.gather(1, model.score(u, candidates).argmax(1, keepdim=True)).squeeze(1)
    with model.batch_scope():
        neg = hardest(model, u, candidates)
        shared = model.embeddings()[0]
        assert model._batch_cache is not None and shared is model._batch_cache[1]  # the loss's own forward
        loss = model.base_loss(u, p, neg)
    assert torch.equal(neg, expected)
    loss.backward()
    assert model.user_emb.grad is not None


def test_multvae_scores_are_deterministic_in_eval_mode_and_training_noise_is_seeded():
    torch.manual_seed(0)
    model = build_backbone("multvae", 4, 6, **BACKBONE_CASES["multvae"])
    users, items = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 3, 4, 5])
    model.observe(users, items)
    model.eval()
    first = model.full_scores(torch.arange(4))
    assert torch.equal(first, model.full_scores(torch.arange(4)))
    model.train()
    assert torch.equal(first, model.full_scores(torch.arange(4)))  # scoring never samples
    losses = []
    for _ in range(2):  # observe re-seeds the noise: the same noisy loss again
        model.observe(users, items)
        losses.append(model.base_loss(users, items, items))
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(losses[0], model.base_loss(users, items, items))  # the noise moves on


def test_lightgcn_list_scores_and_gradients_equal_plain_indexing():
    """score(users, (B, L) items) and base_loss through the cheaper row gathers: the same values and gradients
    as indexing the propagated tables directly (many ids, so the gathers' large-batch backward is used too)."""
    torch.manual_seed(0)
    model = build_backbone("lightgcn", 30, 40, dim=8, layers=2).double()
    model.observe(torch.randint(0, 30, (200,)), torch.randint(0, 40, (200,)))
    users, items = torch.randint(0, 30, (300,)), torch.randint(0, 40, (300, 60))
    pos, neg = torch.randint(0, 40, (300,)), torch.randint(0, 40, (300,))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return model.user_emb.grad.clone(), model.item_emb.grad.clone()

    ours = model.score(users, items)
    ue, ie = model._propagate()
    plain = torch.einsum("bd,bld->bl", ue[users], ie[items])
    assert torch.allclose(ours, plain)
    for a, b in zip(grads(ours.pow(2).sum()), grads(plain.pow(2).sum())):
        assert torch.allclose(a, b)
    ue, ie = model._propagate()
    reference = -torch.nn.functional.logsigmoid((ue[users] * ie[pos]).sum(-1) - (ue[users] * ie[neg]).sum(-1)).sum()
    assert torch.allclose(model.base_loss(users, pos, neg), reference)
    for a, b in zip(grads(model.base_loss(users, pos, neg)), grads(reference)):
        assert torch.allclose(a, b)
