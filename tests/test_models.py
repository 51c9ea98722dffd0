"""Behaviour every backbone must show; each backbone only says how it is built (BACKBONE_CASES)."""

import numpy as np
import pytest
import torch

from continual_kd.config import BACKBONE_NAMES, TrainSpec
from continual_kd.continual.training import train_epochs
from continual_kd.eval import evaluate_ranking
from continual_kd.models import BACKBONES, build_backbone
from continual_kd.sparse import UserItemSet

BACKBONE_CASES = {"mf": {"dim": 16}}  # one entry per backbone: how to build it


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
    train_epochs(model, tu, ti, known, 60, TrainSpec(lr=0.02, weight_decay=0.0, batch_size=64),
                 torch.Generator().manual_seed(0))
    relevant = UserItemSet(u[test], i[test], 60, 60)
    m = evaluate_ranking(model, relevant, known, ks=(10,))

    class Popularity(torch.nn.Module):
        counts = torch.bincount(torch.as_tensor(i[~test]), minlength=60).float()

        def full_scores(self, users):
            return self.counts.expand(len(users), -1).clone()

    pop = evaluate_ranking(Popularity(), relevant, known, ks=(10,))
    assert m["recall@10"] > 0.8 > pop["recall@10"] + 0.3


@pytest.mark.parametrize("name", sorted(BACKBONE_CASES))
def test_growth_keeps_old_rows_and_uses_neighbour_mean(name):
    model = build_backbone(name, 3, 4, **BACKBONE_CASES[name])
    users_before, items_before = [t.detach().clone() for t in model.embeddings()]
    # new user 3 interacted with old items 0 and 2; new item 4 with old users 1 and 2
    users, items = torch.tensor([3, 3, 1, 2]), torch.tensor([0, 2, 4, 4])
    model.grow(4, 5, users, items, init="neighbor")
    ue, ie = model.embeddings()
    assert ue.shape[0] == 4 and ie.shape[0] == 5
    assert torch.equal(ue[:3], users_before) and torch.equal(ie[:4], items_before)
    assert torch.allclose(ue[3], (items_before[0] + items_before[2]) / 2)
    assert torch.allclose(ie[4], (users_before[1] + users_before[2]) / 2)
    assert model.full_scores(torch.tensor([3])).shape == (1, 5)


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
    users = torch.tensor([0, 3, 4])
    full = model.full_scores(users)
    items = torch.arange(7).expand(3, -1)
    assert torch.allclose(full, model.score(users, items), atol=1e-6)
