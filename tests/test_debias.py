"""Learning that de-biases (train.debias: ips | pda, train.negatives: popularity): hand-computed shaping,
PDA scored without its popularity term, and lower popularity of the top-20 on a skewed simulated stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from continual_kd.config import EvalSpec, ModelSpec, TrainSpec
from continual_kd.continual.debias import loss_shaping
from continual_kd.continual.learner import Learner
from continual_kd.data.simulate import SimulationConfig, simulate
from continual_kd.errors import CkdError
from continual_kd.config import parse_job
from continual_kd.models import build_backbone
from continual_kd.models.debias import LossShaping, bpr_loss
from continual_kd.types import TEST, TRAIN, VALID, Interactions


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------- by hand


def test_ips_weights_by_hand():
    # counts 4, 1, 0, 9 → p = √(n/9) clipped at 0.2: 2/3, 1/3, 0.2, 1 → 1/p = 1.5, 3, 5, 1
    spec = TrainSpec(debias="ips", ips_exponent=0.5, ips_clip=0.2)
    positives = torch.tensor([0, 1, 3, 3])  # Σ 1/p over the positive pairs = 1.5 + 3 + 1 + 1 = 6.5
    shaping = loss_shaping(spec, 4, positives, torch.tensor([4.0, 1.0, 0.0, 9.0]))
    c = 4 / 6.5  # self-normalised: the positives' weights average 1
    assert shaping.pop_factor is None
    assert torch.allclose(shaping.item_weight, torch.tensor([1.5 * c, 3 * c, 5 * c, 1 * c]), atol=1e-6)
    assert float(shaping.item_weight[positives].mean()) == pytest.approx(1.0, abs=1e-6)
    # the loss: Σ w_pos · -log σ(s⁺ - s⁻); pairs (item 0: 1 vs 0) and (item 1: 0 vs 0)
    loss = bpr_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 1]), torch.tensor([2, 2]),
                    shaping)
    assert float(loss) == pytest.approx(-1.5 * c * _log_sigmoid(1.0) + 3 * c * math.log(2), rel=1e-6)
    # exponent 0: every propensity 1, weights 1 (plain BPR)
    flat = loss_shaping(TrainSpec(debias="ips", ips_exponent=0.0), 4, positives, torch.tensor([4.0, 1.0, 0.0, 9.0]))
    assert torch.allclose(flat.item_weight, torch.ones(4))


def test_pda_training_score_by_hand():
    # counts 3, 0 → m = (n + 1)/(max + 1) = 1, 1/4; γ = 0.5 → m^γ = 1, 1/2
    spec = TrainSpec(debias="pda", pda_gamma=0.5)
    shaping = loss_shaping(spec, 2, torch.tensor([0]), torch.tensor([3.0, 0.0]))
    assert shaping.item_weight is None
    assert torch.allclose(shaping.pop_factor, torch.tensor([1.0, 0.5]))
    # positive item 0 scored 1, negative item 1 scored -1: ELU'(1)·1 - ELU'(-1)·½ = 2 - e⁻¹/2
    loss = bpr_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0]), torch.tensor([1]), shaping)
    assert float(loss) == pytest.approx(-_log_sigmoid(2 - math.exp(-1) / 2), rel=1e-6)
    assert loss_shaping(TrainSpec(), 2, torch.tensor([0]), torch.tensor([3.0, 0.0])) is None


@pytest.mark.parametrize("backbone", ["mf", "lightgcn", "multvae"])
@torch.no_grad()
def test_every_backbone_takes_the_shaping(backbone):
    torch.manual_seed(0)
    model = build_backbone(backbone, 3, 4, **({"hidden": 8, "dim": 4} if backbone == "multvae" else {"dim": 4}))
    model.observe(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 3]))
    model.eval()  # no noise: the losses compare exactly
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), torch.tensor([3, 0, 1])
    plain = model.base_loss(users, pos, neg)
    ones = LossShaping(item_weight=torch.ones(4))
    assert torch.allclose(model.base_loss(users, pos, neg, shaping=ones), plain)
    doubled = LossShaping(item_weight=torch.full((4,), 2.0))
    if backbone == "multvae":  # the NLL part doubles, the KL part does not
        assert float(model.base_loss(users, pos, neg, shaping=doubled)) > float(plain)
    else:
        assert torch.allclose(model.base_loss(users, pos, neg, shaping=doubled), 2 * plain)
    pda = LossShaping(pop_factor=torch.tensor([1.0, 0.5, 0.25, 0.1]))
    assert not torch.allclose(model.base_loss(users, pos, neg, shaping=pda), plain)


def test_config_refuses_an_unknown_option():
    with pytest.raises(CkdError, match="debias"):
        parse_job({"name": "j", "student": {"train": {"debias": "causal"}}}, "job.yaml")
    with pytest.raises(CkdError, match="ips_clip"):
        parse_job({"name": "j", "student": {"train": {"debias": "ips", "ips_clip": 0}}}, "job.yaml")


# ------------------------------------------------------------------------------ a skewed simulated stream


@pytest.fixture(scope="module")
def skewed() -> Interactions:
    """One block of a simulated stream whose exposure is strongly skewed (Zipf 1.2), 80/10/10 split."""
    cfg = SimulationConfig(users=250, items=300, clicks=5000, periods=1, new_user_fraction=0,
                           new_item_fraction=0, exposure_skew=1.2, seed=3)
    table, _ = simulate(cfg)
    u = np.array([int(s[1:]) for s in table.column("user").to_pylist()])
    i = np.array([int(s[1:]) for s in table.column("item").to_pylist()])
    r = np.random.default_rng(0).random(len(u))
    split = np.where(r < 0.8, TRAIN, np.where(r < 0.9, VALID, TEST)).astype(np.int8)
    return Interactions(u, i, np.arange(len(u)), np.ones(len(u), np.float32), np.zeros(len(u), np.int16), split,
                        cfg.users, cfg.items)


def _trained(seen: Interactions, backbone: str, **train) -> Learner:
    settings = (dict(epochs_base=30, lr=0.002, batch_size=64, weight_decay=0.0) if backbone == "multvae"
                else dict(epochs_base=10, lr=0.02, batch_size=256))
    spec = ModelSpec(name="m", backbone=backbone, dim=16, hidden=100,
                     train=TrainSpec(select="last", **settings, **train))
    learner = Learner(spec, seed=0)
    learner.update(seen, 0)
    return learner


def _avgpop(learner: Learner, seen: Interactions) -> float:
    return learner.evaluate(seen, [0], EvalSpec(ks=[20]))[0]["avgpop@20"]


@pytest.mark.parametrize("backbone,options", [
    ("mf", ["ips", "pda", "popularity"]),
    ("lightgcn", ["ips", "pda"]),
    ("multvae", ["ips", "pda"]),  # MultVAE draws no negatives: popularity negatives change nothing for it
])
def test_debiasing_lowers_the_popularity_of_the_top_20(skewed, backbone, options):
    plain = _avgpop(_trained(skewed, backbone), skewed)
    for option in options:
        train = {"negatives": "popularity"} if option == "popularity" else {"debias": option}
        got = _avgpop(_trained(skewed, backbone, **train), skewed)
        print(backbone, option, got, plain)
        assert got < 0.97 * plain, (backbone, option, got, plain)


def test_pda_is_scored_without_its_popularity_term(skewed):
    """PDA's served scores, knowledge lists and metrics are the plain model's scores f(u, i): the same weights
    loaded under a model without PDA give the very same numbers (no popularity term at inference)."""
    pda = _trained(skewed, "mf", debias="pda", pda_gamma=0.3)
    plain = _trained(skewed, "mf")
    assert not torch.allclose(pda.model.user_emb, plain.model.user_emb)  # PDA did train differently
    same = Learner(plain.spec, seed=0)  # debias: none
    same.load(pda.state())
    k_pda, k_same = pda.knowledge(skewed, 0, 20), same.knowledge(skewed, 0, 20)
    np.testing.assert_array_equal(k_pda.items, k_same.items)
    np.testing.assert_array_equal(k_pda.scores, k_same.scores)
    users = torch.as_tensor(k_pda.users)
    expected = (pda.model.user_emb[users] @ pda.model.item_emb.T).detach()  # f(u, i) alone
    top = torch.gather(expected, 1, torch.as_tensor(k_pda.items))
    assert torch.allclose(top, torch.as_tensor(k_pda.scores), atol=1e-5)
    assert pda.evaluate(skewed, [0], EvalSpec(ks=[20])) == same.evaluate(skewed, [0], EvalSpec(ks=[20]))
